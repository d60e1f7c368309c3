"""eval_exits on a training run's megatron checkpoint (converted on the fly) reproduces the
per-exit validation losses the training loop logged on the same records: megatron's exits
(hooks on the pipeline stages) and the HF-side exits (hidden states through the exported
norm + head) are independent code paths. fp32 on CPU: rel 1e-4 (different attention and
matmul kernels, summation order)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.megatron_env import single_rank_world, tiny_config

TOOL = Path(__file__).resolve().parents[2] / "tools" / "eval_exits.py"


def _data(tmp_path: Path) -> tuple[Path, Path]:
    from soft.data.builtin import generate_records

    train, valid = tmp_path / "train.json", tmp_path / "valid.json"
    train.write_text(json.dumps(generate_records(1, 64)))
    # 8 records = eval_iters x global batch: the loop's validation covers each exactly once.
    valid.write_text(json.dumps(generate_records(2, 8, split="test")))
    return train, valid


def _train(tmp_path: Path, name: str, *overrides: str):
    from soft.training.cli import run_training

    train, valid = _data(tmp_path)
    single_rank_world()
    cfg = tiny_config(
        f"train.output_dir={tmp_path / name}", "train.train_iters=3", "train.lr_warmup_iters=1",
        "train.eval_interval=0", "train.eval_iters=2", "tracking.enabled=false",
        f"data.train_path={train}", f"data.valid_path={valid}", "soft.exit_layers=[1,3,4]",
        "data.seq_length=96",  # nothing truncated: eval_exits scores whole samples
        *overrides,
    )  # fmt: skip
    return cfg, run_training(cfg)


def _eval_tool(tmp_path: Path, run: str) -> dict:
    spec = importlib.util.spec_from_file_location("eval_exits_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / f"eval_{run}.json"
    argv = ["--model-dir", str(tmp_path / run / "checkpoints"), "--data", str(tmp_path / "valid.json"),
            "--format", "alpaca", "--max-new-tokens", "0", "--out", str(out), "--no-progress"]  # fmt: skip
    assert tool.main(argv) == 0
    return json.loads(out.read_text())


def test_eval_exits_on_megatron_checkpoint_matches_training_validation(tmp_path):
    from soft.data import build_datasets

    cfg, result = _train(tmp_path, "run")
    assert "0 truncated, 0 dropped" in build_datasets(cfg.data, cfg.train.seed)[1].describe()
    logged = result.valid_history[-1]
    rows = {r["layer"]: r for r in _eval_tool(tmp_path, "run")["exits"]}
    assert set(rows) == {1, 3, 4}  # the exits recorded in the exported config
    for k in (1, 3, 4):
        assert rows[k]["loss"] == pytest.approx(logged[f"exit_{k}"], rel=1e-4), k


def test_ict_checkpoint_evaluates_with_its_own_heads(tmp_path):
    """An ict run's checkpoint, exported on the fly, scores its early exits through the trained
    separate heads: the same losses its training loop logged (and not the shared head's)."""
    _, sft = _train(tmp_path, "sft", "soft.mode=sft")
    _, ict = _train(
        tmp_path, "ict", "soft.mode=ict", "train.lr=1e-2",
        f"checkpoint.load_dir={tmp_path / 'sft' / 'checkpoints'}", "checkpoint.finetune=true",
    )  # fmt: skip
    result = _eval_tool(tmp_path, "ict")
    assert result["params"]["exit_heads"] == [1, 3]
    rows = {r["layer"]: r for r in result["exits"]}
    logged, shared = ict.valid_history[-1], sft.valid_history[-1]
    for k in (1, 3, 4):
        assert rows[k]["loss"] == pytest.approx(logged[f"exit_{k}"], rel=1e-4), k
    for k in (1, 3):  # the heads trained away from the shared head
        assert abs(rows[k]["loss"] - shared[f"exit_{k}"]) > 1e-3, k
