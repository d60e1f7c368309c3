"""Training cost of SoFT against SFT on the same model and layout, measured side by side.

`python benchmarks/bench_soft_vs_sft.py [--config CFG.yaml] [--warmup N] [--steps M] [--fp8]
[--variants a,b,...] [--append-results benchmarks/RESULTS.md] [key=value ...]`

Every variant is built once (`soft.training.run.setup`) in this process, then the timed steps
run in rounds: each round times one optimizer step of every variant, in an order that rotates
from round to round, so slow drift of the machine (another job, thermal limits) falls on all
variants alike. A variant's cost is reported as the ratio of its step time to pure SFT's in
the same round: min and median over the rounds. Variants:

- `sft`: pure SFT, the last layer's loss only (soft.exit_layers=[L]): the baseline;
- `sft+idle-exits`: sft with every exit listed, on a step that logs nothing (the default
  soft.log_untrained_exits=interval computes no exit there: should cost what `sft` does);
- `sft+logged-exits`: the same on a step that measures every exit (forward only);
- `soft-fused`, `soft-recompute`, `soft-plain`: SoFT with each exit-loss implementation
  (soft.models.exit_loss).
Step memory: one more step per variant, its allocation peak above what was allocated before
it (CUDA: torch.cuda.max_memory_allocated; CPU: the same from the torch profiler's
allocation events).
Predicted: the FLOPs ratio for the same baseline (soft/models/flops.py; forward-only exits
count 2·h·V per token, trained ones 6·h·V). With --fp8 (GPU + Transformer Engine) every
variant runs again with model.fp8=hybrid. Under torchrun a step's time is the slowest rank's.
Without --config: the embedded tiny model, whose numbers show overheads, not a real model.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soft.config.errors import ConfigError, InputError  # noqa: E402
from soft.config.root import load_config  # noqa: E402
from soft.data import ResumableBatchSampler  # noqa: E402
from soft.models import flops  # noqa: E402
from soft.models.gpt import transformer_engine_available  # noqa: E402
from soft.training.run import Run, setup  # noqa: E402
from soft.training.step import (
    microbatches,  # noqa: E402
    train_step,  # noqa: E402
)

# Hybrid = E4M3 forward, E5M2 gradients: the usual FP8 training recipe.
FP8_OVERRIDES = ["model.params_dtype=bf16", "model.fp8=hybrid"]


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]
    measure_untrained: bool = False  # the step computes the exits that do not train


def variants(num_layers: int) -> dict[str, Variant]:
    every = ("soft.exit_layers=null",)
    return {
        v.name: v
        for v in (
            Variant("sft", ("soft.mode=sft", f"soft.exit_layers=[{num_layers}]")),
            Variant("sft+idle-exits", ("soft.mode=sft", *every)),
            Variant("sft+logged-exits", ("soft.mode=sft", *every), measure_untrained=True),
            Variant("soft-fused", ("soft.mode=soft", "soft.exit_loss=fused")),
            Variant("soft-recompute", ("soft.mode=soft", "soft.exit_loss=recompute")),
            Variant("soft-plain", ("soft.mode=soft", "soft.exit_loss=plain")),
        )
    }


@dataclass
class Measured:
    variant: Variant
    precision: str
    run: Run | None  # released once measured (the report needs the rest)
    batches: list
    cfg: object = None
    plan: object = None
    vocab_size: int = 0
    world_size: int = 1
    step_times: list[float] = field(default_factory=list)
    step_peak_gib: float | None = None

    def __post_init__(self) -> None:
        self.cfg, self.plan = self.run.cfg, self.run.model.plan
        self.vocab_size, self.world_size = self.run.model.vocab_size, self.run.topo.world_size

    def release(self) -> None:
        if self.run is not None and self.run.lock is not None:
            self.run.lock.release()
        self.run, self.batches = None, []

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.data.seq_length

    def flops_per_token(self) -> float:
        trained = len(self.plan.trained_exits)
        logged = len(self.plan.layers) - trained if self.variant.measure_untrained else 0
        train = flops.train_flops_per_token(
            self.cfg.model, self.cfg.data.seq_length, self.vocab_size, trained
        )
        return train + logged * 2 * self.cfg.model.hidden_size * self.vocab_size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML config (default: the embedded tiny model)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    p.add_argument("--steps", type=int, default=8, help="timed rounds (one step per variant)")
    p.add_argument(
        "--variants", default=None, help="comma-separated subset (default: all; sft always runs)"
    )
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
# Measuring


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


def one_step(m: Measured) -> None:
    train_step(
        m.run.model, m.run.optimizer, m.run.scheduler, m.batches, m.variant.measure_untrained
    )


def timed_step(m: Measured) -> float:
    _sync()
    started = time.perf_counter()
    one_step(m)
    _sync()
    return slowest_rank(time.perf_counter() - started)


def step_peak_gib(m: Measured) -> float:
    """Allocation peak of one step above what was allocated before it."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        one_step(m)
        _sync()
        return (torch.cuda.max_memory_allocated() - before) / 2**30
    return cpu_step_peak_bytes(lambda: one_step(m)) / 2**30


