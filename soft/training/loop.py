"""The training run: set up, resume, train with periodic logging / validation / checkpoints."""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from megatron.core import parallel_state

from soft.checkpointing.checkpoint import (
    TrainState,
    find_checkpoint,
    has_optimizer_state,
    load_checkpoint,
    save_checkpoint,
)
from soft.config.core import flatten, save_yaml, to_dict
from soft.config.errors import ConfigError
from soft.config.root import RootConfig
from soft.data import ResumableBatchSampler, SFTDataset, build_datasets
from soft.models.build import SoftModel, build_soft_model
from soft.models.gpt import check_runtime_support, padded_vocab_size
from soft.parallel.setup import Topology, init_distributed
from soft.tracking import Tracker, build_tracker
from soft.training import flops
from soft.training.optim import build_optimizer, build_scheduler
from soft.training.signals import StopRequest
from soft.training.step import Batch, StepResult, eval_step, train_step

log = logging.getLogger("soft")


@dataclass
class RunResult:
    output_dir: Path
    state: TrainState
    train_history: list[dict] = field(default_factory=list)  # one record per step run here
    valid_history: list[dict] = field(default_factory=list)
    stopped_by_signal: bool = False


@dataclass
class Run:
    """Everything a training run holds; built once by `setup`."""

    cfg: RootConfig
    topo: Topology
    model: SoftModel
    optimizer: object
    scheduler: object
    train_data: SFTDataset
    valid_data: SFTDataset | None
    state: TrainState
    output_dir: Path
    save_dir: Path


def setup(cfg: RootConfig) -> Run:
    check_runtime_support(cfg.model, cfg.parallel)  # FP8/TE where they cannot run: fail first
    topo = init_distributed(cfg.parallel, cfg.train.seed)
    output_dir = Path(cfg.train.output_dir)
    if topo.is_logging_rank:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, output_dir / "config.yaml")
    train_data, valid_data, tokenizer = build_datasets(cfg.data, cfg.train.seed)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"config key 'model.vocab_size' ({vocab}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}, {cfg.data.tokenizer_path or 'built-in tokenizer'})"
        )
    tp = cfg.parallel.tensor_model_parallel_size
    model = build_soft_model(
        cfg.model,
        cfg.parallel,
        cfg.soft,
        cfg.exit_plan(),
        padded_vocab_size(vocab, cfg.model, tp),
        cfg.train.seed,
    )
    optimizer = build_optimizer(model, cfg.train, cfg.model, cfg.parallel)
    scheduler = build_scheduler(optimizer, cfg.train)
    save_dir = Path(cfg.checkpoint.save_dir or output_dir / "checkpoints")
    run = Run(
        cfg,
        topo,
        model,
        optimizer,
        scheduler,
        train_data,
        valid_data,
        TrainState(),
        output_dir,
        save_dir,
    )
    run.state = restore(run)
    if topo.is_logging_rank:
        log.info(train_data.describe())
        if valid_data is not None:
            log.info(valid_data.describe())
    return run


def restore(run: Run) -> TrainState:
    """A run's own latest checkpoint first (requeued jobs), else checkpoint.load_dir."""
    ck, dist_opt = run.cfg.checkpoint, run.cfg.parallel.use_distributed_optimizer
    chunks = run.model.unwrapped
    own = find_checkpoint(run.save_dir) if ck.auto_resume else None
    if own is not None:
        log.info("resuming from %s", own)
        return load_checkpoint(run.save_dir, chunks, run.optimizer, run.scheduler, dist_opt)
    if ck.load_dir is None:
        return TrainState()
    if ck.finetune:
        log.info("fine-tuning from the weights in %s", ck.load_dir)
        load_checkpoint(
            ck.load_dir, chunks, optimizer=None, allow_extract=run.cfg.soft.mode == "extracted"
        )
        # Optimizer main params (fp32 copies for bf16) must pick up the loaded weights.
        if hasattr(run.optimizer, "reload_model_params"):
            run.optimizer.reload_model_params()
        return TrainState()
    if find_checkpoint(ck.load_dir) is not None and not has_optimizer_state(ck.load_dir):
        raise ConfigError(
            f"checkpoint.load_dir '{ck.load_dir}' holds model weights only (e.g. a converted HF "
            "model): set checkpoint.finetune=true to start training from them"
        )
    return load_checkpoint(ck.load_dir, chunks, run.optimizer, run.scheduler, dist_opt)


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


class Meter:
    """Averages step results over a log interval and formats the console line."""

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
        self.steps_done = 0
        self.reset()

    def reset(self) -> None:
        self.results: list[StepResult] = []
        self.time = 0.0

    def add(self, result: StepResult, seconds: float) -> None:
        self.results.append(result)
        self.time += seconds
        self.steps_done += 1

    def metrics(self) -> dict[str, float]:
        n = len(self.results)
        out = {"train/loss": sum(r.loss for r in self.results) / n}
        for k in self.run.model.plan.layers:
            out[f"train/loss/exit_{k}"] = sum(r.exit_losses[k] for r in self.results) / n
        step_time = self.time / n
        tokens_per_s = self.tokens_per_step / step_time
        out.update(
            {
                "train/lr": self.results[-1].lr or 0.0,
                "train/step_time_s": step_time,
                "perf/tokens_per_s": tokens_per_s,
                "perf/model_tflops_per_device": tokens_per_s
                * self.flops_per_token
                / 1e12
                / self.run.topo.world_size,
                "memory/peak_gb": _memory_gb(),
            }
        )
        norms = [r.grad_norm for r in self.results if r.grad_norm is not None]
        if norms:
            out["train/grad_norm"] = sum(norms) / len(norms)
        if self.peak:
            out["perf/mfu"] = out["perf/model_tflops_per_device"] / self.peak
        return out

    def line(self, iteration: int, metrics: dict[str, float]) -> str:
        total = self.run.cfg.train.train_iters
        elapsed = time.perf_counter() - self.start
        eta = (total - iteration) * metrics["train/step_time_s"]
        exits = " ".join(
            f"exit_{k} {metrics[f'train/loss/exit_{k}']:.4f}" for k in self.run.model.plan.layers
        )
        return (
            f"step {iteration}/{total} | loss {metrics['train/loss']:.4f} | {exits} | "
            f"lr {metrics['train/lr']:.3g} | grad {metrics.get('train/grad_norm', float('nan')):.3f} | "
            f"{metrics['perf/tokens_per_s']:.0f} tok/s | elapsed {_fmt_time(elapsed)} | eta {_fmt_time(eta)}"
        )


