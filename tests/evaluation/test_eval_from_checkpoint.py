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


def test_eval_exits_on_megatron_checkpoint_matches_training_validation(tmp_path):
    from soft.data import build_datasets
    from soft.data.builtin import generate_records
    from soft.training.loop import run_training

    train, valid = tmp_path / "train.json", tmp_path / "valid.json"
    train.write_text(json.dumps(generate_records(1, 64)))
    # 8 records = eval_iters x global batch: the loop's validation covers each exactly once.
    valid.write_text(json.dumps(generate_records(2, 8, split="test")))
    single_rank_world()
    cfg = tiny_config(
        f"train.output_dir={tmp_path / 'run'}", "train.train_iters=3", "train.lr_warmup_iters=1",
        "train.eval_interval=0", "train.eval_iters=2", "tracking.enabled=false",
        f"data.train_path={train}", f"data.valid_path={valid}", "soft.exit_layers=[1,3,4]",
        "data.seq_length=96",  # nothing truncated: eval_exits scores whole samples
    )  # fmt: skip
    result = run_training(cfg)
    assert "0 truncated, 0 dropped" in build_datasets(cfg.data, cfg.train.seed)[1].describe()
    logged = result.valid_history[-1]

    spec = importlib.util.spec_from_file_location("eval_exits_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "eval.json"
    argv = ["--model-dir", str(tmp_path / "run" / "checkpoints"), "--data", str(valid), "--format", "alpaca",
            "--max-new-tokens", "0", "--out", str(out), "--no-progress"]  # fmt: skip
    assert tool.main(argv) == 0
    rows = {r["layer"]: r for r in json.loads(out.read_text())["exits"]}
    assert set(rows) == {1, 3, 4}  # the exits recorded in the exported config
    for k in (1, 3, 4):
        assert rows[k]["loss"] == pytest.approx(logged[f"exit_{k}"], rel=1e-4), k
