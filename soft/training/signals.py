"""Stop requests: finish the step, save, stop; and a deadline for when that cannot happen.

SIGUSR1 (SLURM's advance warning: the batch script asks for it before the time limit),
SIGTERM (scancel, a preemption, torchrun tearing the job down) and SIGINT (Ctrl-C) mark a stop
request on the rank that got them; every rank agrees on it after each step (one all-reduce),
then all save together and stop.

A stop cannot happen when a peer rank is gone or stuck: the survivors sit in a collective that
never completes (gloo and NCCL notice a dead peer only sometimes, and a stuck one only at
their timeout, minutes away). Python runs signal handlers on the main thread between
bytecodes, so while that thread waits inside a collective no handler runs at all. torchrun
answers a dead rank with SIGTERM to the others and SIGKILL 30 s later.

So the signals are read by a watcher thread as well, through `signal.set_wakeup_fd` (Python's
C-level handler writes each signal's number there at once, whatever the main thread is doing).

The deadline. SIGTERM and SIGINT arm it: a rank that makes no progress for a grace period (a
few times the longest step, save or checkpoint load seen so far, at least MIN_GRACE_S) runs the
cleanups it was given (exit_status.json, the MLflow status, helper processes) and leaves with
exit status 128 + signal. Progress is what the loop reports through `now_doing`: finishing a
step, agreeing to stop, starting the save; each restarts the grace, so only a rank that is
held in one place (a collective a peer never joins) gives up. Once the save is complete on
every rank (`settled`), nothing can hold the stop any more: the deadline is off, and what is
left (writing the status, closing MLflow, drawing its plot) takes the time it takes. The
give-up message says what the rank was doing and what it can see of its peers
(soft.parallel.collectives.Peers): gone, stopped, alive or on another host.

A second stop signal: torchrun puts its workers in their own sessions, so the terminal's second
Ctrl-C reaches only torchrun, which then sends the workers SIGTERM (after the SIGINT it
forwarded for the first). Any SIGINT or SIGTERM that comes more than REPEAT_WINDOW_S after the
first urgent one therefore gives up at once, before the save (one request can reach a rank
twice at once: scancel signals the workers and torchrun forwards it, so repeats within the
window are the same request). After `settled` the checkpoint and status are written, and a
second signal leaves at once without further cleanups. SIGUSR1 is a request made in advance
and has no deadline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType

from soft.parallel import collectives

log = logging.getLogger(__name__)
MIN_GRACE_S = 5.0
GRACE_FACTOR = 3.0
REPEAT_WINDOW_S = 1.0

Cleanup = Callable[[str], None]  # gets the reason the rank gives up


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: installed so that the signals do not kill the process; the
    watcher thread does the work (it also runs while the main thread is blocked)."""


