"""Packed sequences (data.packing) against one padded example per sequence, side by side.

`python benchmarks/bench_packing.py [--seq 512,2048] [--warmup N] [--steps M]
[--append-results benchmarks/RESULTS.md] [key=value ...]`

Two tables:

1. Token slots (a count, no model): for every data set found, at every length, the share of
   token slots that are padding with one example per sequence and with packing, examples per
   pack, and the gain packing can give at most: packed fill / padded fill (a step costs the
   same for both, its shape being fixed, so response tokens per second scale with the fill).
   Data: the GSM8K-Alpaca training set and the self-instruct seed tasks (first instance of
   each) with the LLaMA-2 tokenizer from the shared data folder (../shared/data, or
   $SOFT_SHARED_DATA) when present, and always the built-in tasks with the built-in tokenizer.
2. Training speed: the same model (the embedded tiny one unless key=value overrides say
   otherwise) trained on GSM8K-Alpaca (else the built-in tasks) padded and packed, each built
   once in this process; every round runs one optimizer step of each variant, in an order
   that rotates from round to round, on the next global batch of its own data. Response tokens
   per second is the loss-token count of the step over its time; the ratio packed / padded is
   taken per round (paired), min and median over the rounds.

The global batch is counted in sequences, so both variants run the same shapes: with packing a
sequence holds several examples. Sizes per length (--seq): 512 -> 4 sequences per step
(micro batch 2), 2048 -> 1, unless train.global_batch_size / train.micro_batch_size are given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soft.config.errors import InputError  # noqa: E402
from soft.config.root import load_config  # noqa: E402
from soft.data import DataConfig, ResumableBatchSampler, build_datasets  # noqa: E402
from soft.training.run import Run, setup  # noqa: E402
from soft.training.step import microbatches, train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SOFT_SHARED_DATA", REPO.parent / "shared" / "data"))
GSM8K = SHARED / "gsm8k-alpaca" / "gsm8k_train_alpaca.json"
SELF_INSTRUCT = SHARED / "self-instruct-seeds" / "seed_tasks.jsonl"
LLAMA2 = SHARED / "llama2-tokenizer" / "tokenizer.model"
BATCH = {512: (4, 2)}  # seq -> (global, micro) batch in sequences; others: (1, 1)


def data_sets(tmp: Path) -> dict[str, dict[str, str | None]]:
    """name -> data.* overrides (train_path, tokenizer_path) of every data set found."""
    found: dict[str, dict[str, str | None]] = {}
    if LLAMA2.is_file() and GSM8K.is_file():
        found["gsm8k-alpaca"] = {"train_path": str(GSM8K), "tokenizer_path": str(LLAMA2)}
    if LLAMA2.is_file() and SELF_INSTRUCT.is_file():
        path = tmp / "self_instruct_alpaca.jsonl"
        with open(SELF_INSTRUCT) as src, open(path, "w") as out:
            for line in src:
                task = json.loads(line)
                first = task["instances"][0]
                record = {"instruction": task["instruction"], "input": first["input"],
                          "output": first["output"]}  # fmt: skip
                out.write(json.dumps(record) + "\n")
        found["self-instruct-seeds"] = {"train_path": str(path), "tokenizer_path": str(LLAMA2)}
    found["built-in tasks"] = {"train_path": None, "tokenizer_path": None}
    return found


def count_table(sets: dict[str, dict[str, str | None]], seqs: list[int], cache: Path) -> str:
    lines = [
        "| data | seq | examples | padding, one per sequence | padding, packed | "
        "examples per pack (mean / max) | sequences packed / padded | expected gain (packed fill / padded fill) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, paths in sets.items():
        for seq in seqs:
            common = dict(paths, seq_length=seq, valid_fraction=0.0, cache_dir=str(cache))
            padded, _, _ = build_datasets(DataConfig(**common), seed=0)
            packed, _, _ = build_datasets(DataConfig(**common, packing=True), seed=0)
            assert packed.packs is not None
            per_pack = [len(packed.packs.pack(p)) for p in range(len(packed))]
            fill_pad, fill_pack = padded.fill_ratio(), packed.fill_ratio()
            lines.append(
                f"| {name} | {seq} | {len(padded)} | {100 * (1 - fill_pad):.1f}% | "
                f"{100 * (1 - fill_pack):.1f}% | {statistics.mean(per_pack):.2f} / "
                f"{max(per_pack)} | {len(packed) / len(padded):.3f} | "
                f"{fill_pack / fill_pad:.2f}x |"
            )
    return "\n".join(lines)


@dataclass
class Variant:
    name: str
    seq: int
    run: Run
    sampler: ResumableBatchSampler
    consumed: int = 0
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def step(self) -> tuple[float, int]:
        t = self.run.cfg.train
        device = self.run.topo.device
        batches = microbatches(
            self.run.train_data, self.sampler, self.consumed, t.micro_batch_size, device
        )
        self.consumed += t.global_batch_size
        _sync()
        start = time.perf_counter()
        result = train_step(
            self.run.model, self.run.optimizer, self.run.scheduler, batches, measure_untrained=False
        )
        _sync()
        return time.perf_counter() - start, result.num_tokens


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(name: str, seq: int, data: dict[str, str | None], overrides: list[str], out: Path):
    glob, micro = BATCH.get(seq, (1, 1))
    sizes = [f"train.global_batch_size={glob}", f"train.micro_batch_size={micro}"]
    keys = [f"data.{k}={'null' if v is None else v}" for k, v in data.items()]
    cfg = load_config(
        None,
        [*sizes, *keys, f"data.seq_length={seq}", f"data.packing={name == 'packed'}".lower(),
         "data.valid_fraction=0", f"data.cache_dir={out / 'cache'}", *overrides,
         f"train.output_dir={out / name}"],
    )  # fmt: skip
    run = setup(cfg)
    sampler = ResumableBatchSampler(len(run.train_data), cfg.train.global_batch_size, 0)
    return Variant(name, seq, run, sampler)


def speed_table(variants: list[Variant]) -> str:
    lines = [
        "| seq | variant | sequences/step | step time (s, median) | response tokens/step "
        "(mean) | response tokens/s | packed / padded tokens/s: min | median |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by_seq: dict[int, dict[str, Variant]] = {}
    for v in variants:
        by_seq.setdefault(v.seq, {})[v.name] = v
    for seq, pair in by_seq.items():
        pad, pack = pair["padded"], pair["packed"]
        rate = {
            n: [t / s for t, s in zip(v.tokens, v.seconds, strict=True)] for n, v in pair.items()
        }
        ratios = [a / b for a, b in zip(rate["packed"], rate["padded"], strict=True)]
        for v in (pad, pack):
            paired = "1.000x | 1.000x" if v is pad else (
                f"{min(ratios):.3f}x | {statistics.median(ratios):.3f}x"
            )  # fmt: skip
            lines.append(
                f"| {seq} | {v.name} | {v.run.cfg.train.global_batch_size} | "
                f"{statistics.median(v.seconds):.4f} | {statistics.mean(v.tokens):.1f} | "
                f"{statistics.median(rate[v.name]):,.0f} | {paired} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="512,2048", help="sequence lengths, comma-separated")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="timed rounds")
    parser.add_argument("--no-train", action="store_true", help="the count table only")
    parser.add_argument("--append-results", type=Path, help="append both tables here")
    parser.add_argument("overrides", nargs="*", help="config key=value for the trained model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seqs = [int(s) for s in args.seq.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_packing_") as tmp_name:
        tmp = Path(tmp_name)
        sets = data_sets(tmp)
        try:
            counts = count_table(sets, seqs, tmp / "cache")
            print(counts, flush=True)
            speeds = ""
            if not args.no_train:
                data = next(iter(sets.values()))  # GSM8K-Alpaca when present
                variants = [
                    build(name, seq, data, args.overrides, tmp)
                    for seq in seqs
                    for name in ("padded", "packed")
                ]
                for r in range(args.warmup + args.steps):
                    shift = r % len(variants)
                    for v in variants[shift:] + variants[:shift]:  # a rotating order
                        seconds, tokens = v.step()
                        if r >= args.warmup:
                            v.seconds.append(seconds)
                            v.tokens.append(tokens)
                speeds = speed_table(variants)
                print(f"\ntrained on: {next(iter(sets))}\n{speeds}", flush=True)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.append_results is not None:
        with open(args.append_results, "a") as f:
            f.write(f"\n## data.packing: padding and speed\n\n- command: `python "
                    f"benchmarks/bench_packing.py {' '.join(argv or sys.argv[1:])}`\n"
                    f"- date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}\n\n"
                    f"{counts}\n\n{speeds}\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
