"""What converting fp16 weights to bf16 costs: per-weight rounding error and the change in logits.

LLaMA-2's released weights are fp16 (10 mantissa bits); bf16 keeps 7. This script rounds
fp16 weights of LLaMA-2's scale to bf16 and reports (1) the relative rounding error per weight
and (2) how far a model's logits and greedy choices move when all its matrices are rounded,
with every forward in fp32 so that only the weights differ.

    python benchmarks/bench_dtype_rounding.py [--layers 8 --hidden 512 --vocab 4096]

The model is a random LLaMA-shaped one (no pretrained weights are reachable here), its weights
drawn like an initialised LLaMA (normal, std 0.02; norms 1): enough to show the size of the
effect, not a trained model's exact numbers.
"""

from __future__ import annotations

import argparse

import torch


def weight_error(n: int = 4_000_000, std: float = 0.02, seed: int = 0) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    w16 = (torch.randn(n, generator=gen) * std).half()
    w16 = w16[w16 != 0].float()
    rel = ((w16.bfloat16().float() - w16) / w16).abs()
    return {"max_rel": rel.max().item(), "mean_rel": rel.mean().item()}


def logits_change(layers: int, hidden: int, vocab: int, seed: int = 0) -> dict[str, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=256, initializer_range=0.02, tie_word_embeddings=False,
    )  # fmt: skip
    fp16 = LlamaForCausalLM(config).half().float().eval()  # weights representable in fp16
    bf16 = LlamaForCausalLM(config).eval()
    bf16.load_state_dict({k: v.bfloat16().float() for k, v in fp16.state_dict().items()})
    tokens = torch.randint(0, vocab, (8, 128), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        a, b = fp16(tokens).logits, bf16(tokens).logits
    return {
        "max_abs_logit_diff": (a - b).abs().max().item(),
        "logit_std": a.std().item(),
        "rel_logit_diff": ((a - b).norm() / a.norm()).item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args(argv)
    w = weight_error()
    print(f"weights N(0, 0.02) in fp16 -> bf16: relative rounding error max {w['max_rel']:.3%}, "
          f"mean {w['mean_rel']:.3%}")  # fmt: skip
    m = logits_change(args.layers, args.hidden, args.vocab)
    print(
        f"{args.layers}-layer, hidden {args.hidden}, vocab {args.vocab} LLaMA, fp32 compute: "
        f"logits moved by max {m['max_abs_logit_diff']:.4f} (logit std {m['logit_std']:.3f}), "
        f"relative L2 {m['rel_logit_diff']:.3%}; greedy top-1 agreement "
        f"{m['top1_agreement']:.2%} over 1024 positions"
    )


if __name__ == "__main__":
    main()
