"""eval_exits and generate on a folder with a Hugging Face tokenizer and a chat template: the
ids they score and generate from are the ids training builds (one renderer), and the losses
equal an independent computation over the training sample's own loss mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import save_export, tiny_llama

from soft.config.errors import ConfigError
from soft.conversion.hf_io import copy_tokenizer_files
from soft.data import DataConfig, build_datasets, load_tokenizer
from soft.evaluation import load_eval_examples, load_exported_model, run_eval_exits
from soft.evaluation.inference import GenerateOptions, generate_text
from soft.evaluation.losses import tokenize_example

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Reverse the letters of the word.\n\nabc"},
        {"role": "assistant", "content": "cba"},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Which number is larger, 4 or 9?"},
        {"role": "assistant", "content": "9"},
    ],
    [
        {"role": "user", "content": "Write the word in uppercase letters.\n\nqwe"},
        {"role": "assistant", "content": "QWE"},
    ],
]


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory, hf_tokenizers) -> Path:
    """A random 4-layer LLaMA whose vocabulary (700 rows) exceeds its ChatML tokenizer's (640),
    as Qwen pads its own, with the tokenizer's files beside it."""
    path = tmp_path_factory.mktemp("chat_export") / "model"
    model = tiny_llama(seed=3, layers=4, vocab=700)
    save_export(model, path, None, [2, 4])
    copy_tokenizer_files(hf_tokenizers["chatml"], path)
    return path


@pytest.fixture(scope="module")
def messages_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat_data") / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    return path


def _training_samples(messages_file: Path, tokenizer_dir: Path, tmp: Path):
    cfg = DataConfig(
        format="messages", prompt_template="chat", train_path=str(messages_file),
        valid_path=str(messages_file), tokenizer_path=str(tokenizer_dir), seq_length=96,
        cache_dir=str(tmp / "cache"),
    )  # fmt: skip
    _, valid, _ = build_datasets(cfg, seed=0)
    return [valid[i] for i in range(len(valid))]


def test_eval_scores_what_training_trains_and_generates_from_its_prefix(
    chat_export, messages_file, tmp_path
):
    exported = load_exported_model(chat_export, device="cpu", dtype="float32")
    assert exported.tokenizer.kind == "hf" and exported.tokenizer.vocab_size == 640
    samples = _training_samples(messages_file, chat_export, tmp_path)
    examples = load_eval_examples(messages_file, "messages", template="chat")
    for sample, example in zip(samples, examples, strict=True):
        tokenized = tokenize_example(exported.tokenizer, example)
        n = len(tokenized.loss_ids)
        assert sample["tokens"][: n - 1].tolist() == tokenized.loss_ids[:-1]
        trained = sample["loss_mask"].nonzero().flatten() + 1  # label j predicts token j + 1
        scored = [j for s, e in tokenized.targets for j in range(s, e)]
        assert trained.tolist() == scored  # every assistant turn, nothing else
        start = tokenized.targets[-1][0]
        assert tokenized.prompt_ids == sample["tokens"][:start].tolist()

    # A single-turn record's generation prompt is what generate --prompt-template chat feeds.
    single = CONVERSATIONS[2]
    out = generate_text(
        exported, single[0]["content"], GenerateOptions(max_new_tokens=3), prompt_template="chat"
    )
    assert out["prompt_ids"] == tokenize_example(exported.tokenizer, examples[2]).prompt_ids
    assert len(out["token_ids"]) <= 3

    # eval_exits' per-exit losses equal an independent masked cross-entropy of the training
    # samples through the HF model (exit k: hidden state k through the final norm and head).
    result = run_eval_exits(
        chat_export, messages_file, "messages", max_new_tokens=2, out=tmp_path / "r.json",
        device="cpu", dtype="float32", progress=False, batch_size=2, prompt_template="chat",
    )  # fmt: skip
    model = exported.model
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    mask = torch.stack([s["loss_mask"] for s in samples]).bool()
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    for record in result["records"]:
        k = record["layer"]
        if k == model.config.num_hidden_layers:
            logits = out.logits
        else:
            logits = model.lm_head(model.model.norm(out.hidden_states[k]))
        expected = F.cross_entropy(logits[mask], labels[mask])
        assert record["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert json.loads((tmp_path / "r.json").read_text())["params"]["prompt_template"] == "chat"


def test_chat_flags_need_a_chat_tokenizer(export_dir, messages_file, tmp_path):
    """The LLaMA-2 SentencePiece export has no chat template: refused, naming the flag."""
    with pytest.raises(ConfigError, match=r"--prompt-template=chat needs a Hugging Face"):
        run_eval_exits(
            export_dir, messages_file, "messages", out=tmp_path / "r.json", device="cpu",
            progress=False, prompt_template="chat",
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"--format messages needs --prompt-template chat"):
        load_eval_examples(messages_file, "messages")
    exported = load_exported_model(export_dir, device="cpu", dtype="float32")
    with pytest.raises(ConfigError, match=r"--prompt-template=chat needs"):
        generate_text(exported, "hi", GenerateOptions(max_new_tokens=1), prompt_template="chat")


def test_plain_template_with_an_hf_tokenizer_without_bos(chat_export, tmp_path):
    """Alpaca-template evaluation with a Qwen-style tokenizer: no BOS anywhere."""
    data = tmp_path / "alpaca.jsonl"
    data.write_text(json.dumps({"instruction": "What is 1 plus 1?", "output": "2"}) + "\n")
    tok = load_tokenizer(chat_export)
    (example,) = load_eval_examples(data, "alpaca")
    tokenized = tokenize_example(tok, example)
    assert tokenized.prompt_ids == tok.encode(example.prompt)  # no BOS
    assert tokenized.loss_ids[-1] == tok.eos_id


def test_text_without_bos_is_refused_for_generation_only(chat_export, tmp_path):
    data = tmp_path / "docs.txt"
    data.write_text("What is 1 plus 1? 2\n")
    kwargs = dict(out=tmp_path / "r.json", device="cpu", dtype="float32", progress=False)
    with pytest.raises(ConfigError, match=r"without BOS .* pass --max-new-tokens 0"):
        run_eval_exits(chat_export, data, "text", max_new_tokens=2, **kwargs)
    result = run_eval_exits(chat_export, data, "text", max_new_tokens=0, **kwargs)
    assert all(r["loss"] > 0 for r in result["records"])
