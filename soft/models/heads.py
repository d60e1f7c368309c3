"""Exit heads: the shared head's replicas on pipeline stages, and ict's separate heads.

The shared head is the model's final RMSNorm + vocab-parallel output layer. Every model chunk
that owns an early exit but not the real head gets a replica (`exit_head`). Replicas:
- are stored in checkpoints under the real head's keys, never as the main replica, so a
  checkpoint holds one copy and loads into any layout;
- start identical (layout-invariant init or checkpoint load both read the real head's key);
- are marked `shared` so gradient-norm clipping and logged norms count the head once (as
  megatron-core does for the tied embedding copy).
Keeping the copies identical during training (their gradients summed over stages) is a
parallelism concern: soft.parallel.head_sync.

Tied embeddings (`model.tie_word_embeddings`): the head's matrix IS the input embedding. Its
copies are the first stage's embedding (the main one), megatron-core's own copy on the last
stage (`output_layer.weight`, stored as a replica of the embedding) and the matrix of every
replica; a replica on a chunk that holds the embedding reads the embedding itself and holds
only a norm. Replica matrices are stored under the embedding's key. `head_copies` lists every
copy of each head tensor on a rank, which is what head_sync sums.

In ict mode each early exit has its own head instead (`exit_heads.<k>`), see SeparateExitHeads.
Model code only: nothing here talks to other ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import sharded_state_dict_default

from soft.models.exit_plan import ExitPlan

REPLICA_NAME = "exit_head"
SEPARATE_HEADS_NAME = "exit_heads"
# Key in the `metadata` of sharded_state_dict(): separate heads request the shared head's
# checkpoint keys (their initialisation from an SFT checkpoint, which has no separate heads).
READ_SHARED_HEAD = "soft_exit_heads_read_shared_head"
# Where GPTModel stores the real head (chunks' sharded state dicts use global keys).
NORM_KEY = "decoder.final_layernorm."
OUTPUT_KEY = "output_layer."
EMBEDDING_KEY = "embedding.word_embeddings."  # the head's matrix when tied


class HeadRef(NamedTuple):
    """What an exit reads its logits through: a norm, then the vocab-parallel matrix [V/tp, h]
    (the output layer's weight, or the embedding's when tied)."""

    norm: torch.nn.Module
    weight: torch.nn.Parameter


def shared_output_key(tied: bool) -> str:
    """Checkpoint key prefix of the shared head's matrix: the embedding's when tied."""
    return EMBEDDING_KEY if tied else OUTPUT_KEY


def is_tied(chunk) -> bool:
    return bool(chunk.share_embeddings_and_output_weights)


class ExitHead(MegatronModule):
    """A final RMSNorm + vocab-parallel output layer, shaped like the model's own head;
    `with_output=False`: the norm only (a tied replica beside the embedding it reads)."""

    def __init__(self, config, norm_spec, vocab_size: int, with_output: bool = True) -> None:
        super().__init__(config=config)
        self.final_layernorm = build_module(
            norm_spec, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        self.output_layer = None
        if with_output:
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
            if module is None:
                continue
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
    """A copy of the real head on a chunk that owns early exits but not the head. Its
    checkpoint entries are the real head's keys (given when it is built: the embedding's for
    a tied matrix), with a replica id that is never the main replica."""

    def __init__(
        self,
        config,
        norm_spec,
        vocab_size: int,
        replica_index: int,
        norm_key: str,
        output_key: str,
        with_output: bool = True,
    ) -> None:
        super().__init__(config, norm_spec, vocab_size, with_output)
        self.replica_index = replica_index
        self.norm_key, self.output_key = norm_key, output_key
        for param in self.parameters():
            param.shared = True

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return self.head_sharded_state_dict(
            prefix,
            self.norm_key,
            self.output_key,
            sharded_offsets,
            metadata,
            replica=self.replica_index + 1,
        )


class SeparateExitHeads(MegatronModule):
    """ict mode: one trainable head per early exit of a chunk, children named by exit depth.

    Stored under `exit_heads.<k>.final_layernorm.weight` / `exit_heads.<k>.output_layer.weight`.
    A checkpoint without those keys (the SFT run ict starts from) initialises every head from
    the shared head: a request built with `metadata={READ_SHARED_HEAD: True}` asks for the real
    head's keys as non-main replicas, exactly like SharedHeadReplica (so any TP/PP layout works).
    """

    def __init__(
        self, config, norm_spec, vocab_size: int, layers: list[int], shared_output_key: str
    ) -> None:
        super().__init__(config=config)
        self.shared_output_key = shared_output_key  # the matrix they start from
        for k in layers:
            self.add_module(str(k), ExitHead(config, norm_spec, vocab_size))

    def heads(self) -> dict[int, ExitHead]:
        return {int(name): head for name, head in self.named_children()}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        read_shared = bool((metadata or {}).get(READ_SHARED_HEAD))
        out = {}
        for k, head in self.heads().items():
            own = f"{prefix}{k}."
            if read_shared:
                norm_key, output_key = NORM_KEY, self.shared_output_key
                replica = 1  # load-only: not main
            else:
                norm_key, output_key = f"{own}final_layernorm.", f"{own}output_layer."
                replica = None
            out.update(
                head.head_sharded_state_dict(
                    own, norm_key, output_key, sharded_offsets, metadata, replica
                )
            )
        return out


def owned_exits(chunk: torch.nn.Module, plan: ExitPlan) -> list[int]:
    """The early exits whose layer this chunk holds (the one answer to that question)."""
    return [
        layer.layer_number for layer in chunk.decoder.layers if layer.layer_number in plan.early
    ]


def add_exit_heads(chunk, plan: ExitPlan, vocab_size: int, replica_index: int) -> None:
    """Give a chunk that owns early exits what they read through: in ict mode a separate head
    per exit; otherwise, when the chunk lacks the real head, a replica of it."""
    layers = owned_exits(chunk, plan)
    if not layers:
        return
    norm_spec = chunk.decoder.submodules.layer_norm
    output_key = shared_output_key(is_tied(chunk))
    if plan.separate_heads:
        heads = SeparateExitHeads(chunk.config, norm_spec, vocab_size, layers, output_key)
        chunk.add_module(SEPARATE_HEADS_NAME, heads)
    elif not chunk.post_process:
        # Tied, beside the embedding: the embedding is the matrix, the replica is a norm.
        own_matrix = not (is_tied(chunk) and chunk.pre_process)
        replica = SharedHeadReplica(
            chunk.config, norm_spec, vocab_size, replica_index, NORM_KEY, output_key, own_matrix
        )
        chunk.add_module(REPLICA_NAME, replica)


def exit_heads_of(chunk, plan: ExitPlan) -> dict[int, HeadRef]:
    """The head each early exit of the chunk reads through: its own in ict mode, else the
    shared head (the real one or the chunk's replica)."""
    separate = getattr(chunk, SEPARATE_HEADS_NAME, None)
    if separate is not None:
        return {
            k: HeadRef(h.final_layernorm, h.output_layer.weight)
            for k, h in separate.heads().items()
        }
    head = head_of(chunk)
    layers = owned_exits(chunk, plan)
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


def head_of(chunk) -> HeadRef | None:
    """The shared head of this chunk's exits: the real head or the replica (whose matrix is
    the embedding when tied and the chunk holds it)."""
    if chunk.post_process:
        return HeadRef(chunk.decoder.final_layernorm, _real_output_weight(chunk))
    replica = getattr(chunk, REPLICA_NAME, None)
    if replica is None:
        return None
    if replica.output_layer is None:
        return HeadRef(replica.final_layernorm, chunk.embedding.word_embeddings.weight)
    return HeadRef(replica.final_layernorm, replica.output_layer.weight)


def _real_output_weight(chunk) -> torch.nn.Parameter:
    """GPTModel's head matrix: its output layer's, or when tied the shared one (the embedding
    on the first stage, megatron-core's copy of it on the last)."""
    return (
        chunk.shared_embedding_or_output_weight() if is_tied(chunk) else chunk.output_layer.weight
    )


class HeadCopies(NamedTuple):
    """This rank's copies of each shared-head tensor (every chunk's, each parameter once)."""

    norm: list[torch.nn.Parameter]
    matrix: list[torch.nn.Parameter]


def head_copies(chunks) -> HeadCopies:
    """The trainable copies on this rank whose gradients must be summed and agree (ict freezes
    them): the final norm's, and the head matrix's, which when tied includes the embedding of
    a first stage with no exit."""
    norms: list[torch.nn.Parameter] = []
    matrices: list[torch.nn.Parameter] = []
    for chunk in chunks:
        head = head_of(chunk)
        if head is not None:
            norms.append(head.norm.weight)
            matrices.append(head.weight)
        if is_tied(chunk) and chunk.pre_process:
            matrices.append(chunk.embedding.word_embeddings.weight)
    return HeadCopies(_trainable_once(norms), _trainable_once(matrices))


def exit_only_matrices(chunks) -> list[torch.nn.Parameter]:
    """Head matrices that only exits read (a replica's own matrix, ict's separate heads): the
    fused exit loss is their only gradient. The real head and the embedding are not: GPTModel's
    output layer and the embedding lookup read them too."""
    params: list[torch.nn.Parameter] = []
    for chunk in chunks:
        separate = getattr(chunk, SEPARATE_HEADS_NAME, None)
        if separate is not None:
            params.extend(h.output_layer.weight for h in separate.heads().values())
        replica = getattr(chunk, REPLICA_NAME, None)
        if replica is not None and replica.output_layer is not None:
            params.append(replica.output_layer.weight)
    return _trainable_once(params)


def _trainable_once(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
