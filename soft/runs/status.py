"""`<train.output_dir>/exit_status.json`, the stop status: why the training processes stopped.

Written atomically by rank 0 as the job ends (by the lowest live rank on rank 0's host when
rank 0 itself died; soft.training.ending has the whole table with the MLflow statuses):
  {"reason": "finished", "iteration": N}        reached train.train_iters, checkpoint saved
  {"reason": "signal", "iteration": N}          SIGUSR1/SIGTERM/SIGINT: stopped after a step, saved
  {"reason": "exit_interval", "iteration": N}   stopped after train.exit_interval steps, saved
  {"reason": "nonfinite", "iteration": N, "detail": "..."}  a NaN/inf loss, gradient or
                                                 validation loss: stopped, nothing saved after
                                                 the last good checkpoint
  {"reason": "failed", "iteration": N, "detail": "..."}     any other error (naming a rank that
                                                 is gone, when one is)
  {"reason": "killed", "iteration": N, "detail": "..."}     a stop that could not finish (no
                                                 progress within the grace, or a second stop
                                                 signal): left without saving; the detail says
                                                 what the rank was doing and what it saw
The SLURM batch script reads it to decide whether to requeue the job (signal, exit_interval).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

# The file keeps its first name: batch scripts and users' tooling read it.
STOP_STATUS_FILE = "exit_status.json"
Reason = Literal["signal", "exit_interval", "finished", "nonfinite", "failed", "killed"]
MAX_DETAIL = 2000  # characters of the error kept (a traceback's worth of message, no more)
REASONS: tuple[str, ...] = ("signal", "exit_interval", "finished", "nonfinite", "failed", "killed")


def write_stop_status(
    output_dir: str | Path, reason: Reason, iteration: int, detail: str | None = None
) -> Path:
    """Write the file atomically (tmp + rename): the batch script must never read half a file."""
    if reason not in REASONS:
        raise ValueError(f"exit reason must be one of {REASONS}, got {reason!r}")
    path = Path(output_dir) / STOP_STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, object] = {"reason": reason, "iteration": int(iteration)}
    if detail:
        record["detail"] = detail[:MAX_DETAIL]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)
    return path


def read_stop_reason(output_dir: str | Path) -> str:
    """One of REASONS; 'missing' when there is no file, 'invalid' when it is unreadable."""
    path = Path(output_dir) / STOP_STATUS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError):
        return "invalid"
    reason = data.get("reason") if isinstance(data, dict) else None
    return reason if reason in REASONS else "invalid"


def clear_stop_status(output_dir: str | Path) -> None:
    """Remove a previous job's file, so a crash before the next write is not read as stale."""
    (Path(output_dir) / STOP_STATUS_FILE).unlink(missing_ok=True)
