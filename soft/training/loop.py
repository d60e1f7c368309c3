"""The training loop: steps with periodic logging, validation and checkpoints, and the ways a
run ends (finished, stopped by a signal or exit_interval, halted by a bad step)."""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from megatron.core import parallel_state

from soft.checkpointing.checkpoint import NonFiniteCheckpointError, TrainState, save
from soft.compat import checkpoint_queue
from soft.config.core import flatten, to_dict
from soft.config.root import RootConfig
from soft.data import ResumableBatchSampler, SFTDataset
from soft.failpoints import failpoint
from soft.runs import TRAIN_LOG, VALID_LOG
from soft.tracking import Tracker, build_tracker
from soft.tracking.keys import exit_metric_key
from soft.training import flops
from soft.training.run import Run, restore, setup
from soft.training.signals import StopRequest
from soft.training.step import Batch, StepResult, eval_step, train_step

__all__ = ["Run", "RunResult", "TrainingHalted", "restore", "run_training", "setup", "train"]

log = logging.getLogger("soft")


class TrainingHalted(RuntimeError):
    """A step went bad and the configured policy is to stop (nothing was saved after it)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class RunResult:
    output_dir: Path
    state: TrainState
    train_history: list[dict] = field(default_factory=list)  # one log entry per step run here
    valid_history: list[dict] = field(default_factory=list)
    stopped_by_signal: bool = False


def microbatches(
    data: SFTDataset, sampler: ResumableBatchSampler, consumed: int, mbs: int, device
) -> list[Batch]:
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    out = []
    for indices in sampler.indices_for_step(consumed, dp_rank, dp_size, mbs):
        out.append({k: v.to(device, non_blocking=True) for k, v in data.batch(indices).items()})
    return out


def evaluate(run: Run) -> StepResult | None:
    if run.valid_data is None:
        return None
    t = run.cfg.train
    sampler = ResumableBatchSampler(len(run.valid_data), t.global_batch_size, t.seed)
    totals: dict[int, float] = {}
    results = []
    for i in range(t.eval_iters):
        mb = microbatches(
            run.valid_data, sampler, i * t.global_batch_size, t.micro_batch_size, run.topo.device
        )
        results.append(eval_step(run.model, mb))
    tokens = sum(r.num_tokens for r in results)
    for k in run.model.plan.layers:  # token-weighted mean over the eval batches
        totals[k] = sum(r.exit_losses[k] * r.num_tokens for r in results) / max(tokens, 1)
    loss = sum(run.model.plan.weight(k) * v for k, v in totals.items())
    return StepResult(totals, loss, tokens)


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _log_entry(result: StepResult, iteration: int) -> dict:
    """One train_log/valid_log line (and what the Meter averages)."""
    entry = {
        "iteration": iteration,
        "loss": result.loss,
        **{f"exit_{k}": v for k, v in result.exit_losses.items()},
    }
    if result.grad_norm is not None:
        entry["grad_norm"] = result.grad_norm
    if result.lr is not None:
        entry["lr"] = result.lr
    if result.skipped is not None:
        entry["skipped"] = result.skipped
    return entry


class Meter:
    """Averages the step log entries of one log interval and formats the console line. After a
    resume it starts from the entries of the interval's earlier steps (train_log.jsonl), so
    the logged averages equal an uninterrupted run's."""

    def __init__(self, run: Run) -> None:
        t, m = run.cfg.train, run.cfg.model
        self.run = run
        self.tokens_per_step = t.global_batch_size * run.cfg.data.seq_length
        trained = len(run.model.plan.trained_exits)
        self.flops_per_token = flops.train_flops_per_token(
            m, run.cfg.data.seq_length, run.model.vocab_size, trained
        )
        self.peak = flops.device_peak_tflops()
        self.start = time.perf_counter()
        self.entries: list[dict] = []
        it, interval = run.state.iteration, t.log_interval
        if run.topo.is_logging_rank and it % interval:
            window = it - it % interval
            self.entries = [r for r in run.run_dir.read_log(TRAIN_LOG) if r["iteration"] > window]

    def add(self, entry: dict) -> None:
        self.entries.append(entry)

    def metrics(self) -> dict[str, float]:
        n = len(self.entries)
        out = {"train/loss": sum(r["loss"] for r in self.entries) / n}
        for k in self.run.model.plan.layers:
            # Untrained exits are measured only at some steps (soft.log_untrained_exits).
            values = [r[f"exit_{k}"] for r in self.entries if f"exit_{k}" in r]
            if values:
                out[exit_metric_key("train", k)] = sum(values) / len(values)
        times = [r["step_time_s"] for r in self.entries if "step_time_s" in r]
        step_time = sum(times) / max(len(times), 1)
        tokens_per_s = self.tokens_per_step / step_time if step_time else 0.0
        out.update(
            {
                "train/lr": self.entries[-1].get("lr", 0.0),
                "train/step_time_s": step_time,
                "train/skipped_steps": float(self.run.state.skipped_steps),
                "perf/tokens_per_s": tokens_per_s,
                "perf/model_tflops_per_device": tokens_per_s
                * self.flops_per_token
                / 1e12
                / self.run.topo.world_size,
                "memory/peak_gb": _memory_gb(),
            }
        )
        norms = [r["grad_norm"] for r in self.entries if "grad_norm" in r]
        if norms:
            out["train/grad_norm"] = sum(norms) / len(norms)
        if self.peak:
            out["perf/mfu"] = out["perf/model_tflops_per_device"] / self.peak
        scale = getattr(self.run.optimizer, "get_loss_scale", None)
        if self.run.cfg.model.params_dtype == "fp16" and scale is not None:
            out["train/loss_scale"] = float(scale())
        self.entries = []
        return out

    def line(self, iteration: int, metrics: dict[str, float]) -> str:
        total = self.run.cfg.train.train_iters
        elapsed = time.perf_counter() - self.start
        eta = (total - iteration) * metrics["train/step_time_s"]
        exits = " ".join(
            f"exit_{k} {metrics[exit_metric_key('train', k)]:.4f}"
            for k in self.run.model.plan.layers
            if exit_metric_key("train", k) in metrics
        )
        extra = ""
        if "train/loss_scale" in metrics:
            extra += f" | loss scale {metrics['train/loss_scale']:.3g}"
        if self.run.state.skipped_steps:
            extra += f" | skipped steps {self.run.state.skipped_steps}"
        return (
            f"step {iteration}/{total} | loss {metrics['train/loss']:.4f} | {exits} | "
            f"lr {metrics['train/lr']:.3g} | grad {metrics.get('train/grad_norm', float('nan')):.3f} | "
            f"{metrics['perf/tokens_per_s']:.0f} tok/s{extra} | elapsed {_fmt_time(elapsed)} | "
            f"eta {_fmt_time(eta)}"
        )


