"""The shared head (final RMSNorm + vocab-parallel output layer) across pipeline stages.

Every model chunk that owns an early exit but not the model's real head gets a replica
(`exit_head`). Replicas:
- are stored in checkpoints under the real head's keys, never as the main replica, so a
  checkpoint holds one copy and loads into any layout;
- start identical (layout-invariant init or checkpoint load both read the real head's key);
- have their gradients summed with the real head's over the exit-owning ranks of their
  pipeline column after megatron-core's `finalize_model_grads`, so all copies take the same
  optimizer step;
- are marked `shared` so gradient-norm clipping and logged norms count the head once (as
  megatron-core does for the tied embedding copy).

When the copies' gradients are summed depends on when the data-parallel reduction runs:
- default (no overlap): before megatron-core's `finalize_model_grads`, on the local
  gradients, so it is correct for any bucket layout and any optimizer sharding;
- `overlap_grad_reduce`: the DP reduce-scatter starts during backward, so the sum follows
  it; every copy is then marked `shared_embedding`, which gives it its own bucket so its DP
  shards line up across stages (megatron-core's precedent for the tied embedding,
  `param_and_grad_buffer.py` `_does_param_require_new_bucket`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import sharded_state_dict_default

from soft.models.exit_plan import ExitPlan

REPLICA_NAME = "exit_head"
SEPARATE_HEADS_NAME = "exit_heads"


class ExitHead(MegatronModule):
    """A final RMSNorm + vocab-parallel output layer, shaped like the model's own head."""

    def __init__(self, config, norm_spec, vocab_size: int) -> None:
        super().__init__(config=config)
        self.final_layernorm = build_module(
            norm_spec, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size,
            vocab_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=False,
        )

    def head_sharded_state_dict(
        self, prefix: str, norm_key: str, output_key: str, sharded_offsets, metadata, replica=None
    ) -> dict:
        """Entries `prefix + final_layernorm.* / output_layer.*` stored under the checkpoint keys
        `norm_key.* / output_key.*`; `replica` (when given) replaces the first replica-id axis."""
        out = {}
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for name, module, key_prefix in (
            ("final_layernorm", self.final_layernorm, norm_key),
            ("output_layer", self.output_layer, output_key),
        ):
            # The TP group must be explicit: without it the norm's replica id omits the TP rank
            # (get_pg_rank(None) = 0), so every TP rank would claim the main replica.
            sub = sharded_state_dict_default(
                module, key_prefix, sharded_offsets, metadata, tp_group=tp_group
            )
            for local_key, sh in sub.items():
                if name == "output_layer" and local_key.endswith("_extra_state"):
                    continue  # GPTModel drops the real head's (empty) entry too: gpt_model.py:820
                if replica is not None and isinstance(sh, ShardedTensor | ShardedObject):
                    rid = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
                    sh.replica_id = (replica, *rid[1:])
                out[f"{prefix}{name}.{local_key[len(key_prefix) :]}"] = sh
        return out


class SharedHeadReplica(ExitHead):
    def __init__(self, config, norm_spec, vocab_size: int, replica_index: int) -> None:
        super().__init__(config, norm_spec, vocab_size)
        self.replica_index = replica_index
        for param in self.parameters():
            param.shared = True

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The real head's keys, with a replica id that is never the main replica."""
        root = prefix[: -len(f"{REPLICA_NAME}.")] if prefix.endswith(f"{REPLICA_NAME}.") else prefix
        return self.head_sharded_state_dict(
            prefix,
            f"{root}decoder.final_layernorm.",
            f"{root}output_layer.",
            sharded_offsets,
            metadata,
            replica=self.replica_index + 1,
        )


class SeparateExitHeads(MegatronModule):
    """ict mode: one trainable head per early exit of a chunk, children named by exit depth.

    Stored under `exit_heads.<k>.final_layernorm.weight` / `exit_heads.<k>.output_layer.weight`.
    A checkpoint without those keys (the SFT run ict starts from) initialises every head from
    the shared head: with `read_shared_head` set, the heads request the real head's keys as
    non-main replicas, exactly like SharedHeadReplica (so any TP/PP layout works).
    """

    def __init__(self, config, norm_spec, vocab_size: int, layers: list[int]) -> None:
        super().__init__(config=config)
        self.read_shared_head = False
        for k in layers:
            self.add_module(str(k), ExitHead(config, norm_spec, vocab_size))

    def heads(self) -> dict[int, ExitHead]:
        return {int(name): head for name, head in self.named_children()}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        root = prefix[: -len(f"{SEPARATE_HEADS_NAME}.")]
        out = {}
        for k, head in self.heads().items():
            own = f"{prefix}{k}."
            if self.read_shared_head:
                norm_key, output_key = f"{root}decoder.final_layernorm.", f"{root}output_layer."
                replica = 1  # load-only view: never the main replica
            else:
                norm_key, output_key = f"{own}final_layernorm.", f"{own}output_layer."
                replica = None
            out.update(
                head.head_sharded_state_dict(
                    own, norm_key, output_key, sharded_offsets, metadata, replica
                )
            )
        return out


