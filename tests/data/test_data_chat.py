"""Chat templates: the loss is on the assistant turns (content and end-of-turn token) and
nothing else, for both ways of finding them, in alpaca and messages records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from soft.config.errors import InputError
from soft.data import DataConfig, SFTDataset, build_datasets, load_tokenizer
from soft.data.prompts import ChatExample, instruction_example, render

TWO_TURNS = (
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Reverse the letters of the word.\n\nabc"},
    {"role": "assistant", "content": "cba"},
)


def _hand_built(tok, segments: list[tuple[str, str, int]]) -> tuple[list[int], list[int]]:
    """Ids and the expected 0/1 loss mask from the conversation spelled out by hand as
    (special token, text after it, trailing characters of that text that are trained).

    Special tokens split the text before the BPE runs, so each segment encodes alone; a
    trained suffix (the assistant content after its header's newlines) must encode alone as
    the tail of its segment, which is asserted. The special token that ENDS a trained segment
    (the end-of-turn) is trained too: it is marked with a trailing "+" on the next token."""
    ids, mask = [], []
    for special, text, trained in segments:
        train_special = special.endswith("+")
        special = special.rstrip("+")
        if special:
            ids.append(tok.hf.convert_tokens_to_ids(special))
            mask.append(int(train_special))
        seg = tok.encode(text) if text else []
        tail = tok.encode(text[len(text) - trained :]) if trained else []
        assert seg[len(seg) - len(tail) :] == tail, (text, seg, tail)
        ids += seg
        mask += [0] * (len(seg) - len(tail)) + [1] * len(tail)
    return ids, mask


def _mask(rendered) -> list[int]:
    mask = [0] * len(rendered.ids)
    for start, end in rendered.targets:
        mask[start:end] = [1] * (end - start)
    return mask


def test_llama3_style_two_turns_train_exactly_the_assistant_tokens(hf_tokenizers) -> None:
    tok = load_tokenizer(hf_tokenizers["llama3"])
    ids, expected = _hand_built(
        tok,
        [
            ("<|begin_of_text|>", "", 0),
            ("<|start_header_id|>", "user", 0), ("<|end_header_id|>", "\n\nWhat is 2 plus 3?", 0),
            ("<|eot_id|>", "", 0),
            ("<|start_header_id|>", "assistant", 0), ("<|end_header_id|>", "\n\n5", 1),
            ("<|eot_id|>+", "", 0),
            ("<|start_header_id|>", "user", 0),
            ("<|end_header_id|>", "\n\nReverse the letters of the word.\n\nabc", 0),
            ("<|eot_id|>", "", 0),
            ("<|start_header_id|>", "assistant", 0), ("<|end_header_id|>", "\n\ncba", 3),
            ("<|eot_id|>+", "", 0),
        ],
    )  # fmt: skip
    rendered = render(tok, ChatExample(TWO_TURNS))
    assert rendered.ids == ids
    assert (
        _mask(rendered) == expected
        and sum(expected) == len(tok.encode("5")) + len(tok.encode("cba")) + 2
    )
    # Generation is fed everything before the last assistant content, header included.
    assert rendered.prompt_ids == ids[: rendered.targets[-1][0]]
    assert tok.hf.decode(rendered.prompt_ids).endswith("<|end_header_id|>\n\n")


@pytest.mark.parametrize("variant", ["chatml", "chatml_generation"])
def test_chatml_two_turns_train_exactly_the_assistant_tokens(variant, hf_tokenizers) -> None:
    """Qwen's layout: no BOS, a default system turn, and the newline after <|im_end|> is the
    next turn's scaffolding (not trained). The {% generation %} template gives the same."""
    tok = load_tokenizer(hf_tokenizers[variant])
    ids, expected = _hand_built(
        tok,
        [
            ("<|im_start|>", "system\nYou are a helpful assistant.", 0), ("<|im_end|>", "\n", 0),
            ("<|im_start|>", "user\nWhat is 2 plus 3?", 0), ("<|im_end|>", "\n", 0),
            ("<|im_start|>", "assistant\n5", 1), ("<|im_end|>+", "\n", 0),
            ("<|im_start|>", "user\nReverse the letters of the word.\n\nabc", 0),
            ("<|im_end|>", "\n", 0),
            ("<|im_start|>", "assistant\ncba", 3), ("<|im_end|>+", "\n", 0),
        ],
    )  # fmt: skip
    rendered = render(tok, ChatExample(TWO_TURNS))
    assert rendered.ids == ids and _mask(rendered) == expected


def test_training_samples_carry_the_mask_shifted_to_labels(hf_tokenizers) -> None:
    tok = load_tokenizer(hf_tokenizers["llama3"])
    rendered = render(tok, ChatExample(TWO_TURNS))
    sample = SFTDataset.from_examples([ChatExample(TWO_TURNS)], tok, seq_length=96)[0]
    n = len(rendered.ids) - 1
    assert sample["tokens"][:n].tolist() == rendered.ids[:-1]
    trained = sample["labels"][sample["loss_mask"].bool()].tolist()
    expected = [t for t, m in zip(rendered.ids, _mask(rendered), strict=True) if m]
    assert trained == expected
    assert tok.decode(trained) == "5cba"  # the <|eot_id|>s are trained but decode to nothing
    assert trained.count(tok.eos_id) == 2


def test_alpaca_records_become_one_user_and_one_assistant_turn(hf_tokenizers) -> None:
    tok = load_tokenizer(hf_tokenizers["chatml"])
    example = instruction_example("chat", "Reverse the letters of the word.", "abc", "cba")
    assert example == ChatExample(
        (
            {"role": "user", "content": "Reverse the letters of the word.\n\nabc"},
            {"role": "assistant", "content": "cba"},
        )
    )
    rendered = render(tok, example)
    ((start, end),) = rendered.targets
    assert tok.hf.decode(rendered.ids[start:end]) == "cba<|im_end|>"


def test_triviaqa_records_in_the_chat_template_are_question_and_alias() -> None:
    from soft.data.prompts import question_example

    assert question_example("chat", "Capital of France?", "Paris") == ChatExample(
        (
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
        )
    )
    plain = question_example("alpaca", "Capital of France?", "Paris")
    assert plain.response == " Paris" and plain.prompt.endswith("Answer:")


def test_a_truncated_conversation_keeps_the_turns_that_fit(hf_tokenizers) -> None:
    tok = load_tokenizer(hf_tokenizers["llama3"])
    rendered = render(tok, ChatExample(TWO_TURNS))
    first_end = rendered.targets[0][1]
    ds = SFTDataset.from_examples([ChatExample(TWO_TURNS)], tok, seq_length=first_end + 3)
    assert ds.stats.num_truncated == 1
    assert ds.stats.num_loss_tokens == first_end - rendered.targets[0][0]  # turn 2 cut off
    dropped = SFTDataset.from_examples(
        [ChatExample(TWO_TURNS)] * 2 + [ChatExample(TWO_TURNS[:2])], tok, first_end + 3, "drop"
    )
    assert (dropped.stats.num_samples, dropped.stats.num_dropped) == (1, 2)


def _messages_file(path: Path, conversations: list) -> Path:
    path.write_text("".join(json.dumps({"messages": list(c)}) + "\n" for c in conversations))
    return path


def test_messages_records_are_validated_with_file_and_line(tmp_path: Path, hf_tokenizers) -> None:
    chat = {"prompt_template": "chat", "tokenizer_path": str(hf_tokenizers["chatml"])}
    bad = [
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "bot", "content": "hi"}], "role must be one of system, user, assistant"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "content must"),
        ([{"role": "assistant", "content": "x"}], "starts with an assistant turn"),
    ]
    for messages, message in bad:
        data = _messages_file(tmp_path / "bad.jsonl", [TWO_TURNS, messages])
        with pytest.raises(InputError, match=rf"'.*bad\.jsonl', line 2: .*{message}"):
            build_datasets(DataConfig(format="messages", train_path=str(data), **chat), 0)
    data = tmp_path / "alpaca_like.jsonl"
    data.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    with pytest.raises(InputError, match=r"missing field 'messages'"):
        build_datasets(DataConfig(format="messages", train_path=str(data), **chat), 0)