def _save(run: Run) -> float:
    """Save the current state unless this iteration is saved already; returns seconds taken."""
    if run.saved_iteration == run.state.iteration:
        return 0.0
    started = time.perf_counter()
    ck = run.cfg.checkpoint
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
            identity=run.tokenizer,
        )
    except NonFiniteCheckpointError as exc:
        raise TrainingHalted("nonfinite", str(exc)) from exc
    run.saved_iteration = run.state.iteration
    if run.topo.is_logging_rank:
        log.info("saved checkpoint %s", path)
    return time.perf_counter() - started


def _validate(run: Run, tracker: Tracker, result: RunResult) -> None:
    valid = evaluate(run)
    if valid is None:
        return
    metrics = {
        "valid/loss": valid.loss,
        **{exit_metric_key("valid", k): v for k, v in valid.exit_losses.items()},
    }
    tracker.log(metrics, run.state.iteration)
    entry = _log_entry(valid, run.state.iteration)
    result.valid_history.append(entry)
    if run.topo.is_logging_rank:
        run.run_dir.append(VALID_LOG, entry)
        exits = " ".join(f"exit_{k} {v:.4f}" for k, v in valid.exit_losses.items())
        log.info("validation at step %d | loss %.4f | %s", run.state.iteration, valid.loss, exits)


def _bad_values(step: StepResult) -> str:
    values = {"loss": step.loss, **{f"exit_{k}": v for k, v in step.exit_losses.items()}}
    if step.grad_norm is not None:
        values["grad norm"] = step.grad_norm
    bad = [f"{name} = {v}" for name, v in values.items() if not math.isfinite(v)]
    return ", ".join(bad) or "the gradient norm could not be computed"


