"""How a job ends, and the three places a user reads it: `exit_status.json` (soft.runs.status),
the MLflow run's status and its `soft.stop_reason` tag, and the process exit code (cli).

    reason           exit_status.json   MLflow     saved
    finished         finished           FINISHED   yes
    signal           signal             KILLED     yes (stopped from outside; may be requeued)
    exit_interval    exit_interval      KILLED     yes (a time slice: not finished, resumable)
    nonfinite        nonfinite          FAILED     no (the last good checkpoint stays)
    failed           failed             FAILED     no
    killed           killed             KILLED     no (gave up on a peer, or a second signal)

A normal ending (the first three) is `end_run`: save, write the status, then `settled` (no peer
can hold the stop from then on), then close MLflow. Every other ending is an exception that
`JobEnding` records on the way out, or the stop request's give-up cleanups (signals.py).

Rank 0 owns both records. When rank 0 itself died (kill -9, a crash), the lowest rank still
alive on its host stands in: it writes `exit_status.json` (failed, naming rank 0) and marks the
MLflow run FAILED, so neither says RUNNING until a relaunch.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any

from soft.checkpointing.checkpoint import NonFiniteCheckpointError, save
from soft.compat import checkpoint_queue
from soft.config.core import flatten, to_dict
from soft.parallel.collectives import PeerLost
from soft.peft.base import BASE_KEY
from soft.runs.status import Reason
from soft.tracking import Tracker, build_tracker, mark_run_ended
from soft.training.guards import TrainingHalted
from soft.training.run import Run
from soft.training.signals import StopRequest

log = logging.getLogger(__name__)

MLFLOW_STATUS: dict[str, str] = {
    "finished": "FINISHED",
    "signal": "KILLED",
    "exit_interval": "KILLED",
    "nonfinite": "FAILED",
    "failed": "FAILED",
    "killed": "KILLED",
}
STAND_IN_WAIT_S = 3.0  # how long a survivor waits to see a dying rank 0 gone


def _base_of(run: Run) -> dict[str, Any]:
    return {} if run.peft_base is None else {BASE_KEY: run.peft_base}


def save_checkpoint(run: Run) -> float:
    """Save the current state unless this iteration is saved already; returns seconds taken."""
    if run.saved_iteration == run.state.iteration:
        return 0.0
    started = time.perf_counter()
    ck = run.cfg.checkpoint
    validated = run.validated if run.validated and run.validated[0] == run.state.iteration else None
    try:
        path = save(
            run.save_dir,
            run.model.unwrapped,
            run.state,
            run.cfg,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            keep_last=ck.keep_last,
            optimizer_format=ck.optimizer_format,
            identity={"tokenizer": run.tokenizer_identity, **_base_of(run)},
            valid_loss=validated[1] if validated else None,
            keep=run.checkpoint_keep(),
        )
    except NonFiniteCheckpointError as exc:
        raise TrainingHalted("nonfinite", str(exc)) from exc
    run.saved_iteration = run.state.iteration
    if run.topo.is_logging_rank:
        log.info("saved checkpoint %s", path)
    return time.perf_counter() - started


def end_run(run: Run, tracker: Tracker, stop: StopRequest, reason: Reason) -> None:
    """A normal ending (finished, signal, exit_interval): save, record, close."""
    stop.now_doing(f"saving the checkpoint of step {run.state.iteration}")
    save_checkpoint(run)
    if run.topo.is_logging_rank:
        run.run_dir.write_status(reason, run.state.iteration)
    stop.settled()
    tracker.close(MLFLOW_STATUS[reason], reason)


def _odd_peers(run: Run) -> str:
    """What this rank sees of peers that are gone or stopped ('' when none is)."""
    states = run.peers.others()
    odd = [run.peers.describe(r, s) for r, s in states.items() if s in ("gone", "stopped")]
    return "; ".join(odd)


def _rank0_gone(run: Run) -> bool:
    deadline = time.monotonic() + STAND_IN_WAIT_S
    while True:
        state = run.peers.state(0)
        if state == "gone" or state != "alive" or time.monotonic() > deadline:
            return state == "gone"
        time.sleep(0.1)


def stand_in_for_rank0(run: Run, why: str) -> None:
    """On a rank other than 0: when rank 0 died, record the failure in its place (once per
    host of rank 0: the lowest live rank there does it)."""
    if run.topo.is_logging_rank or not _rank0_gone(run):
        return
    if run.peers.first_live_on_host_of(0) != run.topo.rank:
        return
    detail = f"{run.peers.describe(0, 'gone')}; rank {run.topo.rank} saw: {why}"
    run.run_dir.write_status("failed", run.state.iteration, detail)
    log.error("rank %d: rank 0 died; exit_status.json says failed", run.topo.rank)
    mark_run_ended(run.cfg.tracking, run.output_dir, "FAILED", "failed", detail)


class JobEnding:
    """`with JobEnding(run, stop) as tracker:` around the training loop: opens the MLflow run,
    registers what a rank that gives up must record, and records an ending by exception."""

    def __init__(self, run: Run, stop: StopRequest) -> None:
        self.run = run
        self.stop = stop
        self.tracker: Tracker | None = None
        self.recorded = False  # the ending is written: a later give-up must not overwrite it

    def __enter__(self) -> Tracker:
        run = self.run
        try:
            tracker = build_tracker(
                run.cfg.tracking, run.output_dir, run.topo.rank, run.output_dir.name
            )
            tracker.log_params(flatten(to_dict(run.cfg)))
            if run.topo.is_logging_rank:
                tracker.log_artifact(run.run_dir.config_path)
        except BaseException:
            self._release()
            raise
        self.tracker = tracker
        self.stop.observed(run.load_s)  # a save takes about as long as the load did
        self.stop.explain_peers_with(run.peers.report)
        self.stop.add_cleanup(self._give_up)
        return tracker

    def _give_up(self, why: str) -> None:
        """The stop request's deadline ran out, or a second signal came (signals.py)."""
        run = self.run
        if self.recorded:
            pass
        elif run.topo.is_logging_rank:
            run.run_dir.write_status("killed", run.state.iteration, why)
            if self.tracker is not None:
                self.tracker.close("KILLED", "killed", plot=False)  # leaving at once
        else:
            stand_in_for_rank0(run, why)
        checkpoint_queue.restore()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # never swallows the exception
        try:
            lost = self._record_failure(exc) if exc is not None else ""
        finally:
            self._release()
        if lost:
            raise PeerLost(f"{lost}: {type(exc).__name__}: {exc}") from exc

    def _record_failure(self, exc: BaseException) -> str:
        """Write the status and close MLflow; returns what this rank sees of peers that are
        gone or stopped ('' when none is)."""
        run, tracker = self.run, self.tracker
        self.stop.now_doing("recording the failure", waits_on_peers=False)
        lost = ""
        if isinstance(exc, TrainingHalted):
            reason, detail = exc.reason, str(exc)
        elif isinstance(exc, KeyboardInterrupt):
            reason, detail = "killed", "KeyboardInterrupt"
        else:
            reason, detail = "failed", f"{type(exc).__name__}: {exc}"
            lost = _odd_peers(run)
        if run.topo.is_logging_rank:
            run.run_dir.write_status(
                reason, run.state.iteration, f"{lost}; {detail}" if lost else detail
            )
        elif reason == "failed":  # a halt happens on every rank alike: rank 0 records it
            stand_in_for_rank0(run, detail)
        self.recorded = True
        if tracker is not None:
            # The plot takes seconds; a job torn down by a signal or a lost peer has none.
            plot = not lost and self.stop.received is None
            tracker.close(MLFLOW_STATUS[reason], reason, plot=plot)
        return lost

    def _release(self) -> None:
        if self.run.lock is not None:
            self.run.lock.release()
