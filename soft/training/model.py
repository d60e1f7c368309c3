"""The model as the training step uses it: chunks built by soft.models, parallelised from
outside by soft.parallel, with the exit hooks and their per-step tallies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from soft.config.errors import ConfigError
from soft.models.build import build_chunks
from soft.models.config import ModelConfig, SoftConfig
from soft.models.exit_plan import ExitPlan
from soft.models.exits import ExitHooks, ExitTallies
from soft.models.gpt import model_fields
from soft.models.heads import exit_heads_of
from soft.parallel.config import ParallelConfig
from soft.parallel.head_sync import HeadGroups, build_head_groups
from soft.parallel.wrap import install_schedule_hooks, unwrap, wrap_chunks
from soft.peft.config import PeftConfig
from soft.peft.lora import apply_lora


@dataclass
class SoftModel:
    chunks: list[DistributedDataParallel]  # DDP (around Float16Module), one per virtual stage
    plan: ExitPlan
    config: TransformerConfig
    vocab_size: int  # padded
    head_groups: HeadGroups  # process groups summing the shared head's copies
    hooks: list[ExitHooks]  # aligned with `chunks`
    tallies: ExitTallies = field(default_factory=ExitTallies)
    # Packed batches go in as THD streams with PackedSeqParams (Transformer Engine's attention),
    # not with the block-diagonal mask (the local spec's): see soft.training.step.model_inputs.
    thd: bool = False

    @property
    def unwrapped(self) -> list[MegatronModule]:
        return [unwrap(c) for c in self.chunks]

    def hooks_for(self, chunk: torch.nn.Module) -> ExitHooks:
        return self.hooks[next(i for i, c in enumerate(self.chunks) if c is chunk)]

    def train(self, mode: bool = True) -> None:
        for c in self.chunks:
            c.train(mode)


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, packed: bool = False
) -> TransformerConfig:
    """megatron-core's config of a run: the model's fields and the layout's, composed here
    (neither soft/models nor soft/parallel knows the other's). `packed` (data.packing): the
    fused causal softmax kernel applies its own triangle and ignores the block-diagonal
    mask, so packed batches take the unfused softmax, which applies the mask given."""
    fields = model_fields(model)
    if packed:
        fields["masked_softmax_fusion"] = False
    return TransformerConfig(**fields, **parallel.transformer_fields())


def build_soft_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    soft_cfg: SoftConfig,
    plan: ExitPlan,
    vocab_size: int,
    seed: int,
    init: bool = True,
    packed: bool = False,
    peft: PeftConfig | None = None,
) -> SoftModel:
    """`peft` (peft.method=lora): every weight frozen, adapters attached before DDP wraps the
    chunks (DDP and the optimizer then hold the adapters only)."""
    config = transformer_config(model_cfg, parallel_cfg, packed)
    chunks = build_chunks(model_cfg, config, plan, vocab_size, seed, init)
    if peft is not None and peft.enabled:
        apply_lora(chunks, peft, seed)
    wrapped = wrap_chunks(chunks, config, parallel_cfg)
    head_groups = build_head_groups(chunks)
    install_schedule_hooks(config, wrapped, head_groups, parallel_cfg.overlap_grad_reduce)
    tallies = ExitTallies()
    hooks = [
        ExitHooks(
            c,
            plan,
            exit_heads_of(c, plan),
            tallies,
            soft_cfg.loss_chunk_tokens,
            soft_cfg.exit_loss,
        )
        for c in chunks
    ]
    thd = packed and packed_attention(chunks) == "thd"
    return SoftModel(wrapped, plan, config, vocab_size, head_groups, hooks, tallies, thd)


def packed_attention(chunks: list[Any]) -> str:
    """How the built attention takes packed batches (data.packing): "thd" for Transformer
    Engine's TEDotProductAttention (PackedSeqParams, cu_seqlens), "mask" for megatron-core's
    local DotProductAttention, which asserts deep inside its forward that it gets no
    PackedSeqParams but applies an explicit block-diagonal mask. Decided from the modules
    built, not the config, so the local spec can never be handed THD inputs; any other or
    mixed attention is refused here, at setup."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    te_attention = _te_attention_class()
    kinds = set()
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            attention = layer.self_attention.core_attention
            if te_attention is not None and isinstance(attention, te_attention):
                kinds.add("thd")
            elif isinstance(attention, DotProductAttention):
                kinds.add("mask")
            else:
                kinds.add(type(attention).__name__)
    if len(kinds) != 1 or not kinds <= {"thd", "mask"}:
        raise ConfigError(
            "config key 'data.packing': packed batches need Transformer Engine's "
            "TEDotProductAttention (THD) or megatron-core's local DotProductAttention (mask) in "
            f"every layer; this model has {sorted(kinds)} (model.transformer_impl picks the spec)"
        )
    return kinds.pop()


def _te_attention_class() -> type | None:
    """TEDotProductAttention, or None without Transformer Engine (megatron-core then exports
    a MagicMock under that name, not a class)."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention
    except ImportError:
        return None
    return TEDotProductAttention if HAVE_TE and isinstance(TEDotProductAttention, type) else None
