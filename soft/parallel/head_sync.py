"""Keeping the copies of the shared head identical: their gradients are summed over every copy
before the optimizer step (the model side is soft.models.heads).

Each pipeline column (the stages one sample flows through) holds the real head on its last
stage and a replica on every other stage that owns an early exit. Their gradients are summed
over a dedicated process group of those ranks, and across chunks of one rank (virtual
pipeline), so every copy takes the same optimizer step.

When the sum happens depends on when the data-parallel reduction runs:
- default (no overlap): before megatron-core's `finalize_model_grads`, on the local
  gradients, so it is correct for any bucket layout and any optimizer sharding;
- `overlap_grad_reduce`: the DP reduce-scatter starts during backward, so the sum follows
  it; every copy is then marked `shared_embedding`, which gives it its own bucket so its DP
  shards line up across stages (megatron-core's precedent for the tied embedding,
  `param_and_grad_buffer.py` `_does_param_require_new_bucket`).
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

from soft.models.heads import trainable_head_copies


def give_head_copies_own_buckets(chunks) -> None:
    """For overlap_grad_reduce: every head copy in its own DDP bucket (see module docstring).
    Call before the chunks are wrapped in DDP."""
    for head in trainable_head_copies(chunks):
        head.norm.weight.shared_embedding = True
        head.output.weight.shared_embedding = True


def build_head_group(chunks) -> dist.ProcessGroup | None:
    """Process group of the ranks holding a head copy in this rank's pipeline column.

    Collective: every rank calls it. Each distinct pipeline group gets one group of its
    head-owning ranks, created on all ranks in the same order (torch requires that).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    owns = bool(trainable_head_copies(chunks))
    pp_ranks = tuple(
        dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    )
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (dist.get_rank(), pp_ranks, owns))
    owners = {rank for rank, _, own in everyone if own}
    mine = None
    for column in sorted({ranks for _, ranks, _ in everyone}):
        members = [r for r in column if r in owners]
        group = dist.new_group(members) if len(members) > 1 else None
        if column == pp_ranks and dist.get_rank() in members:
            mine = group
    return mine


def allreduce_head_grads(chunks, group: dist.ProcessGroup | None) -> None:
    """Sum the head gradients over every copy (chunks on this rank, then ranks in the group)."""
    copies = trainable_head_copies(chunks)
    if len(copies) == 0 or (len(copies) == 1 and group is None):
        return
    for i in range(2):  # norm weight, output weight
        grads = [head[i].weight.main_grad for head in copies]
        total = grads[0].clone() if len(grads) > 1 else grads[0]
        for g in grads[1:]:
            total.add_(g)
        if group is not None:
            dist.all_reduce(total, group=group)
        for g in grads:
            if g is not total:
                g.copy_(total)


def head_replica_max_diff(chunks, group: dist.ProcessGroup | None) -> float:
    """Largest absolute difference between this rank's head copies and the group's first."""
    copies = trainable_head_copies(chunks)
    if not copies:
        return 0.0
    worst = 0.0
    for i in range(2):
        ref = copies[0][i].weight.detach().clone()
        if group is not None:
            dist.broadcast(ref, src=dist.get_process_group_ranks(group)[0], group=group)
        for head in copies:
            worst = max(worst, (head[i].weight.detach() - ref).abs().max().item())
    return worst
