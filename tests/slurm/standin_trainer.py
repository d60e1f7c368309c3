"""Stand-in for launchers/pretrain_soft.py in the SLURM signal tests (no model, fast start).

Usage (as torchrun's script):
    standin_trainer.py [--config CONFIG] train.output_dir=DIR train.train_iters=N
It follows the real loop's contract: SIGUSR1/SIGTERM -> all ranks agree to stop after the current
step -> "checkpoint" (a counter file) -> exit_status.json {"reason": "signal"} -> exit 0; a new run
resumes from the counter. Every completed step is appended to DIR/steps.log as
"<SLURM_RESTART_COUNT> <iteration>" so a test can check that no step is lost or repeated.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from soft.runs.status import write_stop_status

STEP_SECONDS = 0.2
stop_requested = False


def _on_signal(signum: int, frame: object) -> None:
    # Only set a flag (idempotent: the batch script may re-send the signal).
    global stop_requested
    stop_requested = True


def _overrides(argv: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in argv if "=" in arg)


def main() -> int:
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGUSR1, signal.SIGTERM)}
    opts = _overrides(sys.argv[1:])  # the launcher's CLI; --config is accepted and unused
    out = Path(opts["train.output_dir"])
    total = int(opts["train.train_iters"])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    counter = out / "counter"
    start = int(counter.read_text()) if counter.is_file() else 0
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    if rank == 0:
        # Tells the test that handlers are installed and the loop runs (safe to signal now).
        (out / f"running.{restart}").write_text(str(start))
    for iteration in range(start, total):
        time.sleep(STEP_SECONDS)
        if rank == 0:
            with open(out / "steps.log", "a") as f:
                f.write(f"{restart} {iteration}\n")
        # Ranks may see the signal at different steps: stop where any rank saw it.
        flag = torch.tensor([1 if stop_requested else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            # Like soft.training.signals.StopRequest.close(): back to the inherited "ignored"
            # (a Python handler left in place becomes SIG_DFL at exit: a late re-sent signal
            # would then kill the rank).
            for s, handler in previous.items():
                signal.signal(s, handler)
            if rank == 0:
                counter.write_text(str(iteration + 1))
                write_stop_status(out, "signal", iteration + 1)
            dist.barrier()
            dist.destroy_process_group()
            return 0
    if rank == 0:
        counter.write_text(str(total))
        write_stop_status(out, "finished", total)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