def cpu_step_peak_bytes(step: Callable[[], None]) -> int:
    """The CUDA measure's CPU counterpart: the running sum of the allocations and frees the
    profiler records during `step`, its maximum. The CPU profiler cannot size a block made
    before it started, so a free of such a tensor is not subtracted: an upper bound of
    max_memory_allocated - before, by what the step frees of earlier tensors.

    Not `export_memory_timeline`: its data-flow analysis asserts on some steps ("duplicate
    outputs: aten::sum", torch 2.13, seen in CI), and it adds the earlier tensors that the
    step frees to the step's peak."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, _utils, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    tree = prof.profiler.kineto_results.experimental_event_tree()
    changes = sorted(
        (event.start_time_ns, event.typed[1].alloc_size)
        for event in _utils.traverse_dfs(tree)
        if event.typed[0] == _EventType.Allocation
    )
    live = peak = 0
    for _, size in changes:
        live += size
        peak = max(peak, live)
    return peak


def build(config, overrides, variant: Variant, precision: str, out: Path) -> Measured:
    cfg = load_config(config, [*overrides, *variant.overrides, f"train.output_dir={out}"])
    run = setup(cfg)
    t = cfg.train
    sampler = ResumableBatchSampler(len(run.train_data), t.global_batch_size, t.seed)
    batches = microbatches(run.train_data, sampler, 0, t.micro_batch_size, run.topo.device)
    return Measured(variant, precision, run, batches)


def measure_all(args, chosen: list[Variant], log: Callable[[str], None]) -> list[Measured]:
    precisions = {"": list(args.overrides)}
    if args.fp8:
        if torch.cuda.is_available() and transformer_engine_available():
            precisions["fp8"] = [*args.overrides, *FP8_OVERRIDES]
        else:
            log("--fp8: no CUDA GPU with Transformer Engine here; FP8 rows skipped")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_soft_") as tmp:
        for tag, overrides in precisions.items():
            built = []
            for v in chosen:
                log(f"building {v.name} {tag}...")
                built.append(build(args.config, overrides, v, tag, Path(tmp) / f"{v.name}{tag}"))
            for r in range(args.warmup + args.steps):
                shift = r % len(built)
                for m in built[shift:] + built[:shift]:  # a rotating order
                    seconds = timed_step(m)
                    if r >= args.warmup:
                        m.step_times.append(seconds)
            for m in built:
                m.step_peak_gib = step_peak_gib(m)
                m.release()  # the next precision's models need the memory
            results += built
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------------------
# Report

HEADER = (
    "| variant | precision | step time (s, median) | vs sft: min | vs sft: median | predicted "
    "(FLOPs) | tokens/s | model TFLOP/s/device | MFU | step memory peak (GiB) | vs sft |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def _precision(m: Measured) -> str:
    cfg = m.cfg
    return cfg.model.params_dtype + (f"+fp8 {cfg.model.fp8}" if cfg.model.fp8 else "")


def table(results: list[Measured], peak_tflops: float | None) -> str:
    lines = [HEADER]
    for m in results:
        base = next(b for b in results if b.precision == m.precision and b.variant.name == "sft")
        paired = [t / b for t, b in zip(m.step_times, base.step_times, strict=True)]
        median = statistics.median(m.step_times)
        tokens_per_s = m.tokens_per_step / median
        tflops = tokens_per_s * m.flops_per_token() / 1e12 / m.world_size
        mfu = f"{tflops / peak_tflops:.1%}" if peak_tflops else "n/a"
        predicted = m.flops_per_token() / base.flops_per_token()
        memory = base.step_peak_gib or float("nan")
        lines.append(
            f"| {m.variant.name} | {_precision(m)} | {median:.4f} | {min(paired):.3f}x | "
            f"{statistics.median(paired):.3f}x | {predicted:.3f}x | {tokens_per_s:,.0f} | "
            f"{tflops:.4g} | {mfu} | {m.step_peak_gib:.4f} | {m.step_peak_gib / memory:.3f}x |"
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
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return [
        f"- date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}",
        f"- device: {device_name()} x {world} rank(s); load average at the end: {load}",
        f"- torch {torch.__version__}, megatron-core {megatron.core.__version__}, Python {platform.python_version()}",
        f"- threads: torch {torch.get_num_threads()}",
        f"- command: `python benchmarks/bench_soft_vs_sft.py {shlex.join(argv)}`",
    ]


def legend(gpu: bool) -> str:
    memory = (
        "torch.cuda.max_memory_allocated during one step minus what was allocated before it"
        if gpu
        else "one step's allocation peak above what was allocated before it"
        " (CPU: the torch profiler's allocation events)"
    )
    return (
        "Ratios are per round (paired with sft's step of the same round): min and median. "
        f"Step memory: {memory}. Predicted: FLOPs per token over sft's (soft/models/flops.py)."
    )


def append_results(path: Path, title: str, body: str, argv: list[str]) -> None:
    with open(path, "a") as f:
        f.write(f"\n## {title}\n\n" + "\n".join(environment_lines(argv)) + f"\n\n{body}\n")


def choose(args, num_layers: int) -> list[Variant]:
    every = variants(num_layers)
    names = list(every) if args.variants is None else ["sft", *args.variants.split(",")]
    unknown = [n for n in names if n not in every]
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; known: {', '.join(every)}")
    return [every[n] for n in dict.fromkeys(names)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)

    def log(msg: str) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(msg, file=sys.stderr, flush=True)

    try:
        num_layers = load_config(args.config, list(args.overrides)).model.num_layers
        results = measure_all(args, choose(args, num_layers), log)
    except InputError as exc:
        log(f"error: {exc}")
        return 2
    if dist.get_rank() != 0:
        return 0
    body = table(results, flops.device_peak_tflops()) + "\n\n" + legend(torch.cuda.is_available())
    print(body)
    if args.append_results is not None:
        base = Path(args.config).stem if args.config else "embedded config"
        title = f"{base}{' + overrides' if args.overrides else ''}, {device_name()}"
        append_results(args.append_results, title, body, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