def _write_status(run: Run, reason: str) -> None:
    if run.topo.is_logging_rank:
        tmp = run.output_dir / "exit_status.json.tmp"
        tmp.write_text(json.dumps({"reason": reason, "iteration": run.state.iteration}))
        tmp.replace(run.output_dir / "exit_status.json")


def _append_history(run: Run, name: str, record: dict) -> None:
    if run.topo.is_logging_rank:
        with open(run.output_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")


def _save(run: Run) -> None:
    ck = run.cfg.checkpoint
    path = save_checkpoint(
        run.save_dir,
        run.model.unwrapped,
        run.optimizer,
        run.scheduler,
        run.state,
        run.cfg,
        run.cfg.parallel.use_distributed_optimizer,
        ck.keep_last,
        ck.optimizer_format,
    )
    if run.topo.is_logging_rank:
        log.info("saved checkpoint %s", path)


def _record(result: StepResult, iteration: int) -> dict:
    record = {
        "iteration": iteration,
        "loss": result.loss,
        **{f"exit_{k}": v for k, v in result.exit_losses.items()},
    }
    if result.grad_norm is not None:
        record["grad_norm"] = result.grad_norm
    return record


def _validate(run: Run, tracker: Tracker, result: RunResult) -> None:
    valid = evaluate(run)
    if valid is None:
        return
    metrics = {
        "valid/loss": valid.loss,
        **{f"valid/loss/exit_{k}": v for k, v in valid.exit_losses.items()},
    }
    tracker.log(metrics, run.state.iteration)
    record = _record(valid, run.state.iteration)
    result.valid_history.append(record)
    _append_history(run, "valid_log.jsonl", record)
    if run.topo.is_logging_rank:
        exits = " ".join(f"exit_{k} {v:.4f}" for k, v in valid.exit_losses.items())
        log.info("validation at step %d | loss %.4f | %s", run.state.iteration, valid.loss, exits)


def _stop(run: Run, result: RunResult, reason: str) -> RunResult:
    _save(run)
    _write_status(run, reason)
    result.stopped_by_signal = reason == "signal"
    return result


def train(run: Run, tracker: Tracker) -> RunResult:
    t, ck = run.cfg.train, run.cfg.checkpoint
    sampler = ResumableBatchSampler(len(run.train_data), t.global_batch_size, t.seed)
    result = RunResult(run.output_dir, run.state)
    meter = Meter(run)
    stop = StopRequest()
    first_iteration = run.state.iteration
    try:
        while run.state.iteration < t.train_iters:
            mb = microbatches(
                run.train_data,
                sampler,
                run.state.consumed_samples,
                t.micro_batch_size,
                run.topo.device,
            )
            started = time.perf_counter()
            step = train_step(run.model, run.optimizer, run.scheduler, mb)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # honest step times: wait for the GPU
            meter.add(step, time.perf_counter() - started)
            run.state.iteration += 1
            run.state.consumed_samples += t.global_batch_size
            record = _record(step, run.state.iteration)
            result.train_history.append(record)
            _append_history(run, "train_log.jsonl", record)
            it = run.state.iteration
            if it % t.log_interval == 0 or it == t.train_iters:
                metrics = meter.metrics()
                tracker.log(metrics, it)
                if run.topo.is_logging_rank:
                    log.info(meter.line(it, metrics))
                meter.reset()
            if t.eval_interval and it % t.eval_interval == 0 and it != t.train_iters:
                _validate(run, tracker, result)
            if ck.save_interval and it % ck.save_interval == 0 and it != t.train_iters:
                _save(run)
            if stop.agreed(run.topo.device):
                log.warning(
                    "stop requested (signal %s): saving at step %d and exiting", stop.received, it
                )
                return _stop(run, result, "signal")
            if t.exit_interval and it - first_iteration >= t.exit_interval and it != t.train_iters:
                log.info("exit_interval reached: saving at step %d and exiting", it)
                return _stop(run, result, "exit_interval")
        _validate(run, tracker, result)
        _save(run)
        _write_status(run, "finished")
        return result
    finally:
        stop.restore()


def run_training(cfg: RootConfig) -> RunResult:
    run = setup(cfg)
    tracker = build_tracker(cfg.tracking, run.output_dir, run.topo.rank, run.output_dir.name)
    with tracker:
        tracker.log_params(flatten(to_dict(cfg)))
        if run.topo.is_logging_rank:
            tracker.log_artifact(run.output_dir / "config.yaml")
        return train(run, tracker)
