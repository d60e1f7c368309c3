"""Tiny random Hugging Face models of every supported family, made on the spot: a model folder
(config.json + safetensors) with the family's features switched on, at odd sizes with
grouped-query attention, and optionally a byte-level BPE tokenizer with a chat template trained
on the built-in tasks. What the tests convert, train and evaluate, and the README's worked
example for a family without downloading one.

    python tools/make_tiny_model.py --family qwen2_tied --out-dir tiny/qwen2 [--chat-style chatml]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from soft.config.errors import ConfigError, InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Llama-3.1-style RoPE scaling with megatron-core's fixed low/high frequency factors and
# original context, and an odd factor; Llama-3.2-style tied embeddings; Mistral v0.3 (no
# sliding window); Qwen2 q/k/v biases, tied; Qwen3 q/k norms with a head_dim that is not
# hidden/heads (as in Qwen3 0.6B-4B): (model_type, config fields).
_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
FAMILY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3": ("llama", dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, **_LLAMA3_ROPE},
    )),
    "llama3.2_tied": ("llama", dict(
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 3.5, **_LLAMA3_ROPE},
    )),
    "mistral": ("mistral", dict(sliding_window=None, rope_theta=1000000.0, head_dim=10)),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": ("qwen3", dict(head_dim=14, rope_theta=1000000.0)),
}  # fmt: skip


def make_family_model(
    path: Path,
    name: str,
    *,
    vocab: int = 301,
    hidden: int = 40,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 84,
    layers: int = 3,
    seed: int = 0,
) -> PreTrainedModel:
    """Save a random model of family `name` (FAMILY_MODELS) to `path` and return it: every
    tensor (biases, q/k norms included) random, so a swapped or mis-fused one shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in FAMILY_MODELS:
        raise ConfigError(f"--family '{name}': expected one of {', '.join(FAMILY_MODELS)}")
    model_type, fields = FAMILY_MODELS[name]
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        rms_norm_eps=1e-6, max_position_embeddings=16384, bos_token_id=1, eos_token_id=2,
        **{"tie_word_embeddings": False, **fields},
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    randomise(model, seed)
    model.save_pretrained(path)
    return model


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.09): logits of order 1 at every layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def main(argv: list[str] | None = None) -> int:
    from soft.data.builtin import CHAT_STYLES, train_hf_tokenizer
    from soft.data.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=list(FAMILY_MODELS))
    parser.add_argument("--out-dir", type=Path, required=True, help="the new model folder")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument(
        "--chat-style",
        choices=CHAT_STYLES,
        default="chatml",
        help="the tokenizer trained into the folder (ChatML: no BOS, as Qwen; llama3: BOS)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.out_dir.exists():
            raise InputError(f"--out-dir '{args.out_dir}' already exists")
        train_hf_tokenizer(args.out_dir, args.chat_style)
        tokens = load_tokenizer(args.out_dir).vocab_size
        vocab = (tokens // 64 + 1) * 64  # more rows than tokens, a multiple of 8, as Qwen pads
        make_family_model(
            args.out_dir, args.family, vocab=vocab, layers=args.layers, seed=args.seed
        )
    except InputError as exc:
        print(f"error: {exc}")
        return 2
    print(
        f"wrote {args.out_dir}: a random {args.family} model ({args.layers} layers, "
        f"{vocab} vocabulary rows) with a {args.chat_style} tokenizer of {tokens} tokens"
    )
    return 0
