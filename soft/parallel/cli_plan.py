"""Propose an uneven pipeline split that balances SoFT's exit heads over the stages.

`soft-plan --config configs/llama2_13b.yaml parallel.pipeline_model_parallel_size=4`
(or `python tools/plan_pipeline.py ...`)

Prints the per-stage cost table of the configured split, of the even split and of the
proposal (the feasible first/last pair with the smallest slowest stage), then the override to
paste; then the memory per rank of the configured split (soft.parallel.memory): full SoFT, or
LoRA SoFT with peft.method=lora, both with --compare-lora. Pure arithmetic: builds no model,
needs no GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from soft.config.errors import ConfigError, InputError
from soft.config.root import RootConfig, load_config
from soft.parallel import balance, memory
from soft.peft.config import PeftConfig


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
    p.add_argument(
        "--gpus",
        type=int,
        help="GPUs of the job: data-parallel size = gpus / (TP x PP) (default TP x PP, DP 1)",
    )
    p.add_argument(
        "--gpu-gib",
        type=float,
        default=80.0,
        help="memory of one GPU in GiB; a stage fits when its estimate is at most 90%% of it "
        "(the rest: CUDA context, communication buffers, fragmentation) (default 80)",
    )
    p.add_argument(
        "--compare-lora",
        action="store_true",
        help="also plan LoRA SoFT (the config's peft section, or PEFT's defaults: r 16, "
        "every linear layer)",
    )
    p.add_argument(
        "--kernels",
        choices=["te", "local"],
        help="what attention/norm kernels keep: te = Transformer Engine with flash attention "
        "(GPUs), local = megatron's local spec (the CPU path) (default: local when "
        "model.transformer_impl=local, else te)",
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


def section(title: str, lay: balance.Layout, tokens: int, reference: float) -> str:
    return (
        f"### {title}: layers per stage {lay.counts}, slowest stage {lay.max_cost / reference:.1%} "
        f"of the even split's, pipeline efficiency {lay.efficiency:.1%}\n\n"
        f"{balance.format_table(lay, tokens, reference)}\n"
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
        out.append(section("even split", even, tokens, reference))
    title = (
        "configured split (= even split)"
        if even and even.counts == current.counts
        else "configured split"
    )
    out.append(section(title, current, tokens, reference))
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
        out.append(section("proposal", best, tokens, reference))
        speedup = current.max_cost / best.max_cost - 1
        out.append(
            f"Slowest stage {speedup:.1%} faster than the configured split. Override to paste:\n"
        )
    out.append(best.override())
    return "\n".join(out)


# Share of a GPU's memory the estimate may fill: the rest is what it leaves out.
USABLE_FRACTION = 0.9


def memory_setup(
    cfg: RootConfig, vocab: int, gpus: int | None, peft: PeftConfig, kernels: memory.Kernels
) -> memory.MemorySetup:
    """The memory model's inputs from the config; `gpus` sets the data-parallel size."""
    par, train = cfg.parallel, cfg.train
    model_parallel = par.model_parallel_size
    gpus = model_parallel if gpus is None else gpus
    if gpus < 1 or gpus % model_parallel:
        raise ConfigError(
            f"--gpus {gpus} is not a multiple of TP x PP = {model_parallel} "
            "(parallel.tensor_model_parallel_size x parallel.pipeline_model_parallel_size)"
        )
    dp = gpus // model_parallel
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"config key 'train.global_batch_size' ({train.global_batch_size}) is not a "
            f"multiple of train.micro_batch_size x data-parallel size ({per_step})"
        )
    return memory.MemorySetup(
        model=cfg.model,
        parallel=par,
        plan=cfg.exit_plan(),
        peft=peft,
        vocab_size=vocab,
        seq_length=cfg.data.seq_length,
        micro_batch_size=train.micro_batch_size,
        num_microbatches=train.global_batch_size // per_step,
        data_parallel=dp,
        exit_loss=cfg.soft.exit_loss,
        loss_chunk_tokens=cfg.soft.loss_chunk_tokens,
        kernels=kernels,
    )


def memory_report(
    cfg: RootConfig,
    vocab: int,
    gpus: int | None,
    compare_lora: bool,
    gpu_gib: float,
    kernels: memory.Kernels,
) -> str:
    """The memory tables of the configured split: full and/or LoRA."""
    if cfg.exit_plan().separate_heads:
        return "memory: not planned for soft.mode=ict (separate heads over a frozen backbone)"
    variants: list[tuple[str, PeftConfig]] = []
    if not cfg.peft.enabled or compare_lora:
        variants.append(("full SoFT", PeftConfig()))
    if cfg.peft.enabled or compare_lora:
        lora = cfg.peft if cfg.peft.enabled else dataclasses.replace(PeftConfig(), method="lora")
        variants.append((f"LoRA SoFT (r {lora.rank}, {', '.join(lora.target_modules)})", lora))
    budget = gpu_gib * USABLE_FRACTION
    out = []
    for title, peft in variants:
        setup = memory_setup(cfg, vocab, gpus, peft, kernels)
        stages = memory.stage_memory(setup)
        worst = max(s.total for s in stages) / memory.GIB
        out.append(
            f"### memory per rank, {title}: DP {setup.data_parallel}, "
            f"{setup.num_microbatches} micro batches/step, kernels {kernels}; "
            f"largest stage {worst:.1f} GiB, "
            f"{'fits' if worst <= budget else 'does not fit'} {gpu_gib:g} GiB "
            f"(budget {budget:.0f} GiB)\n\n{memory.format_memory_table(stages, budget)}\n"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        vocab = resolve_vocab(cfg, args.vocab_size)
        print(report(cfg, vocab, args.head_recompute))
        print()
        kernels: memory.Kernels = args.kernels or (
            "local" if cfg.model.transformer_impl == "local" else "te"
        )
        print(memory_report(cfg, vocab, args.gpus, args.compare_lora, args.gpu_gib, kernels))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # python -m soft.parallel.cli_plan
    raise SystemExit(main())
