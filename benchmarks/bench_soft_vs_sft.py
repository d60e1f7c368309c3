"""Training cost of SoFT against SFT on the same model and layout, in one process.

`python benchmarks/bench_soft_vs_sft.py [--config CFG.yaml] [--warmup N] [--steps M] [--fp8]
[--append-results benchmarks/RESULTS.md] [key=value ...]`

Builds the run twice through `soft.training.loop.setup` (soft.mode=sft, then soft.mode=soft;
with --fp8 on a GPU with Transformer Engine, both again with model.fp8), runs N warm-up and M
timed optimizer steps of each, and prints one markdown table: median step time, tokens/s,
model TFLOP/s per device, MFU (when the device's peak is known), peak memory, and a SoFT/SFT
row per precision (its FLOPs/token cell is the predicted exit-FLOPs ratio). Under torchrun
every rank times its steps; a step's time is the slowest rank's, and rank 0 prints.
Without --config: the embedded tiny model, whose numbers show overheads, not a real model.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soft.config.errors import ConfigError  # noqa: E402
from soft.config.root import load_config  # noqa: E402
from soft.data import ResumableBatchSampler  # noqa: E402
from soft.models.gpt import transformer_engine_available  # noqa: E402
from soft.training import flops  # noqa: E402
from soft.training.loop import Run, microbatches, setup  # noqa: E402
from soft.training.step import train_step  # noqa: E402

# Hybrid = E4M3 forward, E5M2 gradients: the usual FP8 training recipe.
FP8_OVERRIDES = ["model.params_dtype=bf16", "model.fp8=hybrid"]


@dataclass
class Row:
    mode: str
    precision: str
    step_times: list[float]  # seconds, slowest rank per step
    tokens_per_step: int
    flops_per_token: float
    world_size: int
    peak_memory_gib: float | None

    @property
    def step_time(self) -> float:
        return statistics.median(self.step_times)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time

    @property
    def tflops_per_device(self) -> float:
        return self.tokens_per_s * self.flops_per_token / 1e12 / self.world_size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML config (default: the embedded tiny model)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (median reported)")
    p.add_argument(
        "--fp8", action="store_true", help="add FP8 rows (needs a GPU with Transformer Engine)"
    )
    p.add_argument(
        "--append-results", type=Path, help="append the table with date/device/versions here"
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = p.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        p.error("--warmup must be >= 0 and --steps >= 1")
    return args


# ---------------------------------------------------------------------------------------------
# Memory: device allocator peak on GPUs; on CPU the peak RSS growth over the build + steps,
# sampled by a thread (activations are freed by the end of a step, so sampling between
# steps would miss them).


class CpuPeakRss:
    def __init__(self, interval_s: float = 0.002) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> CpuPeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_gib(self) -> float:
        return (self.peak - self.baseline) / 2**30


def release_memory() -> None:
    """Free the previous run before measuring the next: its model and optimizer would
    otherwise count in (GPU) or hide the next run's growth in the allocator's pool (CPU)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(
        OSError
    ):  # glibc keeps freed pages: return them, so RSS growth is this run's
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------------------------------------
# Timing


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # device work is asynchronous: wait before reading the clock


