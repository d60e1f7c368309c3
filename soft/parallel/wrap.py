"""Applying data parallelism and mixed precision to the model chunks from outside (as
torchtitan's `parallelize_*` do), and the hooks megatron-core's schedules call."""

from __future__ import annotations

from typing import cast

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads as megatron_finalize_model_grads
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module, MegatronModule

from soft.compat import wgrad
from soft.models.heads import exit_only_matrices
from soft.parallel import head_sync
from soft.parallel.config import ParallelConfig


def unwrap(module: torch.nn.Module) -> MegatronModule:
    """The model chunk (a GPTModel) inside the DDP and Float16Module wrappers."""
    while isinstance(module, DistributedDataParallel | Float16Module):
        # Float16Module registers its inner module with add_module: no declared attribute.
        module = cast(torch.nn.Module, module.module)
    if not isinstance(module, MegatronModule):
        raise TypeError(f"expected a megatron-core model chunk, got {type(module).__name__}")
    return module


def wrap_chunks(
    chunks: list[torch.nn.Module], config: TransformerConfig, parallel: ParallelConfig
) -> list[DistributedDataParallel]:
    """Float16Module (bf16/fp16) and megatron-core DDP around every chunk; the first chunk
    gets the gradient buckets (virtual-pipeline chunks after it do not, as in Megatron-LM)."""
    if parallel.overlap_grad_reduce:
        head_sync.give_head_copies_own_buckets(chunks)
    # The fused exit loss writes these matrices' whole gradient into main_grad: it reports
    # them to DDP as megatron-core's weight-gradient fusion does (soft.compat.wgrad).
    for param in exit_only_matrices(chunks):
        wgrad.mark_fused_only(param)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
    )
    # bf16/fp16: megatron-core's Float16Module casts every parameter (the local spec's norms
    # are created in fp32) and returns fp32 outputs for the loss, as Megatron-LM does.
    precision = [Float16Module(config, c) if config.bf16 or config.fp16 else c for c in chunks]
    return [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0
        )
        for i, c in enumerate(precision)
    ]


def install_schedule_hooks(
    config: TransformerConfig,
    wrapped: list[DistributedDataParallel],
    head_groups: head_sync.HeadGroups,
    overlap_grad_reduce: bool,
) -> None:
    """What megatron-core's schedule calls: gradient finalisation (with the head-copy sum)
    and no_sync / grad_sync of the DDP chunks."""
    raw_chunks = [unwrap(c) for c in wrapped]
    # With the overlap the DP reduction has run during backward: the head copies are summed
    # after it (each in its own bucket; see head_sync).
    sum_heads_after_dp = overlap_grad_reduce

    def finalize_model_grads(
        chunks: list[torch.nn.Module],
        num_tokens: torch.Tensor | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        force_all_reduce: bool | None = False,
    ) -> None:
        # Sum the head copies over stages before the DP reduction (any bucket layout), or, when
        # that reduction already ran during backward, after it (own buckets; see head_sync).
        if not sum_heads_after_dp:
            head_sync.allreduce_head_grads(raw_chunks, head_groups)
        megatron_finalize_model_grads(
            chunks, num_tokens, pg_collection, force_all_reduce=force_all_reduce
        )
        if sum_heads_after_dp:
            head_sync.allreduce_head_grads(raw_chunks, head_groups)

    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [c.no_sync for c in wrapped]
    # megatron-core declares these as one callable, but its interleaved schedule takes a list
    # (one per virtual chunk), as Megatron-LM's training.py sets them.
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync  # type: ignore[assignment]
    # The schedule's early start of a virtual chunk's reduction only with the overlap, as in
    # Megatron-LM (`overlap_grad_reduce and align_grad_reduce`): without it DDP's
    # finish_grad_sync reduces the buffers itself, and a second all-reduce of gradients that
    # are sums (calculate_per_token_loss: no 1/DP scaling) would multiply them by the DP size.
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vp is not None and overlap_grad_reduce:
        config.grad_sync_func = [c.start_grad_sync for c in wrapped]  # type: ignore[assignment]
