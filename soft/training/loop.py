"""The training loop: steps with periodic logging, validation and checkpoints, until the run is
finished, stopped by a signal or by exit_interval (how each ending is recorded: ending.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from soft.checkpointing.checkpoint import TrainState, rewind_to_validated
from soft.data import ResumableBatchSampler
from soft.failpoints import failpoint
from soft.runs import TRAIN_LOG, VALID_LOG
from soft.runs.status import Reason
from soft.tracking import Tracker
from soft.tracking.keys import exit_metric_key
from soft.training.ending import end_run, save_checkpoint
from soft.training.guards import SkipGuard, finite, halt_on_validation
from soft.training.metrics import Meter, log_entry
from soft.training.run import Run
from soft.training.signals import StopRequest
from soft.training.step import evaluate, microbatches, train_step

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    state: TrainState
    train_history: list[dict] = field(default_factory=list)  # one log entry per step run here
    valid_history: list[dict] = field(default_factory=list)
    reason: Reason = "finished"


def train(run: Run, tracker: Tracker, stop: StopRequest) -> RunResult:
    t, ck = run.cfg.train, run.cfg.checkpoint
    sampler = ResumableBatchSampler(len(run.train_data), t.global_batch_size, t.seed)
    result = RunResult(run.output_dir, run.state)
    meter = Meter(run)
    guard = SkipGuard(t)
    first_iteration = run.state.iteration
    if first_iteration == t.train_iters:
        log.info("the run in %s is at train.train_iters=%d already", run.output_dir, t.train_iters)
    while run.state.iteration < t.train_iters:
        stop.now_doing(f"running step {run.state.iteration + 1}")
        started = time.perf_counter()
        mb = microbatches(
            run.train_data, sampler, run.state.consumed_samples, t.micro_batch_size, run.topo.device
        )
        step = train_step(run.model, run.optimizer, run.scheduler, mb, _measures_untrained(run))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # honest step times: wait for the GPU
        step_time = time.perf_counter() - started
        failpoint("train:step_done")
        run.state.skipped_steps += guard.check(step, run.state.iteration + 1)
        run.state.iteration += 1
        run.state.consumed_samples += t.global_batch_size
        it = run.state.iteration
        entry = {**log_entry(step, it), "step_time_s": step_time}
        result.train_history.append(entry)
        meter.add(entry)
        if run.topo.is_logging_rank:
            run.run_dir.append(TRAIN_LOG, entry)
        if it % t.log_interval == 0 or it == t.train_iters:
            metrics = meter.metrics()
            tracker.log(metrics, it)
            if run.topo.is_logging_rank:
                log.info(meter.line(it, metrics))
        if t.eval_interval and it % t.eval_interval == 0 and it != t.train_iters:
            stop.now_doing(f"validating after step {it}")
            step_time += validate(run, tracker, result)
        if ck.save_interval and it % ck.save_interval == 0 and it != t.train_iters:
            stop.now_doing(f"saving the checkpoint of step {it}")
            step_time += save_checkpoint(run)
        stop.observed(step_time)
        stop.now_doing(f"agreeing whether to stop after step {it}")
        if stop.agreed():
            log.warning(
                "stop requested (signal %s): saving at step %d and exiting", stop.received, it
            )
            return _ended(run, tracker, stop, result, "signal")
        if t.exit_interval and it - first_iteration >= t.exit_interval and it != t.train_iters:
            log.info("exit_interval reached: saving at step %d and exiting", it)
            return _ended(run, tracker, stop, result, "exit_interval")
    if first_iteration < t.train_iters:
        validate(run, tracker, result)
    return _ended(run, tracker, stop, result, "finished")


def _ended(
    run: Run, tracker: Tracker, stop: StopRequest, result: RunResult, reason: Reason
) -> RunResult:
    end_run(run, tracker, stop, reason)
    result.reason = reason
    return result


def _measures_untrained(run: Run) -> bool:
    """Whether the step about to run computes the exits that do not train (they only feed
    the logs): at logging steps, every step or never (soft.log_untrained_exits)."""
    policy, t = run.cfg.soft.log_untrained_exits, run.cfg.train
    upcoming = run.state.iteration + 1
    logs = upcoming % t.log_interval == 0 or upcoming == t.train_iters
    return policy == "every_step" or (policy == "interval" and logs)


def validate(run: Run, tracker: Tracker, result: RunResult) -> float:
    """A validation pass: logged, recorded for the next checkpoint, and a NaN/inf loss halts
    the run (guards.halt_on_validation). Returns the seconds it took."""
    if run.valid_data is None:
        return 0.0
    started = time.perf_counter()
    valid = evaluate(run.model, run.valid_data, run.cfg.train, run.topo.device)
    it = run.state.iteration
    metrics = {
        "valid/loss": valid.loss,
        **{exit_metric_key("valid", k): v for k, v in valid.exit_losses.items()},
    }
    tracker.log(metrics, it)
    entry = log_entry(valid, it)
    result.valid_history.append(entry)
    if run.topo.is_logging_rank:
        run.run_dir.append(VALID_LOG, entry)
        exits = " ".join(f"exit_{k} {v:.4f}" for k, v in valid.exit_losses.items())
        log.info("validation at step %d | loss %.4f | %s", it, valid.loss, exits)
    if not finite(valid):
        halt_on_validation(valid, it, rewind_to_validated(run.save_dir))
    run.validated = (it, valid.loss)
    return time.perf_counter() - started
