"""Assemble this rank's SoFT model: stage chunks, head replicas, init, DDP, exit hooks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads as megatron_finalize_model_grads
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from soft.models import shared_head
from soft.models.config import ModelConfig, SoftConfig
from soft.models.exit_plan import ExitPlan
from soft.models.exits import ExitHooks, ExitLossRecord
from soft.models.gpt import build_stage_model, layout_invariant_init, transformer_config
from soft.parallel.config import ParallelConfig


@dataclass
class SoftModel:
    """What the training step needs: DDP-wrapped chunks and the exit bookkeeping."""

    chunks: list[torch.nn.Module]  # DDP-wrapped, one per virtual pipeline stage
    plan: ExitPlan
    config: TransformerConfig
    vocab_size: int  # padded
    head_group: dist.ProcessGroup | None
    record: ExitLossRecord = field(default_factory=ExitLossRecord)
    hooks: dict[int, ExitHooks] = field(default_factory=dict)  # id(wrapped chunk) -> hooks

    @property
    def unwrapped(self) -> list[torch.nn.Module]:
        return [unwrap(c) for c in self.chunks]

    def hooks_for(self, chunk: torch.nn.Module) -> ExitHooks:
        return self.hooks[id(chunk)]

    def train(self, mode: bool = True) -> None:
        for c in self.chunks:
            c.train(mode)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while isinstance(module, DistributedDataParallel | Float16Module):
        module = module.module
    return module


def _stage_flags(vp_stage: int | None) -> tuple[bool, bool]:
    ignore_virtual = vp_stage is None
    return (
        parallel_state.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
        parallel_state.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
    )


def build_chunks(
    model_cfg: ModelConfig, config: TransformerConfig, plan: ExitPlan, vocab_size: int
) -> list[torch.nn.Module]:
    """Unwrapped GPTModel chunks for this rank, each exit-owning chunk with a head replica."""
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if vp is None else list(range(vp))
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in stages:
        pre, post = _stage_flags(vp_stage)
        chunk = build_stage_model(model_cfg, config, vocab_size, pre, post, vp_stage)
        replica_index = (vp_stage or 0) * pp_size + pp_rank
        shared_head.add_head_replica(chunk, plan, vocab_size, replica_index)
        chunks.append(chunk)
    return chunks


def build_soft_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    soft_cfg: SoftConfig,
    plan: ExitPlan,
    vocab_size: int,
    seed: int,
    init: bool = True,
) -> SoftModel:
    config = transformer_config(model_cfg, parallel_cfg)
    chunks = build_chunks(model_cfg, config, plan, vocab_size)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    if device is not None:
        chunks = [c.to(device) for c in chunks]
    if init:
        layout_invariant_init(chunks, seed, model_cfg)
    if plan.separate_heads:  # before DDP, which only buckets parameters that train
        shared_head.freeze_all_but_separate_heads(chunks)
    if parallel_cfg.overlap_grad_reduce:
        shared_head.give_head_copies_own_buckets(chunks)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
        overlap_param_gather=parallel_cfg.overlap_param_gather,
    )
    # bf16/fp16: megatron-core's Float16Module casts every parameter (the local spec's norms
    # are created in fp32) and returns fp32 outputs for the loss, as Megatron-LM does.
    precision = [Float16Module(config, c) if config.bf16 or config.fp16 else c for c in chunks]
    wrapped = [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0
        )
        for i, c in enumerate(precision)
    ]
    head_group = shared_head.build_head_group(chunks)
    model = SoftModel(wrapped, plan, config, vocab_size, head_group)
    for w, c in zip(wrapped, chunks, strict=True):
        model.hooks[id(w)] = ExitHooks(
            c, plan, shared_head.exit_heads_of(c, plan), model.record, soft_cfg.loss_chunk_tokens
        )
    _wire_schedule_hooks(model, sum_heads_after_dp=parallel_cfg.overlap_grad_reduce)
    return model


def _wire_schedule_hooks(model: SoftModel, sum_heads_after_dp: bool) -> None:
    """megatron-core's schedule calls these: grad finalisation (+ head sync) and no_sync."""
    config = model.config
    raw_chunks = model.unwrapped

    def finalize_model_grads(chunks, num_tokens=None, pg_collection=None, force_all_reduce=False):
        # Sum the head copies over stages before the DP reduction (any bucket layout), or, when
        # that reduction already ran during backward, after it (own buckets; see shared_head).
        if not sum_heads_after_dp:
            shared_head.allreduce_head_grads(raw_chunks, model.head_group)
        megatron_finalize_model_grads(
            chunks, num_tokens, pg_collection, force_all_reduce=force_all_reduce
        )
        if sum_heads_after_dp:
            shared_head.allreduce_head_grads(raw_chunks, model.head_group)

    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [c.no_sync for c in model.chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if parallel_state.get_virtual_pipeline_model_parallel_world_size() is None:
        return
    config.grad_sync_func = [c.start_grad_sync for c in model.chunks]
