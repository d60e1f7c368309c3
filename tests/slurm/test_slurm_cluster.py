"""Jobs on the real one-node test cluster (fixture in conftest.py): a trivial job, and the
project's batch script with a stand-in trainer: SIGUSR1 -> checkpoint -> requeue -> resume."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from soft.runs.status import STOP_STATUS_FILE

REPO_ROOT = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = REPO_ROOT / "launchers" / "slurm" / "pretrain_soft.sbatch"
STANDIN = Path(__file__).with_name("standin_trainer.py")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _wait_for_file(path: Path, cluster, job_id: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        info = cluster.job(job_id)
        if info.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job_id} ended before {path.name} appeared: {info}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_trivial_job_completes(slurm_cluster, tmp_path: Path) -> None:
    assert slurm_cluster.startup_seconds < 60
    job_id = slurm_cluster.sbatch(
        f"--output={tmp_path}/%x-%j.out", "--job-name=hello", "--wrap",
        "echo hello from job $SLURM_JOB_ID on $SLURMD_NODENAME",
    )  # fmt: skip
    info = slurm_cluster.wait_job(job_id, timeout=60)
    assert info["JobState"] == "COMPLETED", info
    assert info["ExitCode"] == "0:0"
    log = (tmp_path / f"hello-{job_id}.out").read_text()
    assert f"hello from job {job_id} on localhost" in log


@pytest.mark.timeout(300)
def test_sigusr1_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path: Path) -> None:
    """The batch script's torchrun path (2 ranks, c10d rendezvous) with a stand-in trainer.

    `scancel --batch --signal=USR1` delivers exactly what `#SBATCH --signal=B:USR1@N` delivers
    near the time limit (the real timer needs minutes). Expected: the ranks stop together and
    write exit_status.json reason=signal, the script requeues, the second run resumes from the
    "checkpoint" and finishes; every iteration runs exactly once.
    """
    out = tmp_path / "run"
    out.mkdir()
    config = tmp_path / "tiny.yaml"
    config.write_text("train:\n  train_iters: 30\n")
    total = 30
    env = {
        "SOFT_PYTHON": sys.executable,
        "SOFT_ENTRYPOINT": str(STANDIN.relative_to(REPO_ROOT)),
        "SOFT_NPROC_PER_NODE": "2",
        # Re-send SIGUSR1 every second until the ranks exit: repeated signals must be harmless.
        "SOFT_SIGNAL_RESEND_S": "1",
    }
    job_id = slurm_cluster.sbatch(
        f"--output={tmp_path}/%x-%j.out", "--cpus-per-task=2", str(SBATCH_SCRIPT),
        str(config), f"train.output_dir={out}", f"train.train_iters={total}",
        env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    log = tmp_path / f"soft-pretrain-{job_id}.out"

    # First run: wait until the ranks have their handlers and are stepping, then "preempt".
    _wait_for_file(out / "running.0", slurm_cluster, job_id)
    time.sleep(1.0)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    # The script requeues the job: pending again with one restart.
    deadline = time.monotonic() + 60
    while True:
        info = slurm_cluster.job(job_id)
        if info.get("Restarts") == "1" and info.get("JobState") == "PENDING":
            break
        assert info.get("JobState") in ("RUNNING", "COMPLETING", "PENDING"), (info, log.read_text())
        assert time.monotonic() < deadline, (info, log.read_text())
        time.sleep(0.2)
    slurm_cluster.start_requeued_now(job_id)

    info = slurm_cluster.wait_job(job_id, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", (info, text)
    assert info["Restarts"] == "1"
    assert "SIGUSR1" in text and "requeueing" in text and "training finished" in text, text
    assert '"reason": "finished"' in (out / STOP_STATUS_FILE).read_text()

    steps = [line.split() for line in (out / "steps.log").read_text().splitlines()]
    iterations = [int(it) for _, it in steps]
    assert iterations == list(range(total)), "an iteration was lost or repeated"
    first_run = [int(it) for run, it in steps if run == "0"]
    assert 0 < len(first_run) < total, "the signal should stop the first run part-way"
    assert (out / "running.1").read_text() == str(len(first_run)), "second run resumes after it"