def chunk_exit_layers(chunk: torch.nn.Module, plan: ExitPlan) -> list[int]:
    return [
        layer.layer_number for layer in chunk.decoder.layers if layer.layer_number in plan.early
    ]


def add_head_replica(chunk, plan: ExitPlan, vocab_size: int, replica_index: int) -> None:
    """Give a chunk that owns early exits but not the real head its replica of the head
    (ict mode: its separate heads instead)."""
    layers = chunk_exit_layers(chunk, plan)
    if not layers:
        return
    norm_spec = chunk.decoder.submodules.layer_norm
    if plan.separate_heads:
        chunk.add_module(
            SEPARATE_HEADS_NAME, SeparateExitHeads(chunk.config, norm_spec, vocab_size, layers)
        )
        return
    if chunk.post_process:
        return
    chunk.add_module(
        REPLICA_NAME, SharedHeadReplica(chunk.config, norm_spec, vocab_size, replica_index)
    )


def exit_heads_of(chunk, plan: ExitPlan) -> dict[int, tuple[torch.nn.Module, torch.nn.Module]]:
    """(norm, output layer) for each early exit of the chunk: its own head in ict mode, else
    the shared head (the real one or the chunk's replica)."""
    separate = getattr(chunk, SEPARATE_HEADS_NAME, None)
    if separate is not None:
        return {k: (h.final_layernorm, h.output_layer) for k, h in separate.heads().items()}
    head = head_of(chunk)
    layers = chunk_exit_layers(chunk, plan)
    if layers and head is None:
        raise RuntimeError("a chunk with early exits needs the shared head (or a replica)")
    return {k: head for k in layers}


def freeze_all_but_separate_heads(chunks) -> None:
    """ict: only the separate exit heads train; the loaded model stays bit-identical."""
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            param.requires_grad = name.startswith(f"{SEPARATE_HEADS_NAME}.")


def has_separate_heads(chunks) -> bool:
    return any(getattr(c, SEPARATE_HEADS_NAME, None) is not None for c in chunks)


@contextlib.contextmanager
def separate_heads_read_shared_head(chunks):
    """Within the block, separate heads request the shared head's checkpoint keys (their
    initialisation from a checkpoint that has no separate heads)."""
    modules = [m for c in chunks if (m := getattr(c, SEPARATE_HEADS_NAME, None)) is not None]
    for m in modules:
        m.read_shared_head = True
    try:
        yield
    finally:
        for m in modules:
            m.read_shared_head = False


def head_of(chunk) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(final norm, output layer) shared by this chunk's exits: the real head or the replica."""
    if chunk.post_process:
        return chunk.decoder.final_layernorm, chunk.output_layer
    replica = getattr(chunk, REPLICA_NAME, None)
    return (replica.final_layernorm, replica.output_layer) if replica is not None else None


def give_head_copies_own_buckets(chunks) -> None:
    """For overlap_grad_reduce: every head copy in its own DDP bucket (see module docstring)."""
    for norm_weight, output_weight in head_params(chunks):
        norm_weight.shared_embedding = True
        output_weight.shared_embedding = True


def head_params(chunks) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    out = []
    for chunk in chunks:
        head = head_of(chunk)
        if head is not None and head[1].weight.requires_grad:  # ict freezes the real head
            out.append((head[0].weight, head[1].weight))
    return out


def build_head_group(chunks) -> dist.ProcessGroup | None:
    """Process group of the ranks holding a head copy in this rank's pipeline column.

    Collective: every rank calls it. Each distinct pipeline group gets one group of its
    head-owning ranks, created on all ranks in the same order (torch requires that).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    owns = bool(head_params(chunks))
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
    copies = head_params(chunks)
    if len(copies) == 0 or (len(copies) == 1 and group is None):
        return
    for i in range(2):  # norm weight, output weight
        grads = [pair[i].main_grad for pair in copies]
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
    copies = head_params(chunks)
    if not copies:
        return 0.0
    worst = 0.0
    for i in range(2):
        ref = copies[0][i].detach().clone()
        if group is not None:
            dist.broadcast(ref, src=dist.get_process_group_ranks(group)[0], group=group)
        for pair in copies:
            worst = max(worst, (pair[i].detach() - ref).abs().max().item())
    return worst
