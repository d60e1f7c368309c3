"""End to end on the test cluster: launchers/slurm/pretrain_soft.sbatch runs the real launcher
(tiny default config, 2 data-parallel ranks on CPU) to completion, and a preempted job
(SIGUSR1 -> checkpoint -> requeue -> resume) gives the uninterrupted loss curve in one MLflow
run, with every step recorded exactly once."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = REPO_ROOT / "launchers" / "slurm" / "pretrain_soft.sbatch"
ITERS = 24
OVERRIDES = [
    f"train.train_iters={ITERS}",
    "train.log_interval=1",
    "train.eval_interval=8",
    "train.lr_warmup_iters=2",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "data.seq_length=80",
]

# No skip when the launcher is missing: a moved launcher must fail the SLURM job, not hide it.
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _submit(cluster, log_dir: Path, output_dir: Path) -> str:
    env = {"SOFT_PYTHON": sys.executable, "SOFT_NPROC_PER_NODE": "2", "PYTHONWARNINGS": "ignore"}
    return cluster.sbatch(
        f"--output={log_dir}/%x-%j.out", "--job-name=soft-e2e", "--cpus-per-task=2",
        str(SBATCH_SCRIPT), "configs/default.yaml", f"train.output_dir={output_dir}", *OVERRIDES,
        env=env, cwd=REPO_ROOT,
    )  # fmt: skip


def _mlflow(output_dir: Path) -> tuple[object, dict[str, list[tuple[int, float]]], list[str]]:
    """(run, {key: [(step, value), ...]}, artifact paths) of the run recorded in output_dir."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'mlflow.db'}")
    run = client.get_run((output_dir / "mlflow_run_id").read_text().strip())
    history = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    runs = client.search_runs([run.info.experiment_id])
    assert len(runs) == 1, "a requeued job must reopen its run, not create another"
    return run, history, artifacts


def _exit_keys(history: dict) -> list[str]:
    return sorted(k for k in history if k.startswith(("train/loss/exit_", "valid/loss/exit_")))


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted job; its output directory."""
    tmp = tmp_path_factory.mktemp("slurm-e2e-ref")
    out = tmp / "run"
    job_id = _submit(slurm_cluster, tmp, out)
    info = slurm_cluster.wait_job(job_id, timeout=360)
    log = (tmp / f"soft-e2e-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", (info, log[-5000:])
    return out


@pytest.mark.timeout(420)
def test_job_trains_checkpoints_and_tracks(reference_run: Path) -> None:
    out = reference_run
    assert json.loads((out / "exit_status.json").read_text()) == {
        "reason": "finished",
        "iteration": ITERS,
    }
    assert (out / "checkpoints" / "latest").is_file()
    assert (out / "checkpoints" / f"iter_{ITERS:07d}").is_dir()
    run, history, artifacts = _mlflow(out)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.train_iters"] == str(ITERS)
    train_exits = [k for k in _exit_keys(history) if k.startswith("train/")]
    assert len(train_exits) == 4, train_exits  # the tiny model: every one of 4 layers is an exit
    for key in train_exits:
        assert [s for s, _ in history[key]] == list(range(1, ITERS + 1)), key
    assert {"config.yaml", "exit_losses.png"} <= set(artifacts)


@pytest.mark.timeout(600)
def test_preempted_job_requeues_resumes_and_matches(
    slurm_cluster, reference_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    job_id = _submit(slurm_cluster, tmp_path, out)
    log = tmp_path / f"soft-e2e-{job_id}.out"

    # Preempt once training is under way: what --signal=B:USR1@N does near the time limit.
    train_log = out / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while not (train_log.is_file() and len(train_log.read_text().splitlines()) >= 2):
        info = slurm_cluster.job(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING"), (info, log.read_text()[-5000:])
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    deadline = time.monotonic() + 120
    while not (
        (info := slurm_cluster.job(job_id))["JobState"] == "PENDING" and info["Restarts"] == "1"
    ):
        assert info["JobState"] in ("RUNNING", "COMPLETING"), (info, log.read_text()[-5000:])
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    status = json.loads((out / "exit_status.json").read_text())
    assert status["reason"] == "signal"
    assert 0 < status["iteration"] < ITERS, "the signal should stop the job part-way"
    assert (out / "checkpoints" / f"iter_{status['iteration']:07d}").is_dir()
    slurm_cluster.start_requeued_now(job_id)

    info = slurm_cluster.wait_job(job_id, timeout=360)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", (info, text[-5000:])
    assert "requeueing" in text and "resuming from" in text, text[-5000:]
    assert json.loads((out / "exit_status.json").read_text())["reason"] == "finished"

    run, history, _ = _mlflow(out)
    _, reference, _ = _mlflow(reference_run)
    assert run.info.status == "FINISHED"
    assert _exit_keys(history) == _exit_keys(reference)
    for key in _exit_keys(reference):
        steps = [s for s, _ in history[key]]
        assert steps == [s for s, _ in reference[key]], f"{key}: a step was lost or repeated"
        for (step, got), (_, want) in zip(history[key], reference[key], strict=True):
            assert got == pytest.approx(want, rel=1e-5), (key, step)
