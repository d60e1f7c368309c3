"""Propose an uneven pipeline split that balances SoFT's exit heads over the stages.

`soft-plan --config configs/llama2_13b.yaml parallel.pipeline_model_parallel_size=4`
(or `python tools/plan_pipeline.py ...`)

Prints the per-stage cost table of the configured split, of the even split and of the
proposal (the feasible first/last pair with the smallest slowest stage), then the override to
paste. Pure arithmetic: builds no model, needs no GPU.
"""

from __future__ import annotations

import argparse
import sys

from soft.config.errors import ConfigError, InputError
from soft.config.root import RootConfig, load_config
from soft.parallel import balance


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML config (defaults: the embedded tiny model)")
    p.add_argument(
        "--vocab-size",
        type=int,
        help="unpadded vocabulary (default: model.vocab_size, else the tokenizer's)",
    )
    p.add_argument(
        "--head-recompute",
        action="store_true",
        help="count the chunked exit CE's forward recompute (8*h*V per trained exit, not 6*h*V)",
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return p.parse_args(argv)


def resolve_vocab(cfg: RootConfig, explicit: int | None) -> int:
    """Padded vocabulary the model will have: the LM head's width is what costs FLOPs."""
    from soft.models.gpt import padded_vocab_size

    vocab = explicit or cfg.model.vocab_size
    if vocab is None:
        from soft.data import build_tokenizer

        try:
            vocab = build_tokenizer(cfg.data).vocab_size
        except InputError as exc:
            raise ConfigError(f"{exc}; pass --vocab-size (LLaMA-2: 32000)") from exc
    return padded_vocab_size(vocab, cfg.model, cfg.parallel.tensor_model_parallel_size)


def section(title: str, lay: balance.Layout, tokens: int, reference: float, tp: int) -> str:
    return (
        f"### {title}: layers per stage {lay.counts}, slowest stage {lay.max_cost / reference:.1%} "
        f"of the even split's, pipeline efficiency {lay.efficiency:.1%}\n\n"
        f"{balance.format_table(lay, tokens, reference, tp)}\n"
    )


def report(cfg: RootConfig, vocab: int, head_recompute: bool) -> str:
    plan, par = cfg.exit_plan(), cfg.parallel
    seq, tp = cfg.data.seq_length, par.tensor_model_parallel_size
    cost = balance.CostModel.build(cfg.model, seq, vocab, head_recompute)
    tokens = cfg.train.global_batch_size * seq
    current = balance.layout(par, plan, cost)
    even = balance.even_layout(par, plan, cost)
    best = balance.propose(par, plan, cost)
    reference = (even or current).max_cost
    out = [
        f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, vocab {vocab} (padded), "
        f"seq {seq}, {tokens} tokens/step; PP={par.pipeline_model_parallel_size}, TP={tp}",
        f"exits ({cfg.soft.mode}): {list(plan.layers)}; one exit head = "
        f"{cost.trained_head / cost.layer:.2f} layers of training FLOPs\n",
    ]
    if even is None:
        out.append("even split: infeasible (num_layers not divisible by PP)\n")
    elif even.counts != current.counts:
        out.append(section("even split", even, tokens, reference, tp))
    title = (
        "configured split (= even split)"
        if even and even.counts == current.counts
        else "configured split"
    )
    out.append(section(title, current, tokens, reference, tp))
    if par.virtual_pipeline_model_parallel_size is not None:
        out.append(
            "virtual pipeline is set: megatron-core does not allow uneven first/last stages with it."
        )
        return "\n".join(out)
    if best.counts == current.counts:
        out.append(
            "The configured split is already the best feasible one (megatron-core: only the "
            "first and last stage may differ, the middle stages are equal). Keep:\n"
        )
    else:
        out.append(section("proposal", best, tokens, reference, tp))
        speedup = current.max_cost / best.max_cost - 1
        out.append(
            f"Slowest stage {speedup:.1%} faster than the configured split. Override to paste:\n"
        )
    out.append(best.override())
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        print(report(cfg, resolve_vocab(cfg, args.vocab_size), args.head_recompute))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # python -m soft.parallel.cli_plan
    raise SystemExit(main())
