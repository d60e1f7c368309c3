"""What a step reports: its log record (train_log.jsonl / valid_log.jsonl), the averages over a
log interval that go to MLflow, and the console line."""

from __future__ import annotations

import resource
import time

import torch

from soft.models import flops
from soft.runs import TRAIN_LOG
from soft.tracking.keys import exit_metric_key
from soft.training.run import Run
from soft.training.step import StepResult


def log_entry(result: StepResult, iteration: int) -> dict[str, float | str]:
    """One train_log/valid_log line (and what the Meter averages)."""
    entry: dict[str, float | str] = {
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


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


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