class SkipGuard:
    """Applies train.on_nonfinite and train.max_consecutive_skips to each step's outcome."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.in_a_row: list[str] = []

    def check(self, step: StepResult, iteration: int) -> None:
        t = self.run.cfg.train
        if step.skipped is None:
            self.in_a_row = []
            return
        if step.skipped == "nonfinite" and t.on_nonfinite == "stop":
            raise TrainingHalted(
                "nonfinite",
                f"step {iteration}: non-finite training values ({_bad_values(step)}); stopped "
                "without applying the update or saving (train.on_nonfinite=stop). The last "
                "checkpoint is the last good state: resume from it with a lower train.lr, or "
                "set train.on_nonfinite=skip to drop such steps",
            )
        self.run.state.skipped_steps += 1
        self.in_a_row.append(step.skipped)
        what = "fp16 loss-scale overflow" if step.skipped == "overflow" else _bad_values(step)
        log.warning("step %d: update skipped (%s)", iteration, what)
        limit = t.max_consecutive_skips
        if limit and len(self.in_a_row) >= limit:
            kinds = ", ".join(sorted(set(self.in_a_row)))
            raise TrainingHalted(
                "nonfinite",
                f"steps {iteration - limit + 1}-{iteration}: {limit} optimizer updates in a row "
                f"were skipped ({kinds}); stopped (train.max_consecutive_skips={limit}). With "
                "fp16, lower train.initial_loss_scale or use bf16; otherwise lower train.lr",
            )


def _measures_untrained(run: Run) -> bool:
    """Whether the step about to run computes the exits that do not train (they only feed
    the logs): at logging steps, every step or never (soft.log_untrained_exits)."""
    policy, t = run.cfg.soft.log_untrained_exits, run.cfg.train
    upcoming = run.state.iteration + 1
    logs = upcoming % t.log_interval == 0 or upcoming == t.train_iters
    return policy == "every_step" or (policy == "interval" and logs)


def _stop(run: Run, result: RunResult, reason: str) -> RunResult:
    _save(run)
    if run.topo.is_logging_rank:
        run.run_dir.write_status(reason, run.state.iteration)
    result.stopped_by_signal = reason == "signal"
    return result


def _watchdog_cleanups(run: Run, tracker: Tracker, stop: StopRequest) -> None:
    """What a rank does when it must leave without finishing the stop (see signals.py)."""
    if run.topo.is_logging_rank:
        stop.add_cleanup(
            lambda: run.run_dir.write_status(
                "killed", run.state.iteration, "stop signal, but a peer rank was gone"
            )
        )
        stop.add_cleanup(lambda: tracker.close("KILLED"))
    stop.add_cleanup(checkpoint_queue.restore)


def train(run: Run, tracker: Tracker, stop: StopRequest | None = None) -> RunResult:
    """`stop`: the job's stop request (run_training keeps it until the tracker is closed);
    None = one of its own for this loop."""
    if stop is None:
        stop = StopRequest()
        try:
            return train(run, tracker, stop)
        finally:
            stop.restore()
    t, ck = run.cfg.train, run.cfg.checkpoint
    sampler = ResumableBatchSampler(len(run.train_data), t.global_batch_size, t.seed)
    result = RunResult(run.output_dir, run.state)
    meter = Meter(run)
    guard = SkipGuard(run)
    _watchdog_cleanups(run, tracker, stop)
    first_iteration = run.state.iteration
    if first_iteration == t.train_iters:
        log.info("the run in %s is at train.train_iters=%d already", run.output_dir, t.train_iters)
    try:
        while run.state.iteration < t.train_iters:
            started = time.perf_counter()
            mb = microbatches(
                run.train_data,
                sampler,
                run.state.consumed_samples,
                t.micro_batch_size,
                run.topo.device,
            )
            step = train_step(run.model, run.optimizer, run.scheduler, mb, _measures_untrained(run))
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # honest step times: wait for the GPU
            step_time = time.perf_counter() - started
            failpoint("train:step_done")
            guard.check(step, run.state.iteration + 1)
            run.state.iteration += 1
            run.state.consumed_samples += t.global_batch_size
            it = run.state.iteration
            entry = {**_log_entry(step, it), "step_time_s": step_time}
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
                _validate(run, tracker, result)
            if ck.save_interval and it % ck.save_interval == 0 and it != t.train_iters:
                step_time += _save(run)
            stop.observed(step_time)
            if stop.agreed(run.topo.device):
                log.warning(
                    "stop requested (signal %s): saving at step %d and exiting", stop.received, it
                )
                return _stop(run, result, "signal")
            if t.exit_interval and it - first_iteration >= t.exit_interval and it != t.train_iters:
                log.info("exit_interval reached: saving at step %d and exiting", it)
                return _stop(run, result, "exit_interval")
        if first_iteration < t.train_iters:
            _validate(run, tracker, result)
        return _stop(run, result, "finished")
    except TrainingHalted as exc:
        if run.topo.is_logging_rank:
            run.run_dir.write_status(exc.reason, run.state.iteration, str(exc))
        raise


def run_training(cfg: RootConfig) -> RunResult:
    # Stop signals are handled from the start to the end of the job, the tracker's closing
    # included: a SIGTERM that torchrun sends while a failing job closes MLflow must not kill
    # it halfway (that left runs RUNNING).
    stop = StopRequest()
    try:
        run = setup(cfg)
        try:
            tracker = build_tracker(
                cfg.tracking, run.output_dir, run.topo.rank, run.output_dir.name
            )
            with tracker:
                tracker.log_params(flatten(to_dict(cfg)))
                if run.topo.is_logging_rank:
                    tracker.log_artifact(run.run_dir.config_path)
                result = _train_reporting_failures(run, tracker, stop)
                if result.stopped_by_signal:
                    tracker.close("KILLED")  # stopped from outside (it may be requeued)
                return result
        finally:
            if run.lock is not None:
                run.lock.release()
    finally:
        stop.restore()


def _train_reporting_failures(run: Run, tracker: Tracker, stop: StopRequest) -> RunResult:
    try:
        return train(run, tracker, stop)
    except (TrainingHalted, KeyboardInterrupt):
        raise
    except Exception as exc:
        if run.topo.is_logging_rank:
            run.run_dir.write_status(
                "failed", run.state.iteration, f"{type(exc).__name__}: {exc}"[:2000]
            )
        raise
