"""Keeping the copies of the shared head identical: their gradients are summed over every copy
before the optimizer step (the model side is soft.models.heads).

Each pipeline column (the stages one sample flows through) holds the real head on its last
stage and a replica on every other stage that owns an early exit. With tied embeddings the
head's matrix is also the first stage's input embedding, so that stage holds a copy too.
Each head tensor (the final norm; the matrix) has its own process group of the ranks of the
column that hold a copy of it; its gradients are summed across the chunks of a rank (virtual
pipeline) and then over that group, so every copy takes the same optimizer step having
received every gradient: the embedding's, every exit's and the last layer's. megatron-core's
own first+last stage sum of a tied embedding is turned off (soft.parallel.setup
`embedding_ranks`), so nothing is counted twice; the gradient norm counts the tensor once
because every copy but the main one is marked `shared` (megatron-core's `param_is_not_shared`).

When the sum happens depends on when the data-parallel reduction runs:
- default (no overlap): before megatron-core's `finalize_model_grads`, on the local
  gradients, so it is correct for any bucket layout and any optimizer sharding;
- `overlap_grad_reduce`: the DP reduction starts during backward, so the sum follows it.
  With a plain DP all-reduce every copy then holds its whole gradient and any layout works.
  With the distributed optimizer the reduction is a reduce-scatter, so each DP rank holds a
  shard, and the copies' shards must line up across stages: every copy is marked
  `shared_embedding`, which megatron-core 0.16 puts in a bucket of its own under the
  distributed optimizer (its precedent for the tied embedding: param_and_grad_buffer.py
  lines 698-709, `_does_param_require_new_bucket`; in 0.19.2 the split moved to
  distrib_optimizer.py lines 530-531). The mark is a megatron-core internal, hence version-gated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from soft.compat.versions import require_megatron
from soft.models.heads import head_copies

# Attributes megatron-core sets or reads on parameters (not declared on torch.nn.Parameter):
# the bucket mark (see the module docstring) and DDP's fp32 gradient buffer.
SHARED_EMBEDDING = "shared_embedding"
MAIN_GRAD = "main_grad"


class HeadGroups(NamedTuple):
    """Per head tensor (the fields of soft.models.heads.HeadCopies), the process group of the
    ranks of this pipeline column holding a copy; None when there is nobody to sum with."""

    norm: dist.ProcessGroup | None
    matrix: dist.ProcessGroup | None


def give_head_copies_own_buckets(chunks: Sequence[torch.nn.Module]) -> None:
    """For overlap_grad_reduce: every head copy in its own DDP bucket under the distributed
    optimizer (see module docstring). Call before the chunks are wrapped in DDP."""
    require_megatron()
    for copies in head_copies(chunks):
        for param in copies:
            setattr(param, SHARED_EMBEDDING, True)


def build_head_groups(chunks: Sequence[torch.nn.Module]) -> HeadGroups:
    """Per head tensor, the process group of the ranks holding a copy of it in this rank's
    pipeline column (None where this rank holds none, or is the only holder).

    Collective: every rank calls it. Each distinct member list gets one group, created on all
    ranks in the same order (torch requires that); the norm and the matrix share one group
    when the same ranks hold them (always, unless tied).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return HeadGroups(None, None)
    holds = tuple(bool(copies) for copies in head_copies(chunks))
    pp_ranks = tuple(
        dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    )
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (dist.get_rank(), pp_ranks, holds))
    created: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
    mine: list[dist.ProcessGroup | None] = [None] * len(holds)
    for column in sorted({ranks for _, ranks, _ in everyone}):
        for kind in range(len(holds)):
            owners = {rank for rank, _, held in everyone if held[kind]}
            members = tuple(r for r in column if r in owners)
            if members not in created:
                created[members] = dist.new_group(list(members)) if len(members) > 1 else None
            if column == pp_ranks and dist.get_rank() in members:
                mine[kind] = created[members]
    return HeadGroups(*mine)


def allreduce_head_grads(chunks: Sequence[torch.nn.Module], groups: HeadGroups) -> None:
    """Sum each head tensor's gradients over every copy (chunks on this rank, then ranks in
    its group)."""
    for copies, group in zip(head_copies(chunks), groups, strict=True):
        _sum_copies([getattr(p, MAIN_GRAD) for p in copies], group)


def _sum_copies(grads: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    if len(grads) == 0 or (len(grads) == 1 and group is None):
        return
    total = grads[0].clone() if len(grads) > 1 else grads[0]
    for g in grads[1:]:
        total.add_(g)
    if group is not None:
        dist.all_reduce(total, group=group)
    for g in grads:
        if g is not total:
            g.copy_(total)


def head_replica_max_diff(chunks: Sequence[torch.nn.Module], groups: HeadGroups) -> float:
    """Largest absolute difference between this rank's head copies and its group's first
    rank's (every head tensor)."""
    worst = 0.0
    for copies, group in zip(head_copies(chunks), groups, strict=True):
        if not copies:
            continue
        ref = copies[0].detach().clone()
        if group is not None:
            dist.broadcast(ref, src=dist.get_process_group_ranks(group)[0], group=group)
        for param in copies:
            worst = max(worst, (param.detach() - ref).abs().max().item())
    return worst
