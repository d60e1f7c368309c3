"""LoRA SoFT against full SoFT on the same model, side by side in one process.

`python benchmarks/bench_lora.py [--rank 16] [--warmup N] [--steps M]
[--append-results benchmarks/RESULTS.md] [key=value ...]`

Both variants start from the same base weights (the full run's initial weights, saved once),
train SoFT on the built-in tasks with every exit, and step in an order that rotates from
round to round, each on the next global batch of its own sampler. Per variant:
- trainable parameters and the bytes that training adds per rank, counted from the tensors
  themselves: weights (all), gradient buffers (megatron DDP's main_grad, trainable only),
  optimizer state (Adam's moments and fp32 main copies where the weights are 16-bit);
- activations saved for backward in one micro batch (unique storages seen by
  torch.autograd.graph.saved_tensors_hooks; the fused exit loss's chunk logits are freed in
  forward and not among them);
- step time, median over the rounds, and the paired ratio LoRA / full per round (min,
  median).

Default model: 8 layers of width 512 (ffn 1408, 8 heads), sequences of 256, micro batch 2 /
global batch 4, fp32; key=value overrides change it (e.g. model.params_dtype=bf16 on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soft.checkpointing.checkpoint import save  # noqa: E402
from soft.config.errors import InputError  # noqa: E402
from soft.config.root import load_config  # noqa: E402
from soft.data import ResumableBatchSampler  # noqa: E402
from soft.training.run import Run, setup  # noqa: E402
from soft.training.step import _run_schedule, microbatches, train_step  # noqa: E402

MODEL = [
    "model.num_layers=8", "model.hidden_size=512", "model.ffn_hidden_size=1408",
    "model.num_attention_heads=8", "data.seq_length=256", "train.micro_batch_size=2",
    "train.global_batch_size=4", "data.valid_fraction=0", "tracking.enabled=false",
    "train.lr=1e-4", "train.lr_warmup_iters=0", "train.train_iters=1000",
]  # fmt: skip


@dataclass
class Variant:
    name: str
    run: Run
    sampler: ResumableBatchSampler
    consumed: int = 0
    seconds: list[float] = field(default_factory=list)

    def batches(self) -> list:
        t = self.run.cfg.train
        out = microbatches(
            self.run.train_data,
            self.sampler,
            self.consumed,
            t.micro_batch_size,
            self.run.topo.device,
        )
        self.consumed += t.global_batch_size
        return out

    def step(self) -> float:
        batches = self.batches()
        _sync()
        start = time.perf_counter()
        train_step(
            self.run.model, self.run.optimizer, self.run.scheduler, batches, measure_untrained=False
        )
        _sync()
        return time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def static_bytes(run: Run) -> dict[str, int]:
    """Weights, gradient buffers and optimizer state, from the tensors themselves."""
    params = [p for c in run.model.unwrapped for p in c.parameters()]
    grads = [p.main_grad for p in params if getattr(p, "main_grad", None) is not None]
    state: list[torch.Tensor] = []
    for opt in getattr(run.optimizer, "chained_optimizers", [run.optimizer]):
        inner = opt.optimizer
        for values in inner.state.values():
            state.extend(v for v in values.values() if isinstance(v, torch.Tensor) and v.dim())
        for group in getattr(opt, "shard_fp32_from_float16_groups", []) or getattr(
            opt, "fp32_from_float16_groups", []
        ):
            state.extend(group)
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "weights": _bytes(params),
        "grads": _bytes(grads),
        "optimizer": _bytes(state),
    }


def saved_activation_bytes(variant: Variant) -> int:
    """Unique storages autograd saves for backward during one micro batch's forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    run = variant.run
    for chunk in run.model.chunks:
        chunk.zero_grad_buffer()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run_schedule(run.model, variant.batches()[:1], torch.ones(()))
    params = {p.untyped_storage().data_ptr() for c in run.model.unwrapped for p in c.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def build(name: str, overrides: list[str], out: Path, base: Path | None, rank: int) -> Variant:
    more = [f"train.output_dir={out / name}", f"data.cache_dir={out / 'cache'}"]
    if base is not None:
        more += ["peft.method=lora", f"peft.rank={rank}", f"peft.alpha={2 * rank}",
                 f"checkpoint.load_dir={base}", "checkpoint.finetune=true"]  # fmt: skip
    cfg = load_config(None, [*MODEL, *overrides, *more])
    run = setup(cfg)
    return Variant(
        name, run, ResumableBatchSampler(len(run.train_data), cfg.train.global_batch_size, 0)
    )


def _gib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def table(variants: list[Variant], static: dict[str, dict[str, int]], acts: dict[str, int]) -> str:
    full, lora = variants
    ratios = [b / a for a, b in zip(full.seconds, lora.seconds, strict=True)]
    lines = [
        "| variant | trainable params | weights | grads | optimizer | saved activations / micro "
        "batch | total | step time (s, median) | LoRA / full step time: min | median |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in variants:
        s = static[v.name]
        total = s["weights"] + s["grads"] + s["optimizer"] + acts[v.name]
        paired = "1.000x | 1.000x" if v is full else (
            f"{min(ratios):.3f}x | {statistics.median(ratios):.3f}x"
        )  # fmt: skip
        lines.append(
            f"| {v.name} | {s['trainable']:,} | {_gib(s['weights'])} | {_gib(s['grads'])} | "
            f"{_gib(s['optimizer'])} | {_gib(acts[v.name])} | {_gib(total)} | "
            f"{statistics.median(v.seconds):.3f} | {paired} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="timed rounds")
    parser.add_argument("--append-results", type=Path, help="append the table here")
    parser.add_argument("overrides", nargs="*", help="config key=value for both variants")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp_name:
        tmp = Path(tmp_name)
        try:
            full = build("full", args.overrides, tmp, None, args.rank)
            base = tmp / "base"
            save(base, full.run.model.unwrapped, full.run.state, full.run.cfg)
            lora = build("lora", args.overrides, tmp, base, args.rank)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        variants = [full, lora]
        for r in range(args.warmup + args.steps):
            for v in variants[r % 2 :] + variants[: r % 2]:  # a rotating order
                seconds = v.step()
                if r >= args.warmup:
                    v.seconds.append(seconds)
        static = {v.name: static_bytes(v.run) for v in variants}
        acts = {v.name: saved_activation_bytes(v) for v in variants}
        result = table(variants, static, acts)
    print(result, flush=True)
    if args.append_results is not None:
        with open(args.append_results, "a") as f:
            f.write(f"\n## LoRA SoFT vs full SoFT: parameters, memory, step time\n\n- command: "
                    f"`python benchmarks/bench_lora.py {' '.join(argv or sys.argv[1:])}`\n"
                    f"- date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}\n\n"
                    f"{result}\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
