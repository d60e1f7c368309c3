"""Faults injected into real training jobs; each promise of README's "What survives what".

Most scenarios run in the harness tests/training/faults.py (one warm process forking the
jobs); the ones that need torchrun itself (how it tears a job down when a rank dies, how
signals reach its workers) launch it here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.launcher_utils import mlflow_metrics, run_harness

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SCENARIOS = [
    "kill_at_save_files_written",
    "kill_at_save_manifest_written",
    "kill_at_save_renamed",
    "kill_at_save_latest_written",
    "kill_at_train_step_done",
    "double_save",
    "nonfinite_stop",
    "nonfinite_policies",
    "fp16_overflow",
    "corrupted_checkpoints",
    "changed_config_on_resume",
    "one_writer_per_folder",
    "nothing_written_on_bad_input",
    "full_disk",
    "kill_all_ranks_during_save",
    "interval_average_after_resume",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("faults")
    return run_harness("tests.training.faults", out, *SCENARIOS, timeout=1800)


@pytest.mark.parametrize("name", SCENARIOS)
def test_fault_scenario(report, name):
    result = report[name]
    if result.get("skipped"):
        pytest.skip(result["skipped"])
    assert result["ok"], result.get("error")


def test_the_harness_lists_every_scenario():
    from tests.training import faults

    assert sorted(faults.SCENARIOS) == sorted(SCENARIOS)


# ----------------------------------------------------------------------------- under torchrun


def _torchrun(out: Path, *overrides: str) -> subprocess.Popen:
    skip = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(REPO / "launchers/pretrain_soft.py"), f"train.output_dir={out}",
        "train.train_iters=100000", "train.log_interval=1", "checkpoint.save_interval=5",
        "train.micro_batch_size=2", "train.global_batch_size=4", "data.seq_length=64",
        *overrides,
    ]  # fmt: skip
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _workers(agent: subprocess.Popen) -> dict[int, psutil.Process]:
    """rank -> worker process of a torchrun agent."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            found = {
                int(p.environ()["RANK"]): p
                for p in psutil.Process(agent.pid).children(recursive=True)
                if "RANK" in p.environ() and "pretrain_soft.py" in " ".join(p.cmdline())
            }
        except psutil.NoSuchProcess:
            found = {}
        if len(found) == 2:
            return found
        time.sleep(0.5)
    raise AssertionError("torchrun did not start 2 workers")


def _wait_for_steps(out: Path, agent: subprocess.Popen, steps: int) -> None:
    deadline = time.monotonic() + 240
    log = out / "train_log.jsonl"
    while not (log.is_file() and len(log.read_text().splitlines()) >= steps):
        assert agent.poll() is None, (out.parent / f"{out.name}.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no training progress"
        time.sleep(0.2)


def _alive(out: Path) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(out) in cmdline and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{p.info['pid']}: {cmdline[:120]}")
    return found


def _leftovers(out: Path, patience: float = 10) -> list[str]:
    """Processes of the job (workers, checkpoint helpers) still alive after `patience` s.

    A helper gets its parent-death SIGKILL the moment its rank dies, but on a loaded 2-core
    machine it can take a moment to be gone (CI once saw one a few ms after the kill); an
    orphan that outlives the job stays for good, so a short wait tells the two apart."""
    deadline = time.monotonic() + patience
    while (found := _alive(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def _agent_exit_seconds(agent: subprocess.Popen, since: float, limit: float = 60) -> float:
    agent.wait(timeout=limit)
    return time.monotonic() - since


def test_a_dead_rank_stops_the_others_within_seconds(tmp_path):
    """kill -9 of rank 1 mid-training: rank 0 fails (gloo notices the reset connection) or,
    sent SIGTERM by torchrun while blocked, leaves through its watchdog; either way the job
    is over within seconds, MLflow says FAILED or KILLED, and no helper process (the
    checkpoint-queue server used to survive as a 300-470 MB orphan) outlives it."""
    out = tmp_path / "run"
    agent = _torchrun(out)
    try:
        workers = _workers(agent)
        _wait_for_steps(out, agent, 12)
        killed_at = time.monotonic()
        workers[1].kill()
        seconds = _agent_exit_seconds(agent, killed_at)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert seconds < 20, f"torchrun took {seconds:.1f} s to end the job"
    assert _leftovers(out) == []
    _, _, status = mlflow_metrics(out)
    reason = json.loads((out / "exit_status.json").read_text())["reason"]
    assert (status, reason) in {("FAILED", "failed"), ("KILLED", "killed")}, (status, reason)


def test_a_rank_blocked_on_a_stuck_peer_leaves_after_its_grace(tmp_path):
    """Rank 1 stuck (SIGSTOP: its connections stay open, so no collective ever fails) and a
    SIGTERM for the job: rank 0 cannot reach the end of its step, so its watchdog gives up
    after the grace (at least 5 s), marks MLflow KILLED and writes exit_status 'killed'.
    Before, it waited in the collective until torchrun's SIGKILL, MLflow left RUNNING."""
    out = tmp_path / "run"
    agent = _torchrun(out)
    workers: dict[int, psutil.Process] = {}
    try:
        workers = _workers(agent)
        _wait_for_steps(out, agent, 12)
        workers[1].suspend()
        time.sleep(1)  # rank 0 reaches a collective that waits for rank 1
        signalled_at = time.monotonic()
        workers[0].send_signal(signal.SIGTERM)
        workers[0].wait(timeout=60)
        seconds = time.monotonic() - signalled_at
    finally:
        for worker in workers.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()  # the stopped rank too: SIGKILL ends a stopped process
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
    assert _leftovers(out) == []
    assert 4 < seconds < 15, f"rank 0 left {seconds:.1f} s after SIGTERM"
    assert json.loads((out / "exit_status.json").read_text())["reason"] == "killed"
    _, _, status = mlflow_metrics(out)
    assert status == "KILLED"


@pytest.mark.parametrize("how", ["SIGTERM to the workers", "SIGINT to the process group"])
def test_a_stop_signal_saves_and_marks_the_run_killed(tmp_path, how):
    """scancel (SIGTERM to every task) or Ctrl-C (SIGINT to the terminal's process group): the
    ranks finish the step, save it, and stop; MLflow says KILLED, not FINISHED."""
    out = tmp_path / "run"
    agent = _torchrun(out)
    try:
        workers = _workers(agent)
        _wait_for_steps(out, agent, 8)
        if how.startswith("SIGTERM"):
            for worker in workers.values():
                worker.send_signal(signal.SIGTERM)
        else:
            os.killpg(agent.pid, signal.SIGINT)
        agent.wait(timeout=120)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    status = json.loads((out / "exit_status.json").read_text())
    assert status["reason"] == "signal", (out.parent / "run.log").read_text()[-3000:]
    assert (out / "checkpoints" / f"iter_{status['iteration']:07d}" / "manifest.json").is_file()
    _, _, mlflow_status = mlflow_metrics(out)
    assert mlflow_status == "KILLED"
    assert _leftovers(out) == []