def _name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequest:
    """The job's stop request: created at the start of a job, closed at its very end
    (or used as a context manager)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
    URGENT = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._cleanups: list[Cleanup] = []
        self._explain_peers: Callable[[], str] | None = None
        self._longest_s = 0.0
        self._doing = "starting"
        self._first_urgent: tuple[int, float] | None = None  # (signal, monotonic time)
        self._armed = False  # a SIGTERM/SIGINT started the deadline
        self._deadline: float | None = None  # when to give up; None = suspended (local work)
        self._settled = False
        self._cond = threading.Condition()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous = {s: signal.signal(s, _ignore) for s in self.SIGNALS}
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="soft-stop-watcher", daemon=True)
        self._watcher.start()
        self._deadline_thread: threading.Thread | None = None

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the loop reports progress and registers what must happen if it never stops ---------

    def add_cleanup(self, fn: Cleanup) -> None:
        self._cleanups.append(fn)

    def explain_peers_with(self, fn: Callable[[], str]) -> None:
        """What the give-up message says about the other ranks (see Peers.report)."""
        self._explain_peers = fn

    def observed(self, seconds: float) -> None:
        """The duration of a step (+ save), or of the checkpoint load a job resumed with: the
        grace scales with the longest."""
        self._longest_s = max(self._longest_s, seconds)

    @property
    def grace_s(self) -> float:
        return max(MIN_GRACE_S, GRACE_FACTOR * self._longest_s)

    def now_doing(self, what: str, waits_on_peers: bool = True) -> None:
        """The rank moved on (e.g. 'saving the checkpoint of step 22'): an armed deadline
        restarts, since whatever held the rank before has let it go. `waits_on_peers=False`:
        local work (recording a failure, closing MLflow) that no peer can hold: the deadline
        waits until the next report."""
        with self._cond:
            self._doing = what
            if self._armed:
                self._deadline = time.monotonic() + self.grace_s if waits_on_peers else None
                self._cond.notify_all()

    def settled(self) -> None:
        """The stop's collective part is done on every rank (the checkpoint is complete):
        no peer can hold this rank any more, so there is no deadline from here on."""
        with self._cond:
            self._settled = True
            self._armed = False
            self._cond.notify_all()

    # -- signals -----------------------------------------------------------------------------

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:
                return  # close() closed the pipe
            for signum in data:
                if signum in self.SIGNALS:
                    self._received(signum)

    def _received(self, signum: int) -> None:
        self.received = signum
        if signum not in self.URGENT:
            return
        now = time.monotonic()
        if self._first_urgent is None:
            self._first_urgent = (signum, now)
            self._arm_deadline()
            return
        first, at = self._first_urgent
        if now - at <= REPEAT_WINDOW_S:
            return  # the same request reaching this rank twice (see the module docstring)
        if self._settled:
            self._leave_now(signum)
            return
        self._give_up(
            signum, f"a second stop signal ({_name(signum)}, {now - at:.0f} s after {_name(first)})"
        )

    def _arm_deadline(self) -> None:
        with self._cond:
            if self._settled:
                return
            self._armed = True
            self._deadline = time.monotonic() + self.grace_s
        self._deadline_thread = threading.Thread(
            target=self._wait_for_deadline, name="soft-stop-deadline", daemon=True
        )
        self._deadline_thread.start()

    def _wait_for_deadline(self) -> None:
        with self._cond:
            while self._armed and (self._deadline is None or time.monotonic() < self._deadline):
                self._cond.wait(
                    None if self._deadline is None else self._deadline - time.monotonic()
                )
            if not self._armed:
                return  # settled, or closed
            doing = self._doing
        signum, at = self._first_urgent or (signal.SIGTERM, time.monotonic())
        peers = self._explain_peers() if self._explain_peers is not None else ""
        self._give_up(
            signum,
            f"no progress for {self.grace_s:.0f} s while {doing} ({_name(signum)} came "
            f"{time.monotonic() - at:.0f} s ago){'; ' + peers if peers else ''}",
        )

    def _leave_now(self, signum: int) -> None:
        """A second signal after the checkpoint and the status were written."""
        log.error(
            "rank %d: a second stop signal (%s) while closing; the checkpoint and "
            "exit_status.json are written, leaving now (an unclosed MLflow run is marked by "
            "the next start)",
            _rank(),
            _name(signum),
        )
        logging.shutdown()
        os._exit(128 + signum)

    def _give_up(self, signum: int, why: str) -> None:
        log.error(
            "rank %d: %s; leaving without a checkpoint (the last one stays latest)", _rank(), why
        )
        for cleanup in self._cleanups:
            try:
                cleanup(why)
            except Exception as exc:  # each cleanup is best effort; the exit must happen
                log.error("cleanup %s failed: %s", getattr(cleanup, "__name__", cleanup), exc)
        logging.shutdown()
        os._exit(128 + signum)

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank was signalled."""
        return collectives.any_rank(self.received is not None)

    def close(self) -> None:
        """The job has ended (stopped, finished or raised): cancel the deadline, put the
        previous handlers back and stop the watcher."""
        with self._cond:
            self._armed = False
            self._cond.notify_all()
        signal.set_wakeup_fd(self._previous_wakeup)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        with contextlib.suppress(OSError):
            os.close(self._write_fd)  # the watcher reads EOF and ends
        self._watcher.join(timeout=1)
        with contextlib.suppress(OSError):
            os.close(self._read_fd)


def _rank() -> int:
    return collectives.rank_world()[0]
