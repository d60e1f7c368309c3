"""A fine-tune started from an HF import validates exactly what eval_exits measures on the
original HF folder: the training loop's per-exit validation loss (megatron-core's forward, the
SoFT exit hooks, the training data path with the import's own tokenizer files) against
eval_exits on the untouched HF folder (transformers' forward, the first k layers + final norm +
head), for the same records. This proves megatron's forward of each family, not only the
weight mapping; the families with the most moving parts:

- Qwen2 (q/k/v biases, tied embeddings), a ChatML tokenizer without BOS whose 640 tokens are
  fewer than the model's 704 rows, chat-template messages with the loss on assistant turns;
- LLaMA-3 (llama3 RoPE scaling, GQA), a byte-level BPE with BOS and no pad, Alpaca records.

fp32 on CPU: rel 1e-5 (the two forwards differ only in summation order; observed ~1e-7).
The vocabulary is a multiple of 8, as every real one is: the import then adds no padding rows
and megatron's softmax is transformers' (with padding rows it is not, and the import says so:
tests/conversion/test_hf_to_megatron.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soft.conversion import convert_hf_to_megatron
from soft.data.builtin import generate_conversations, generate_records
from soft.evaluation import run_eval_exits
from tests.conversion.helpers import make_family_model
from tests.megatron_env import single_rank_world, tiny_config

pytestmark = pytest.mark.slow

CASES = {
    # family, tokenizer, data format, prompt template
    "qwen2_tied": ("chatml", "messages", "chat"),
    "llama3": ("llama3", "alpaca", "alpaca"),
}
NUM_RECORDS = 8  # eval_iters x global batch: the loop's validation covers each exactly once


def _records(path: Path, fmt: str) -> Path:
    if fmt == "messages":
        rows = generate_conversations(3, NUM_RECORDS, turns=2, split="test")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(generate_records(3, NUM_RECORDS, split="test")))
    return path


def _loop_validation(meg: Path, data: Path, fmt: str, template: str, out: Path) -> dict:
    """Set up the fine-tune as the training command does and run the loop's validation."""
    from soft.training.run import setup, starting_state
    from soft.training.step import evaluate

    single_rank_world()
    cfg = tiny_config(
        f"checkpoint.load_dir={meg}", "checkpoint.finetune=true", f"train.output_dir={out}",
        f"data.tokenizer_path={meg}",  # the import carries the HF folder's tokenizer files
        f"data.format={fmt}", f"data.prompt_template={template}", f"data.train_path={data}",
        f"data.valid_path={data}", "data.seq_length=160", "soft.exit_layers=[1,2,3]",
        "train.eval_iters=2", "tracking.enabled=false", f"data.cache_dir={out.parent / 'cache'}",
    )  # fmt: skip
    run = setup(cfg)
    try:
        assert starting_state(run).iteration == 0  # the import's weights, loaded to fine-tune
        assert run.valid_data is not None and len(run.valid_data) == NUM_RECORDS
        assert "0 truncated, 0 dropped" in run.valid_data.describe()
        return evaluate(run.model, run.valid_data, cfg.train, run.topo.device).exit_losses
    finally:
        if run.lock is not None:
            run.lock.release()


@pytest.mark.parametrize("family", list(CASES))
def test_loop_validation_of_an_import_equals_eval_exits_on_the_hf_folder(
    family, tmp_path, hf_tokenizers
):
    tokenizer, fmt, template = CASES[family]
    hf = tmp_path / "hf"
    make_family_model(hf, family, vocab=704, seed=5)
    for file in hf_tokenizers[tokenizer].iterdir():  # the model folder holds its tokenizer
        (hf / file.name).write_bytes(file.read_bytes())
    meg = convert_hf_to_megatron(hf, tmp_path / "meg", dtype="fp32", progress=False)
    data = _records(tmp_path / f"valid.{'jsonl' if fmt == 'messages' else 'json'}", fmt)

    logged = _loop_validation(meg, data, fmt, template, tmp_path / "run")
    result = run_eval_exits(
        hf, data, fmt, max_new_tokens=0, out=tmp_path / "eval.json", device="cpu",
        dtype="float32", progress=False, batch_size=4, prompt_template=template,
    )  # fmt: skip
    measured = {r["layer"]: r["loss"] for r in result["records"]}
    assert set(measured) == {1, 2, 3}  # an HF folder without recorded exits: every layer
    for k in (1, 2, 3):
        assert measured[k] == pytest.approx(logged[k], rel=1e-5), k


def test_the_import_tokenizes_as_the_model_folder_does(tmp_path, hf_tokenizers):
    """A qwen2 model folder whose tokenizer_config.json names the generic backend loads as
    Qwen2Tokenizer (transformers reads config.json's model_type), which splits digits: the
    import's copy names that class, tokenizes the same, and both forms are accepted."""
    from soft.checkpointing.manifest import read_manifest
    from soft.data import load_tokenizer

    hf = tmp_path / "hf"
    make_family_model(hf, "qwen2_tied", vocab=704)
    for file in hf_tokenizers["chatml"].iterdir():
        (hf / file.name).write_bytes(file.read_bytes())
    meg = convert_hf_to_megatron(hf, tmp_path / "meg", dtype="fp32", progress=False)
    source, copy = load_tokenizer(hf), load_tokenizer(meg)
    assert source.class_name == copy.class_name == "Qwen2Tokenizer"
    text = "What is 12 plus 345?"
    assert copy.encode(text) == source.encode(text)
    manifest = read_manifest(meg / "iter_0000000")
    accepted = {f["sha256"] for f in [manifest["tokenizer"], *manifest["tokenizer_forms"]]}
    assert {source.sha256(), copy.sha256()} <= accepted
