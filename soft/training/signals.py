"""Stop requests: finish the step, save, stop; and a deadline for when that cannot happen.

SIGUSR1 (SLURM's advance warning: the batch script asks for it before the time limit),
SIGTERM (scancel, a preemption, torchrun tearing the job down) and SIGINT (Ctrl-C) mark a stop
request on the rank that got them; every rank agrees on it after each step (one all-reduce),
then all save together and stop.

A stop cannot happen when a peer rank is gone or stuck: the survivors sit in a collective that
never completes (gloo and NCCL notice a dead peer only sometimes, and a stuck one only at
their timeout, minutes away). Python runs signal handlers on the main thread between
bytecodes, so while that thread waits inside a collective no handler runs at all. torchrun
answers a dead rank with SIGTERM to the others and SIGKILL 30 s later, which left MLflow
showing RUNNING and the checkpoint helpers orphaned.

So the signals are read by a watcher thread as well, through `signal.set_wakeup_fd` (Python's
C-level handler writes each signal's number there at once, whatever the main thread is doing).
SIGTERM and SIGINT start a deadline: a rank that has not stopped within it (a few times the
longest step plus save seen so far, at least MIN_GRACE_S) runs the cleanups it was given (mark
the MLflow run KILLED, write exit_status.json, stop helper processes) and leaves with exit
status 128 + signal. A second SIGINT (more than REPEAT_WINDOW_S after the first: torchrun
forwards the terminal's Ctrl-C, so each worker gets it twice at once) gives up at once. SIGUSR1 is a request made in advance and
has no deadline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

log = logging.getLogger("soft")
MIN_GRACE_S = 5.0
GRACE_FACTOR = 3.0
REPEAT_WINDOW_S = 1.0


def _ignore(signum, frame) -> None:
    """The Python-level handler: installed so that the signals do not kill the process; the
    watcher thread does the work (it also runs while the main thread is blocked)."""


class StopRequest:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
    URGENT = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._cleanups: list[Callable[[], None]] = []
        self._longest_s = 0.0
        self._first_sigint = 0.0
        self._timer: threading.Timer | None = None
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous = {s: signal.signal(s, _ignore) for s in self.SIGNALS}
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="soft-stop-watcher", daemon=True)
        self._watcher.start()

    # -- the loop reports progress and registers what must happen if it never stops ---------

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def observed(self, seconds: float) -> None:
        """The duration of a step (+ save) just done: the deadline scales with it."""
        self._longest_s = max(self._longest_s, seconds)

    @property
    def grace_s(self) -> float:
        return max(MIN_GRACE_S, GRACE_FACTOR * self._longest_s)

    # -- signals -----------------------------------------------------------------------------

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:
                return  # restore() closed the pipe
            for signum in data:
                if signum in self.SIGNALS:
                    self._received(signum)

    def _received(self, signum: int) -> None:
        # A second Ctrl-C gives up at once; but one Ctrl-C reaches a worker twice, from the
        # terminal (its process group) and forwarded by torchrun: repeats within
        # REPEAT_WINDOW_S are the same request.
        now = time.monotonic()
        again = (
            self.received == signal.SIGINT
            and signum == signal.SIGINT
            and now - self._first_sigint > REPEAT_WINDOW_S
        )
        if signum == signal.SIGINT and self.received != signal.SIGINT:
            self._first_sigint = now
        self.received = signum
        if again:
            self._give_up(signum, "a second SIGINT")
        elif signum in self.URGENT and self._timer is None:
            self._timer = threading.Timer(self.grace_s, self._give_up, (signum, None))
            self._timer.daemon = True
            self._timer.start()

    def _give_up(self, signum: int, why: str | None) -> None:
        why = why or (
            f"not stopped {self.grace_s:.0f} s after {signal.Signals(signum).name}: a peer rank "
            "is gone or stuck"
        )
        rank = dist.get_rank() if dist.is_initialized() else 0
        log.error(
            "rank %d: %s; leaving without a checkpoint (the last one stays latest)", rank, why
        )
        for cleanup in self._cleanups:
            try:
                cleanup()
            except Exception as exc:  # each cleanup is best effort; the exit must happen
                log.error("cleanup %s failed: %s", getattr(cleanup, "__name__", cleanup), exc)
        logging.shutdown()
        os._exit(128 + signum)

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank when any rank was signalled."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        """The job has ended (stopped, finished or raised): cancel the deadline, put the
        previous handlers back and stop the watcher."""
        if self._timer is not None:
            self._timer.cancel()
        signal.set_wakeup_fd(self._previous_wakeup)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        with contextlib.suppress(OSError):
            os.close(self._write_fd)  # the watcher reads EOF and ends
        self._watcher.join(timeout=1)
        with contextlib.suppress(OSError):
            os.close(self._read_fd)
