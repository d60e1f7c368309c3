"""Decoding speed of a SoFT model: full, every exit, dynamic exit, self-speculative.

`python benchmarks/bench_decoding.py [--model-dir HF_DIR] [--prompt TEXT] [--max-new-tokens N]
[--repeats R] [--draft-exits 1,2] [--num-draft 2,4] [--thresholds 0.5]`

Without --model-dir it builds a tiny random 6-layer LLaMA (exits 2,4,6), whose numbers only
show per-layer overheads, not a trained model's acceptance rates. Prints one markdown table
with tokens/s and speed-up against the full model (median of --repeats runs after a warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soft.evaluation.decoding import GenerationResult, LayerRunner, greedy_generate  # noqa: E402
from soft.evaluation.dynamic import dynamic_generate  # noqa: E402
from soft.evaluation.model_io import (  # noqa: E402
    load_exported_model,
    parse_float_list,
    parse_int_list,
    resolve_exits,
)
from soft.evaluation.report import markdown_table  # noqa: E402
from soft.evaluation.speculative import speculative_generate  # noqa: E402

COLUMNS = (
    "method",
    "tokens_per_s",
    "ms_per_token",
    "speedup",
    "avg_depth",
    "acceptance",
    "same_as_full",
)


def tiny_random_model(seed: int = 0, deep_scale: float | None = None):
    """A 6-layer random LLaMA with peaked logits; no tokenizer needed (prompt = fixed ids).

    `deep_scale` damps layers >= 2's residual writes so shallow exits agree with the full
    model more often, imitating a trained SoFT model's acceptance rates."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=32000, max_position_embeddings=1024, initializer_range=0.5,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if deep_scale is not None:
        with torch.no_grad():
            for layer in model.model.layers[2:]:
                layer.self_attn.o_proj.weight.mul_(deep_scale)
                layer.mlp.down_proj.weight.mul_(deep_scale)
    return model


def run_interleaved(
    methods: dict[str, Callable[[], GenerationResult]], repeats: int
) -> dict[str, tuple[GenerationResult, float]]:
    """Warm every method up, then time them round-robin so load changes on a shared machine
    hit all alike; returns each method's last result and median ms/token."""
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    last: dict[str, GenerationResult] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            last[name] = fn()
            times[name].append(last[name].ms_per_token)
    return {name: (last[name], statistics.median(times[name])) for name in methods}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", default=None, help="exported HF folder (default: tiny random)"
    )
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--draft-exits", default=None, help="default: the two shallowest exits")
    parser.add_argument("--num-draft", default="2,4")
    parser.add_argument(
        "--thresholds", default="0.5", help="dynamic exit thresholds (one or per exit)"
    )
    parser.add_argument(
        "--tiny-deep-scale", type=float, default=None,
        help="tiny random model only: damp deep layers (e.g. 0.15) so exits agree more often",
    )  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)

    if args.model_dir:
        exported = load_exported_model(args.model_dir, device=args.device, dtype=args.dtype)
        model, prompt_ids = exported.model, exported.tokenizer.encode(args.prompt, bos=True)
        exits = resolve_exits(None, exported)
        stops = {exported.tokenizer.eos_id}
    else:
        model, prompt_ids, exits, stops = (
            tiny_random_model(deep_scale=args.tiny_deep_scale),
            [1, 450, 7483, 310, 3444, 338],
            [2, 4, 6],
            set(),
        )
    runner = LayerRunner(model)
    n, repeats = args.max_new_tokens, args.repeats
    draft_exits = (
        parse_int_list(args.draft_exits, "--draft-exits")
        if args.draft_exits
        else [e for e in exits[:2] if e < runner.num_layers]
    )
    thresholds = parse_float_list(args.thresholds, "--thresholds")

    methods: dict[str, Callable[[], GenerationResult]] = {
        "full": lambda: greedy_generate(runner, prompt_ids, n, None, stops)
    }
    for k in exits[:-1]:
        methods[f"exit {k}"] = lambda k=k: greedy_generate(runner, prompt_ids, n, k, stops)
    methods[f"dynamic {exits} > {thresholds}"] = lambda: dynamic_generate(
        runner, prompt_ids, n, exits, thresholds, stops
    )
    for k in draft_exits:
        for d in parse_int_list(args.num_draft, "--num-draft"):
            methods[f"speculative exit {k} N={d}"] = lambda k=k, d=d: speculative_generate(
                runner, prompt_ids, n, k, d, stops
            )
    timings = run_interleaved(methods, repeats)
    full, full_ms = timings["full"]
    rows = []
    for name, (result, ms) in timings.items():
        stats = result.stats
        rows.append({
            "method": name, "tokens_per_s": 1000.0 / ms, "ms_per_token": ms, "speedup": full_ms / ms,
            "avg_depth": stats.get("average_exit_depth"), "acceptance": stats.get("acceptance_rate"),
            "same_as_full": result.token_ids == full.token_ids,
        })  # fmt: skip

    device = model.lm_head.weight.device
    name = args.model_dir or f"tiny random 6-layer (deep scale {args.tiny_deep_scale})"
    print(f"model: {name} | device {device} | dtype {model.dtype} | "
          f"{n} new tokens, median of {repeats} | torch threads {torch.get_num_threads()}\n")  # fmt: skip
    print(markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
