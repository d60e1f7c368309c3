"""Greedy generation with an exported SoFT model: full, one exit, dynamic exit or speculative.

`soft-generate --model-dir HF_DIR --prompt TEXT [--prompt-template alpaca|chat] [--max-new-tokens N]
[--mode full|exit|dynamic|speculative] [--exit-layer K] [--draft-exit K] [--num-draft N]
[--thresholds T1,T2,...] [--exits K1,K2,...] [--compare-full] [--json]`
(or `python tools/generate.py ...`)

Dynamic mode exits a token at the first early exit whose max softmax probability is
strictly greater than its threshold (1.0 = never exit early, 0.0 = always the first exit).
"""

from __future__ import annotations

import argparse
import json
import sys

from soft.config.errors import exit_status_of
from soft.data.prompts import PROMPT_TEMPLATES
from soft.evaluation.inference import MODES, GenerateOptions, generate_text
from soft.evaluation.model_io import (
    load_exported_model,
    parse_float_list,
    parse_int_list,
)

SUMMARY_KEYS = (
    "num_tokens", "tokens_per_s", "average_exit_depth", "exit_counts", "recomputed_positions",
    "acceptance_rate", "tokens_per_round", "speedup", "identical_to_full",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", required=True, help="exported HF folder (any supported family)"
    )
    parser.add_argument(
        "--prompt", required=True,
        help="prompt text: fed as it is after BOS (alpaca), or as one user turn (chat)",
    )  # fmt: skip
    parser.add_argument(
        "--prompt-template", default="alpaca", choices=PROMPT_TEMPLATES,
        help="alpaca = the text as it is; chat = the tokenizer's chat template with its "
        "generation prompt (as data.prompt_template=chat trained it)",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--mode", default="full", choices=MODES)
    parser.add_argument("--exit-layer", type=int, default=None, help="exit mode: layers to run")
    parser.add_argument(
        "--draft-exit", type=int, default=None,
        help="speculative mode: drafting exit (default: the shallowest recorded exit)",
    )  # fmt: skip
    parser.add_argument("--num-draft", type=int, default=4, help="speculative: drafts per round")
    parser.add_argument(
        "--thresholds", default=None,
        help="dynamic mode: max-probability thresholds, one per early exit or one for all",
    )  # fmt: skip
    parser.add_argument(
        "--exits", default=None,
        help="dynamic mode: exits to use (default: soft_exit_layers in config.json)",
    )  # fmt: skip
    parser.add_argument("--stop-at-newline", action="store_true", help="also stop at a newline")
    parser.add_argument(
        "--compare-full", action="store_true",
        help="also run the full model: report speed-up and agreement with its output",
    )  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The console script: bad input is one `error:` line and exit status 2."""
    return exit_status_of(run, argv)


def run(argv: list[str] | None = None) -> int:
    """Generate and print; bad input raises InputError (ConfigError naming the option)."""
    args = build_parser().parse_args(argv)
    options = GenerateOptions(
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        exit_layer=args.exit_layer,
        draft_exit=args.draft_exit,
        num_draft=args.num_draft,
        thresholds=parse_float_list(args.thresholds, "--thresholds") if args.thresholds else None,
        exits=parse_int_list(args.exits, "--exits") if args.exits else None,
        stop_at_newline=args.stop_at_newline,
    )
    exported = load_exported_model(args.model_dir, device=args.device, dtype=args.dtype)
    result = generate_text(
        exported, args.prompt, options, compare_full=args.compare_full,
        prompt_template=args.prompt_template,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    print(result["text"])
    summary = ", ".join(f"{k}={result[k]}" for k in SUMMARY_KEYS if k in result)
    print(f"\n[{args.mode}] {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # python -m soft.evaluation.cli_generate
    raise SystemExit(main())
