"""A short SoFT job on multi-turn chat data with a Hugging Face tokenizer (ChatML, no BOS) and a
model vocabulary larger than the tokenizer's, as Qwen has: the launcher, 1 rank."""

from __future__ import annotations

import json

import pytest

from soft.data.builtin import generate_conversations
from tests.launcher_utils import launch, mlflow_metrics

pytestmark = pytest.mark.slow


def test_chat_job_trains_every_exit_and_refuses_another_tokenizer(tmp_path, hf_tokenizers):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_conversations(0, 400, turns=2)))
    out = tmp_path / "run"
    args = [
        "data.format=messages", "data.prompt_template=chat", f"data.train_path={data}",
        f"data.tokenizer_path={hf_tokenizers['chatml']}", "model.vocab_size=700",
        "data.seq_length=128", "train.train_iters=40", "train.log_interval=5",
        "train.eval_interval=20", f"data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    proc = launch([*args, f"train.output_dir={out}"])
    assert proc.returncode == 0
    log = proc.stdout + proc.stderr
    assert "tokens in the loss" in log
    history, params, status = mlflow_metrics(out)
    assert status == "FINISHED" and params["data.prompt_template"] == "chat"
    for k in (1, 2, 3, 4):
        series = [v for _, v in history[f"train/loss/exit_{k}"]]
        assert series[-1] < series[0] - 1.0, (k, series)
    manifest = json.loads((out / "checkpoints" / "iter_0000040" / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "hf"

    # Resuming with another tokenizer (same size, other content) is refused, naming both.
    other = hf_tokenizers["llama3"]
    proc = launch(
        [*args, f"data.tokenizer_path={other}", "train.train_iters=45", f"train.output_dir={out}"]
    )
    assert proc.returncode == 2
    assert "was trained with another tokenizer" in proc.stderr
    assert f"{hf_tokenizers['chatml']} (hf, 640 pieces" in proc.stderr
    assert f"{other} (hf, 640 pieces" in proc.stderr
