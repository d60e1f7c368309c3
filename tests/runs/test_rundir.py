"""The run folder: one writer at a time (soft.runs.lock) and its files (soft.runs.rundir)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from soft.runs import RunDir, RunFolderBusy, acquire
from soft.runs.lock import LOCK_FILE

HOLD = """
import sys, time
from pathlib import Path
from soft.runs import acquire
acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def _holder(folder):
    """Another process that takes the folder's lock and keeps it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_job_is_refused_naming_the_holder(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunFolderBusy) as err:
            acquire(tmp_path / "run")
        message = str(err.value)
        assert f"pid {holder.pid}" in message and "host" in message and "started" in message
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_job_is_taken_over_and_its_holder_reported(tmp_path):
    holder = _holder(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = acquire(tmp_path / "run")
    try:
        assert lock.previous["pid"] == holder.pid
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    # A lock released at a normal end is empty: the next job finds no dead holder.
    again = acquire(tmp_path / "run")
    assert again.previous is None
    again.release()


def test_a_process_may_take_its_own_lock_twice(tmp_path):
    first = acquire(tmp_path / "run")
    assert acquire(tmp_path / "run") is first
    first.release()


def test_logs_keep_each_step_once_after_a_resume(tmp_path):
    run_dir = RunDir.of(tmp_path)
    for it in (1, 2, 3, 4, 5):
        run_dir.append("train_log.jsonl", {"iteration": it, "loss": float(it)})
    with open(tmp_path / "train_log.jsonl", "a") as f:
        f.write('{"iteration": 6, "lo')  # a kill mid-write
    run_dir.truncate_logs(3)  # the job resumes from the checkpoint of step 3
    assert [r["iteration"] for r in run_dir.read_log("train_log.jsonl")] == [1, 2, 3]
    run_dir.append("train_log.jsonl", {"iteration": 4, "loss": 4.5})
    assert [r["loss"] for r in run_dir.read_log("train_log.jsonl")] == [1.0, 2.0, 3.0, 4.5]


def test_start_over_moves_the_earlier_run_aside(tmp_path):
    run_dir = RunDir.of(tmp_path / "run")
    (run_dir.save_dir / "iter_0000002").mkdir(parents=True)
    run_dir.append("train_log.jsonl", {"iteration": 2})
    (run_dir.root / "mlflow_run_id").write_text("abc\n")
    (run_dir.root / "mlflow.db").write_text("shared by both runs")
    moved = run_dir.move_aside()
    assert sorted(p.name for p in moved.iterdir()) == [
        "checkpoints",
        "mlflow_run_id",
        "train_log.jsonl",
    ]
    assert (moved / "checkpoints" / "iter_0000002").is_dir()
    assert (run_dir.root / "mlflow.db").exists() and run_dir.earlier_run_files() == []
    assert run_dir.move_aside() is None
