"""Evaluate every SoFT exit of an exported HF model: loss, perplexity, exact match, speed.

`soft-eval --model-dir HF_DIR --data FILE|FOLDER|hf://ID
--format alpaca|triviaqa|messages|text [--prompt-template alpaca|chat] [--exits 12,16,...]
[--max-new-tokens N] [--limit N] [--batch-size 8] [--out results.json] [--mlflow-uri URI]`
(or `python tools/eval_exits.py ...`)

Writes results.json (one record per exit), results.md (the table also printed here) and
results.png (quality and speed against exit depth); logs all of it to MLflow when asked.
"""

from __future__ import annotations

import argparse

from soft.config.errors import exit_status_of
from soft.data.prompts import PROMPT_TEMPLATES
from soft.evaluation.model_io import parse_int_list
from soft.evaluation.records import FORMATS
from soft.evaluation.runner import run_eval_exits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir",
        required=True,
        help="exported HF folder of any supported family (with its tokenizer)",
    )
    parser.add_argument(
        "--data", required=True,
        help="evaluation data: a .json/.jsonl/.parquet/.txt file, a dataset folder, or "
        "hf://OWNER/NAME?config=...&split=... (as data.train_path)",
    )  # fmt: skip
    parser.add_argument("--format", required=True, choices=FORMATS, help="record format of --data")
    parser.add_argument(
        "--prompt-template", default="alpaca", choices=PROMPT_TEMPLATES,
        help="how the model was trained to read prompts (data.prompt_template): alpaca = the "
        "format's own prompt; chat = the tokenizer's chat template",
    )  # fmt: skip
    parser.add_argument(
        "--exits", default=None,
        help="comma-separated exit layers; default: soft_exit_layers in config.json, else every "
        "layer (the full model is always added as the speed-up reference)",
    )  # fmt: skip
    parser.add_argument(
        "--max-new-tokens", type=int, default=32,
        help="greedy generation budget per example and exit (0 = losses only, no speed/EM)",
    )  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N records")
    parser.add_argument(
        "--batch-size", type=int, default=8,
        help="examples per forward / generate call, batched by length with padding (the same "
        "losses and tokens as 1); speed columns are then per token of the batch's throughput: "
        "use 1 for single-stream latency",
    )  # fmt: skip
    parser.add_argument("--out", default="eval_exits.json", help="results JSON (.md/.png beside)")
    parser.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI to log the run to")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The console script: bad input is one `error:` line and exit status 2."""
    return exit_status_of(run, argv)


def run(argv: list[str] | None = None) -> int:
    """Run the evaluation; bad input raises InputError (ConfigError naming the option)."""
    args = build_parser().parse_args(argv)
    exits = parse_int_list(args.exits, "--exits") if args.exits is not None else None
    result = run_eval_exits(
        args.model_dir, args.data, args.format, exits=exits, max_new_tokens=args.max_new_tokens,
        limit=args.limit, out=args.out, mlflow_uri=args.mlflow_uri, device=args.device,
        dtype=args.dtype, progress=not args.no_progress, batch_size=args.batch_size,
        prompt_template=args.prompt_template,
    )  # fmt: skip
    print(result["table"])
    print(f"\nwrote {result['json']} and {result['plot']}")
    if result["mlflow_run_id"]:
        print(f"logged MLflow run {result['mlflow_run_id']} to {args.mlflow_uri}")
    return 0


if __name__ == "__main__":  # python -m soft.evaluation.cli_eval
    raise SystemExit(main())
