"""Tiny random LLaMA models for the evaluation tests (no downloads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(
    seed: int = 0,
    layers: int = 6,
    vocab: int = 32000,
    kv_heads: int = 2,
    init: float = 0.5,
    deep_scale: float | None = None,
) -> LlamaForCausalLM:
    """A random 6-layer GQA LLaMA. `init` 0.5 makes logits peaked (greedy ties impossible in
    practice); `deep_scale` shrinks layers >= 2's residual writes, so shallow exits agree with
    the full model often but not always (exercises multi-token speculative acceptance)."""
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=128,
        vocab_size=vocab,
        max_position_embeddings=512,
        initializer_range=init,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if deep_scale is not None:
        with torch.no_grad():
            for layer in model.model.layers[2:]:
                layer.self_attn.o_proj.weight.mul_(deep_scale)
                layer.mlp.down_proj.weight.mul_(deep_scale)
    # Comparisons against `generate` must not stop early on a random EOS.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def save_export(
    model: LlamaForCausalLM, path: Path, tokenizer: Path | None, exits: list[int] | None
) -> Path:
    """An exported SoFT folder: HF files + tokenizer.model + optional soft_exit_layers."""
    model.save_pretrained(path)
    if tokenizer is not None:
        shutil.copy(tokenizer, path / "tokenizer.model")
    if exits is not None:
        config_path = path / "config.json"
        config = json.loads(config_path.read_text())
        config["soft_exit_layers"] = exits
        config_path.write_text(json.dumps(config, indent=2))
    return path


def truncated_copy(model: LlamaForCausalLM, k: int) -> LlamaForCausalLM:
    """An independent k-layer model: config truncated, full state dict minus deeper layers."""
    config = LlamaConfig.from_dict(model.config.to_dict())
    config.num_hidden_layers = k
    copy = LlamaForCausalLM(config).to(model.dtype).eval()
    state = {
        name: tensor
        for name, tensor in model.state_dict().items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < k
    }
    missing, unexpected = copy.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    copy.generation_config.eos_token_id = None
    copy.generation_config.pad_token_id = 0
    return copy


def hf_greedy(model: LlamaForCausalLM, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n
        )
    return out[0, len(prompt) :].tolist()
