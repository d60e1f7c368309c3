"""The launcher end to end, as a user runs it (subprocesses, torchrun, MLflow read back)."""

from __future__ import annotations

import pytest

from tests.launcher_utils import launch, mlflow_metrics

pytestmark = pytest.mark.slow

COMMON = [
    "train.train_iters=4",
    "train.log_interval=1",
    "train.eval_interval=2",
    "train.lr_warmup_iters=1",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "data.seq_length=80",
]


def test_data_parallel_run_matches_single_rank_in_mlflow(tmp_path):
    """2 ranks (DP=2, gloo) vs 1 rank, same global batch: every exit's metric equal. The only
    difference is the order of the data-parallel gradient sum (fp32): rel 1e-5."""
    single, dp = tmp_path / "single", tmp_path / "dp2"
    assert launch([*COMMON, f"train.output_dir={single}"]).returncode == 0
    proc = launch([*COMMON, f"train.output_dir={dp}"], nproc=2)
    assert proc.returncode == 0
    ref, _, _ = mlflow_metrics(single)
    got, params, status = mlflow_metrics(dp)
    assert status == "FINISHED"
    assert params["model.num_layers"] == "4" and params["soft.mode"] == "soft"
    for k in (1, 2, 3, 4):
        for kind in ("train", "valid"):
            key = f"{kind}/loss/exit_{k}"
            assert [s for s, _ in got[key]] == [s for s, _ in ref[key]], key
            for (_, a), (_, b) in zip(got[key], ref[key], strict=True):
                assert a == pytest.approx(b, rel=1e-5), key
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4]
    for key in ("train/lr", "train/grad_norm", "perf/tokens_per_s", "memory/peak_gb"):
        assert key in got
    assert (dp / "checkpoints" / "latest").is_file()
    assert (dp / "config.yaml").is_file()
    assert "step 4/4" in proc.stderr + proc.stdout


def test_tp2_pp2_launcher_run_matches_single_rank_in_mlflow(tmp_path):
    """4 ranks, TP=2 x PP=2, exit 2 on the first stage (its own head replica): the metrics in
    MLflow equal a 1-rank run's (fp32; TP partial sums reorder additions: rel 1e-5)."""
    args = [*COMMON, "soft.exit_layers=[1,2,4]", "train.eval_interval=0"]
    single, tp_pp = tmp_path / "single", tmp_path / "tp2pp2"
    assert launch([*args, f"train.output_dir={single}"]).returncode == 0
    layout = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
    assert launch([*args, *layout, f"train.output_dir={tp_pp}"], nproc=4).returncode == 0
    ref, _, _ = mlflow_metrics(single)
    got, params, status = mlflow_metrics(tp_pp)
    assert status == "FINISHED" and params["parallel.pipeline_model_parallel_size"] == "2"
    keys = [f"{kind}/loss/exit_{k}" for kind in ("train", "valid") for k in (1, 2, 4)] + [
        "train/loss"
    ]
    for key in keys:
        assert [s for s, _ in got[key]] == [s for s, _ in ref[key]], key
        for (_, a), (_, b) in zip(got[key], ref[key], strict=True):
            assert a == pytest.approx(b, rel=1e-5), key
    for (_, a), (_, b) in zip(got["train/grad_norm"], ref["train/grad_norm"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)  # the head replica is counted once


def test_default_job_shows_every_exit_loss_falling(tmp_path):
    """The README's first command, shortened to 40 steps: every exit's loss falls."""
    proc = launch([f"train.output_dir={tmp_path}", "train.train_iters=40", "train.log_interval=5"])
    assert proc.returncode == 0
    history, _, status = mlflow_metrics(tmp_path)
    assert status == "FINISHED"
    for k in (1, 2, 3, 4):
        series = [v for _, v in history[f"train/loss/exit_{k}"]]
        assert series[-1] < series[0] - 1.0, (k, series)


def test_bad_config_fails_before_work_with_the_key_named(tmp_path):
    proc = launch([f"train.output_dir={tmp_path}", "soft.exit_layers=[2,3]", "expect_failure=1"])
    assert proc.returncode == 2
    assert "unknown config key 'expect_failure'" in proc.stderr
    proc = launch([f"train.output_dir={tmp_path}", "soft.exit_layers=[2,3]"])
    assert proc.returncode == 2
    assert "'soft.exit_layers': the last layer (4) must be an exit" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