def test_templates_that_cannot_be_split_into_turns_are_refused(
    tmp_path: Path, hf_tokenizers
) -> None:
    def with_template(name: str, template: str) -> Path:
        folder = shutil.copytree(hf_tokenizers["chatml"], tmp_path / name)
        (folder / "chat_template.jinja").write_text(template)
        return folder

    # Marks the last message differently from earlier ones: prefixes are not stable.
    rewriting = with_template(
        "rewriting",
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if loop.last %} (last){% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    # The generation prompt ends with a space that BPE merges into the answer's first word.
    merging = with_template(
        "merging",
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}",
    )
    refusing = with_template("refusing", "{{ raise_exception('roles must alternate') }}")
    data = _messages_file(
        tmp_path / "chat.jsonl",
        [
            ({"role": "user", "content": "x"}, {"role": "assistant", "content": "the"}),
            TWO_TURNS[:2],
        ],
    )
    for folder, message in (
        (rewriting, "the chat template renders the turns before assistant message 1 differently"),
        (merging, "a token straddles the start of assistant turn 1"),
        (refusing, "the chat template refused the conversation .*roles must alternate"),
    ):
        cfg = DataConfig(
            format="messages", train_path=str(data), prompt_template="chat",
            tokenizer_path=str(folder), cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
        with pytest.raises(InputError, match=rf"'.*chat\.jsonl', line 1: {message}"):
            build_datasets(cfg, 0)


def test_builtin_tasks_in_the_chat_template(hf_tokenizers) -> None:
    cfg = DataConfig(
        prompt_template="chat", tokenizer_path=str(hf_tokenizers["llama3"]), builtin_num_samples=50
    )
    train, valid, tok = build_datasets(cfg, seed=0)
    sample = train[0]
    trained = sample["labels"][sample["loss_mask"].bool()].tolist()
    assert trained[-1] == tok.eos_id and tok.hf.decode(trained).endswith("<|eot_id|>")
    assert tok.hf.decode(sample["tokens"][:8].tolist()).startswith(
        "<|begin_of_text|><|start_header_id|>user"
    )
    assert valid is not None and len(valid) > 0
