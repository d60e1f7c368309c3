"""Tiny random HF models (LLaMA-2 and every supported family) and an in-process megatron
reference for the conversion tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from soft.conversion import tiny
from tests.megatron_env import single_rank_world

BUILTIN_TOKENIZER = (
    Path(__file__).resolve().parents[2] / "soft" / "data" / "assets" / "builtin_tokenizer.model"
)


def make_hf_model(
    path: Path,
    *,
    vocab: int = 300,
    hidden: int = 48,
    heads: int = 6,
    kv_heads: int = 2,
    intermediate: int = 100,
    layers: int = 3,
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer: Path | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Save a random LlamaForCausalLM (stored in `dtype`). Every tensor (norms included) gets
    distinct random values of order-one effect, so a swapped or mis-fused tensor changes the
    logits visibly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    tiny.randomise(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(path, **kwargs)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, path / "tokenizer.model")
    return model


def make_family_model(path: Path, name: str, *, tokenizer: Path | None = None, **sizes):
    """soft.conversion.tiny's random model of family `name`, optionally with tokenizer.model."""
    model = tiny.make_family_model(path, name, **sizes)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, path / "tokenizer.model")
    return model


def hf_logits_and_exits(
    model, tokens: torch.Tensor
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """HF logits and every exit's logits: hidden_states[k] through model.norm + lm_head.

    In transformers 5 the last entry of hidden_states is already normed (it equals the final
    norm's output), so exit L is the model's own logits; entries 1..L-1 are raw layer outputs.
    """
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
        num_layers = model.config.num_hidden_layers
        exits = {
            k: model.lm_head(model.model.norm(out.hidden_states[k])) for k in range(1, num_layers)
        }
        exits[num_layers] = out.logits
    return out.logits, exits


def megatron_reference(checkpoint: Path, config_file: Path, overrides: list[str] | None = None):
    """A TP1/PP1 GPTModel with the checkpoint loaded by the project's own load_weights."""
    from soft.checkpointing.checkpoint import load_weights
    from soft.checkpointing.directory import find_checkpoint
    from soft.config.root import load_config
    from soft.data import build_tokenizer
    from soft.models.gpt import build_stage_model, padded_vocab_size
    from soft.training.model import transformer_config

    single_rank_world()
    layout = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"]
    cfg = load_config(config_file, [*layout, *(overrides or [])])
    vocab = cfg.model.vocab_size or build_tokenizer(cfg.data).vocab_size
    padded = padded_vocab_size(vocab, cfg.model, 1)
    gpt = build_stage_model(
        cfg.model, transformer_config(cfg.model, cfg.parallel), padded, True, True
    )
    load_weights(find_checkpoint(checkpoint).path, [gpt])
    return gpt.eval(), vocab


def megatron_logits_and_exits(
    gpt, tokens: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """[b, s, vocab] logits and every exit's logits (layer output -> final norm -> output layer)."""
    from soft.training.step import causal_mask

    captured: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(lambda m, a, out: captured.__setitem__(m.layer_number, out[0]))
        for layer in gpt.decoder.layers
    ]
    b, s = tokens.shape
    head = head_weight(gpt)
    try:
        with torch.no_grad():
            logits = gpt(
                tokens, torch.arange(s).unsqueeze(0).expand(b, s), causal_mask(s, tokens.device)
            )
            exits = {
                k: (gpt.decoder.final_layernorm(h) @ head.t()).transpose(0, 1)[..., :vocab]
                for k, h in captured.items()
            }
    finally:
        for h in handles:
            h.remove()
    return logits[..., :vocab], exits


def head_weight(gpt) -> torch.Tensor:
    """A one-stage GPTModel's LM head matrix: the embedding when tied."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def make_ict_checkpoint(
    hf_dir: Path,
    out_dir: Path,
    exit_layers: list[int],
    *,
    seed: int = 0,
    skip: str | None = None,
    tokenizer: Path = BUILTIN_TOKENIZER,
) -> dict[str, torch.Tensor]:
    """An fp32 `soft.mode=ict` checkpoint like the ICT trainer saves: the HF model converted,
    plus an own head per early exit under `exit_heads.<k>.final_layernorm.weight` [hidden] and
    `exit_heads.<k>.output_layer.weight` [padded_vocab, hidden] (padding rows random, so a
    missing vocabulary cut shows). `skip` leaves one key out. Returns {key: tensor}."""
    from soft.checkpointing.checkpoint import TrainState, save
    from soft.config.root import RootConfig
    from soft.conversion import hf_io, megatron_io
    from soft.conversion.hf_to_megatron import build_sharded_state, shapes_of
    from soft.conversion.vocab import stable_divisor

    config = hf_io.read_hf_config(hf_dir)
    vocab = int(config["vocab_size"])
    divisor, padded = stable_divisor(vocab)
    model = hf_io.model_config_from_hf(config, "fp32", divisor)
    megatron_io.ensure_single_rank_world()
    source = hf_io.HFTensorSource(hf_dir)
    sharded = build_sharded_state(
        source, model, shapes_of(model, vocab, padded), torch.float32, False
    )
    gen = torch.Generator().manual_seed(seed)
    heads: dict[str, torch.Tensor] = {}
    for k in exit_layers[:-1]:
        heads[f"exit_heads.{k}.final_layernorm.weight"] = 1.0 + 0.3 * torch.randn(
            model.hidden_size, generator=gen
        )
        heads[f"exit_heads.{k}.output_layer.weight"] = (
            torch.randn(padded, model.hidden_size, generator=gen) / model.hidden_size**0.5
        )
    for key, tensor in heads.items():
        if key != skip:
            sharded[key] = megatron_io.sharded_tensor(key, tensor, model.num_layers)
    root = RootConfig(model=model)
    root.soft.mode = "ict"
    root.soft.exit_layers = list(exit_layers)
    root.data.tokenizer_path = str(tokenizer)
    root.checkpoint.load_dir, root.checkpoint.finetune = str(hf_dir), True  # ict starts from SFT
    save(out_dir, [megatron_io.ModelOnly(sharded)], TrainState(), root)
    return heads
