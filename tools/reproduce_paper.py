"""Reproduce the SoFT paper's comparison at small scale: SoFT vs SFT vs SFT+ICT vs extracted
sub-models, every exit, one command (defaults finish in about half an hour on a 2-core CPU).

    python tools/reproduce_paper.py [--out runs/paper_repro] [--scale 1.0] [--nproc-per-node 1]
        [--jobs N] [--reuse-base] [--mini] [--corpus PATH | --no-pretrain] [--mlflow-uri URI]
        [--seed S | --seeds S1,S2,...] [--data-seed D] [key=value ...]

1. base: a LLaMA-2-shaped model pretrained as plain text on --corpus (README's results: GSM8K
   train in Alpaca format), with a BPE tokenizer trained for the experiment (<out>/tokenizer.model);
2. sft, soft, extracted_<k> fine-tuned from it on the built-in instruction tasks, ict from sft;
3. every exit evaluated on held-out prompts (loss, exact match), SoFT's per-prompt win rates;
4. <out>/results.md, results.json, results.png, and an MLflow parent run "paper_repro" over the
   training runs in <out>/mlflow.db.

Seeds: --seed S (default 42) is every fine-tuning run's train.seed and, unless --data-seed D
is given, the seed that draws the fine-tuning records and held-out prompts; results.md/.json
report both. --seeds 42,1234,7 runs the whole comparison once per seed (<out>/seed_<s>, each
a complete result) from one pretrained base shared by all seeds (<out>/base), and writes
the mean, spread and per-claim sign agreement to <out>/results.md/.json/.png; a rerun with
the same --out reuses the finished seeds.

Extra key=value overrides are applied to every training run (e.g. train.lr=5e-4); keys the
experiment sets per run (modes, exits, data, checkpoints, paths, train.seed) are refused. --scale S
multiplies depth, width, steps, data sizes and vocabulary: see soft/experiments/settings.py.
Runs that do not depend on each other (sft, soft, extracted) train side by side, --jobs at a
time. Each run's output goes to <out>/runs/<name>.log. OMP_NUM_THREADS (default 1 per rank) sets
the CPU threads of every run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soft.config.errors import InputError  # noqa: E402
from soft.data.builtin import TASKS  # noqa: E402
from soft.experiments import Options, reproduce  # noqa: E402
from soft.experiments.runner import RunFailed  # noqa: E402
from soft.experiments.seeds import parse_seeds  # noqa: E402
from soft.experiments.settings import DEFAULT_TASKS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/paper_repro"), help="output dir")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="size multiplier (1 = the 2-core CPU default)"
    )
    parser.add_argument("--nproc-per-node", type=int, default=1, help="ranks per training run")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="training runs at a time (default: CPU cores / nproc, at most 4; 1 with a GPU)",
    )
    parser.add_argument(
        "--reuse-base", action="store_true", help="skip pretraining: use <out>/runs/base as is"
    )
    parser.add_argument(
        "--mini", action="store_true", help="a few steps of a tiny model (smoke test, minutes)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="Alpaca JSON file to pretrain the base on (required unless --no-pretrain)",
    )
    source.add_argument(
        "--no-pretrain", action="store_true", help="no base: fine-tune from a random init"
    )
    parser.add_argument(
        "--mlflow-uri", default=None, help="MLflow tracking URI (default sqlite:///<out>/mlflow.db)"
    )
    parser.add_argument("--experiment", default="paper_repro", help="MLflow experiment name")
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated built-in fine-tuning tasks, or 'all' (default: "
        f"{','.join(DEFAULT_TASKS)})",
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed", type=int, default=42, help="train.seed of every fine-tuning run (default 42)"
    )
    seeds.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds: the comparison once per seed, then mean and spread",
    )
    parser.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="seed of the fine-tuning records and test prompts (default: the training seed)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every training run")
    args = parser.parse_args(argv)
    tasks = None
    if args.tasks is not None:
        tasks = sorted(TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",")]
    return Options(
        out=args.out,
        scale=args.scale,
        nproc_per_node=args.nproc_per_node,
        jobs=args.jobs,
        reuse_base=args.reuse_base,
        mini=args.mini,
        corpus=args.corpus,
        pretrain=not args.no_pretrain,
        mlflow_uri=args.mlflow_uri,
        experiment=args.experiment,
        tasks=tasks,
        overrides=args.overrides,
        seed=args.seed,
        data_seed=args.data_seed,
        seeds=None if args.seeds is None else parse_seeds(args.seeds),
    )


def main(argv: list[str] | None = None) -> int:
    try:
        options = parse_args(argv)
        reproduce(options)
    except (InputError, RunFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InputError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