def slowest_rank(seconds: float) -> float:
    """A pipeline step ends when its slowest rank does."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return seconds
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_steps(run: Run, warmup: int, steps: int) -> list[float]:
    t = run.cfg.train
    sampler = ResumableBatchSampler(len(run.train_data), t.global_batch_size, t.seed)
    consumed, times = 0, []
    for i in range(warmup + steps):
        mb = microbatches(run.train_data, sampler, consumed, t.micro_batch_size, run.topo.device)
        consumed += t.global_batch_size
        _sync()
        started = time.perf_counter()
        train_step(run.model, run.optimizer, run.scheduler, mb)
        _sync()
        elapsed = slowest_rank(time.perf_counter() - started)
        if i >= warmup:
            times.append(elapsed)
    return times


def _precision(cfg) -> str:
    return cfg.model.params_dtype + (f"+fp8 {cfg.model.fp8}" if cfg.model.fp8 else "")


def measure(config: str | None, overrides: list[str], warmup: int, steps: int) -> Row:
    release_memory()
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="bench_soft_") as out:
        # The run directory gets the resolved config; keep it out of runs/.
        cfg = load_config(config, [*overrides, f"train.output_dir={out}"])
        before = torch.cuda.memory_allocated() if gpu else 0
        with CpuPeakRss() if not gpu else contextlib.nullcontext() as rss:
            run = setup(cfg)
            times = time_steps(run, warmup, steps)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if gpu else rss.growth_gib
        plan = run.model.plan
        trained = len(plan.trained_exits)
        seq = cfg.data.seq_length
        row = Row(
            mode=cfg.soft.mode,
            precision=_precision(cfg),
            step_times=times,
            tokens_per_step=cfg.train.global_batch_size * seq,
            flops_per_token=flops.train_flops_per_token(
                cfg.model, seq, run.model.vocab_size, trained
            ),
            world_size=run.topo.world_size,
            peak_memory_gib=peak,
        )
        del run
    release_memory()
    return row


# ---------------------------------------------------------------------------------------------
# Report

HEADER = (
    "| mode | precision | step time (s, median) | tokens/s | model TFLOP/s/device | MFU "
    "| GFLOP/token | peak memory (GiB) |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def _mfu(row: Row, peak_tflops: float | None) -> str:
    return f"{row.tflops_per_device / peak_tflops:.1%}" if peak_tflops else "n/a"


def _mem(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b <= 0 else f"{a / b:.3f}x"


def table(rows: list[Row], peak_tflops: float | None) -> str:
    lines = [HEADER]
    for r in rows:
        lines.append(
            f"| {r.mode} | {r.precision} | {r.step_time:.4f} | {r.tokens_per_s:,.0f} | "
            f"{r.tflops_per_device:.4g} | {_mfu(r, peak_tflops)} | {r.flops_per_token / 1e9:.4g} | "
            f"{_mem(r.peak_memory_gib)} |"
        )
    for precision in dict.fromkeys(r.precision for r in rows):
        sft = next(r for r in rows if r.precision == precision and r.mode == "sft")
        soft = next(r for r in rows if r.precision == precision and r.mode == "soft")
        lines.append(
            f"| SoFT/SFT | {precision} | {_ratio(soft.step_time, sft.step_time)} | "
            f"{_ratio(soft.tokens_per_s, sft.tokens_per_s)} | "
            f"{_ratio(soft.tflops_per_device, sft.tflops_per_device)} | - | "
            f"{_ratio(soft.flops_per_token, sft.flops_per_token)} (predicted) | "
            f"{_ratio(soft.peak_memory_gib, sft.peak_memory_gib)} |"
        )
    return "\n".join(lines)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU ({platform.machine()}, {cores} cores visible)"


def environment_lines(argv: list[str]) -> list[str]:
    import megatron.core

    world = dist.get_world_size() if dist.is_initialized() else 1
    return [
        f"- date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}",
        f"- device: {device_name()} x {world} rank(s)",
        f"- torch {torch.__version__}, megatron-core {megatron.core.__version__}, Python {platform.python_version()}",
        f"- command: `python benchmarks/bench_soft_vs_sft.py {shlex.join(argv)}`",
    ]


def legend(gpu: bool) -> str:
    memory = (
        "torch.cuda.max_memory_allocated over build + steps (reset between modes)"
        if gpu
        else "peak RSS growth over build + steps (CPU, indicative: allocator pools blur it)"
    )
    return (
        f"Peak memory: {memory}. SoFT/SFT row: each column's ratio; GFLOP/token's is the "
        "predicted exit-FLOPs ratio (soft/training/flops.py)."
    )


def append_results(path: Path, title: str, body: str, argv: list[str]) -> None:
    with open(path, "a") as f:
        f.write(f"\n## {title}\n\n" + "\n".join(environment_lines(argv)) + f"\n\n{body}\n")


# ---------------------------------------------------------------------------------------------


def plans(args: argparse.Namespace, log: Callable[[str], None]) -> list[list[str]]:
    """Override sets, SFT before SoFT for each precision."""
    precisions = [list(args.overrides)]
    if args.fp8:
        if torch.cuda.is_available() and transformer_engine_available():
            precisions.append([*args.overrides, *FP8_OVERRIDES])
        else:
            log("--fp8: no CUDA GPU with Transformer Engine here; FP8 rows skipped")
    return [[*p, f"soft.mode={mode}"] for p in precisions for mode in ("sft", "soft")]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)

    def log(msg: str) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(msg, file=sys.stderr, flush=True)

    try:
        rows = []
        for overrides in plans(args, log):
            log(f"benchmarking {' '.join(overrides) or '(defaults)'} ...")
            rows.append(measure(args.config, overrides, args.warmup, args.steps))
    except ConfigError as exc:
        log(f"error: {exc}")
        return 2
    if dist.get_rank() != 0:
        return 0
    body = table(rows, flops.device_peak_tflops()) + "\n\n" + legend(torch.cuda.is_available())
    print(body)
    if args.append_results is not None:
        title = (
            f"{Path(args.config).stem if args.config else 'tiny default model'}, {device_name()}"
        )
        append_results(args.append_results, title, body, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
