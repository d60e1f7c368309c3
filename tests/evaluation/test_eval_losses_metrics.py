"""Per-exit losses vs plain transformers, exact match, and the eval-file reader."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import tiny_llama

from soft.config.errors import InputError
from soft.data.prompts import alpaca_prompt, triviaqa_prompt
from soft.evaluation import exact_match, exit_nll, load_eval_examples, normalize_answer


def _reference_losses(model, ids: list[int], num_target: int) -> dict[int, float]:
    """Independent: full logits, norm + head by hand on every hidden state, masked mean CE."""
    x = torch.tensor([ids])
    labels = x.clone()
    labels[0, : len(ids) - num_target] = -100
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    losses = {}
    num_layers = model.config.num_hidden_layers
    for k in range(1, num_layers + 1):
        logits = (
            out.logits if k == num_layers else model.lm_head(model.model.norm(out.hidden_states[k]))
        )
        losses[k] = F.cross_entropy(
            logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="mean"
        ).item()
    return losses


def _manual_last_layer_logits(model, ids: list[int]) -> torch.Tensor:
    """The last exit computed layer by layer, to pin down what hidden_states[-1] means."""
    x = torch.tensor([ids])
    with torch.no_grad():
        hidden = model.model.embed_tokens(x)
        positions = torch.arange(len(ids))[None]
        rope = model.model.rotary_emb(hidden, positions)
        for layer in model.model.layers:
            hidden = layer(
                hidden, attention_mask=None, position_embeddings=rope, position_ids=positions
            )
        return model.lm_head(model.model.norm(hidden))


def test_exit_losses_equal_plain_transformers():
    model = tiny_llama(seed=7, vocab=500, kv_heads=2)
    ids = [1, 17, 230, 41, 99, 7, 402, 55, 2]
    num_target = 4
    ours = exit_nll(model, ids, num_target, list(range(1, 7)))
    ref = _reference_losses(model, ids, num_target)
    for k in range(1, 7):
        nll, count = ours[k]
        assert count == num_target
        assert nll / count == pytest.approx(ref[k], rel=1e-5)
    assert len({round(v, 4) for v in ref.values()}) == 6  # exits really differ

    # The last exit uses the model's own (already normed) logits, not norm(norm(h)).
    manual = _manual_last_layer_logits(model, ids)[0, -num_target - 1 : -1]
    manual_loss = F.cross_entropy(manual, torch.tensor(ids[-num_target:]), reduction="mean").item()
    assert ours[6][0] / num_target == pytest.approx(manual_loss, rel=1e-5)


@pytest.mark.parametrize(
    ("prediction", "aliases", "strict", "normalized"),
    [
        ("Sinclair Lewis", ["Harry Sinclair Lewis", "Sinclair Lewis"], True, True),
        (
            " Sinclair Lewis ",
            ["Sinclair Lewis"],
            True,
            True,
        ),  # generated answers start with a space
        ("sinclair lewis", ["Sinclair Lewis"], False, True),  # case: paper EM is case-sensitive
        ("Sinclair Lewis.", ["Sinclair Lewis"], False, True),  # punctuation
        ("The Beatles", ["Beatles"], False, True),  # articles
        ("York,  England", ["York, England"], False, True),  # whitespace
        ("Paris", ["London", "Londres"], False, False),
        ("", ["Paris"], False, False),
    ],
)
def test_exact_match(prediction, aliases, strict, normalized):
    assert exact_match(prediction, aliases) is strict
    assert exact_match(prediction, aliases, normalized=True) is normalized


def test_normalize_answer():
    assert normalize_answer("  The  U.S.A.!  ") == "usa"
    assert normalize_answer("an Apple a day") == "apple day"


def test_reader_formats(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Add.", "input": "1+1", "output": "2"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]))  # fmt: skip
    examples = load_eval_examples(alpaca, "alpaca")
    assert examples[0].prompt == alpaca_prompt("Add.", "1+1") and examples[0].target == "2"
    assert examples[1].prompt == alpaca_prompt("Say hi.")

    trivia = tmp_path / "t.jsonl"
    trivia.write_text(
        json.dumps(
            {"question_id": 0, "turns": ["Capital of France?"], "answer": ["Paris", "paris"]}
        )
        + "\n\n"
        + json.dumps({"question": "2+2?", "answer": {"aliases": ["4", "four"]}})
        + "\n"
    )
    examples = load_eval_examples(trivia, "triviaqa", limit=5)
    assert examples[0].prompt == triviaqa_prompt("Capital of France?")
    assert examples[0].target == " Paris" and examples[0].answers == ["Paris", "paris"]
    assert examples[1].answers == ["4", "four"]

    text = tmp_path / "d.txt"
    text.write_text("first doc\n\nsecond doc\n")
    assert [e.target for e in load_eval_examples(text, "text")] == ["first doc", "second doc"]
    assert load_eval_examples(text, "text", limit=1)[0].prompt == ""


def test_real_triviaqa_file(shared_data):
    examples = load_eval_examples(
        shared_data / "triviaqa" / "triviaqa_rc_train_0-1499.jsonl", "triviaqa", limit=3
    )
    assert len(examples) == 3 and "Sinclair Lewis" in examples[0].answers


@pytest.mark.parametrize(
    ("name", "content", "fmt", "message"),
    [
        ("empty.json", "", "alpaca", "no records"),
        ("empty_list.json", "[]", "alpaca", "no records"),
        ("blank.jsonl", "\n\n", "triviaqa", "no records"),
        ("bad.json", '[{"instruction": "x"}]', "alpaca", "'output'"),
        ("bad.jsonl", '{"turns": ["q"]}\n', "triviaqa", "'answer'"),
        ("broken.jsonl", "{not json\n", "triviaqa", "line 1"),
    ],
)
def test_reader_errors(tmp_path, name, content, fmt, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_eval_examples(path, fmt)


def test_reader_missing_file_and_bad_format(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_eval_examples(tmp_path / "nope.jsonl", "text")
    with pytest.raises(InputError, match="--format"):
        load_eval_examples(tmp_path / "nope.jsonl", "csv")


def test_reader_takes_dataset_folders_like_training(tmp_path):
    """--data accepts what data.train_path does: a hub-schema TriviaQA split in a saved folder
    gives the same examples as the export's JSONL file; a bad row names dataset and row."""
    from soft.data.sources import import_datasets

    rows = [
        {
            "question": "Capital of France?",
            "answer": {"aliases": ["Paris", "paris"], "value": "Paris"},
        },
        {"question": "2+2?", "answer": {"aliases": ["4", "four"], "value": "4"}},
    ]
    datasets = import_datasets()
    folder = tmp_path / "tqa"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    by_name = load_eval_examples(f"{folder}?split=validation", "triviaqa")
    as_file = tmp_path / "t.jsonl"
    as_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert by_name == load_eval_examples(as_file, "triviaqa")
    assert len(load_eval_examples(f"{folder}?split=validation", "triviaqa", limit=1)) == 1
    bad = tmp_path / "bad"
    datasets.Dataset.from_list(
        [{"question": "q?", "answer": {"aliases": [], "value": None}}]
    ).save_to_disk(str(bad))
    with pytest.raises(
        InputError, match=r"dataset '.*bad' \(split 'train'\), row 0: field 'answer'"
    ):
        load_eval_examples(bad, "triviaqa")
