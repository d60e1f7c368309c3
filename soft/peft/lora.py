"""LoRA on megatron-core's tensor-parallel linear layers.

An adapted layer computes y = W x + s * B A dropout(x) with s = alpha / rank, A [r x in],
B [out x r], B = 0 at the start. Its shards follow the base layer so that no rank ever holds
a full activation it would not hold anyway (the layout PEFT's LoraParallelLinear and
Megatron-Bridge use):

- column-parallel bases (linear_qkv, linear_fc1; W split along the output): A is replicated
  over tensor parallelism, B is split along the output like W. The rank's u = A x is whole;
  in backward each rank holds part of du (from its B slice), which the region function sums
  over TP. With sequence parallelism x is this rank's part of the sequence: u is gathered
  along the sequence (r wide, not h), and A's gradient, a sum over the sequence, is partial
  per rank: A is marked `sequence_parallel`, so megatron-core sums it over TP as it does the
  norms' (finalize_model_grads).
- row-parallel bases (linear_proj, linear_fc2; W split along the input): A is split along the
  input like W, each rank's A x is a partial sum that is reduced over TP (reduce-scattered
  along the sequence with SP), and B is replicated (marked `sequence_parallel` under SP).

Adapters attach to the base layer in place: the base keeps its class (a subclass adds the
adapter to its forward), its parameter names and its checkpoint keys; the adapter's tensors
are `<layer>.lora.a` / `<layer>.lora.b`, with TP sharding stated in their own sharded state
dict. Their initial values are layout-invariant (drawn per checkpoint key and layer, PEFT's
default: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0), so one rank and any TP x PP layout start alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from soft.compat.versions import require_megatron
from soft.models.gpt import fill_shard, walk_leaves
from soft.peft.config import COLUMN_PARALLEL, OWNERS, PeftConfig

ADAPTER_NAME = "lora"  # the child module on an adapted layer
ADAPTER_KEY = f".{ADAPTER_NAME}."  # in parameter names and checkpoint keys


class LoraAdapter(MegatronModule):
    """The low-rank update of one tensor-parallel linear layer (see the module docstring)."""

    def __init__(
        self, config: Any, column: bool, in_features: int, out_features: int, peft: PeftConfig
    ) -> None:
        super().__init__(config=config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.column = column
        self.scale = peft.scale
        self.sequence_parallel = bool(config.sequence_parallel) and tp > 1
        self.dropout = torch.nn.Dropout(peft.dropout) if peft.dropout > 0 else None
        a_shape = (peft.rank, in_features) if column else (peft.rank, in_features // tp)
        b_shape = (out_features // tp, peft.rank) if column else (out_features, peft.rank)
        dtype = config.params_dtype
        self.a = torch.nn.Parameter(torch.empty(a_shape, dtype=dtype))
        self.b = torch.nn.Parameter(torch.zeros(b_shape, dtype=dtype))
        # Which tensor is split over TP (and along which dim); the other is replicated, and
        # under SP its gradient is a partial sum over this rank's part of the sequence.
        split, whole = (self.b, self.a) if column else (self.a, self.b)
        tensor_parallel.set_tensor_model_parallel_attributes(
            split, is_parallel=True, dim=0 if column else 1, stride=1
        )
        tensor_parallel.set_tensor_model_parallel_attributes(
            whole, is_parallel=False, dim=-1, stride=1
        )
        if self.sequence_parallel:
            whole.sequence_parallel = True  # type: ignore[attr-defined]
        # (index, count) of this layer among the adapted layers: the adapters' layer axis in
        # checkpoints (megatron-core stacks a tensor of every layer along one; when only some
        # layers are adapted the axis counts those, so that the shards cover it).
        self.slot = (0, 1)
        # linear_fc1 of a SwiGLU MLP holds [gate; up]: each TP rank its part of both, so its
        # split rows are stored as two halves, as megatron-core stores the weight (set by
        # adapt_layer).
        self.swiglu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self._dropout(x)
        u = torch.matmul(x, self.a.t())
        if self.column:
            u = (
                tensor_parallel.gather_from_sequence_parallel_region(u, group=self.tp_group)
                if self.sequence_parallel
                else tensor_parallel.copy_to_tensor_model_parallel_region(u, group=self.tp_group)
            )
        else:
            u = (
                tensor_parallel.reduce_scatter_to_sequence_parallel_region(u, group=self.tp_group)
                if self.sequence_parallel
                else tensor_parallel.reduce_from_tensor_model_parallel_region(
                    u, group=self.tp_group
                )
            )
        return torch.matmul(u, self.b.t()) * self.scale

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs that differ per TP rank (split along the hidden or the sequence) draw from
        the model-parallel RNG stream, as megatron-core's own dropouts do; a column layer's
        whole input draws the same mask on every TP rank, or replicas of A would drift."""
        assert self.dropout is not None
        if self.column and not self.sequence_parallel:
            return self.dropout(x)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.dropout(x)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: Any = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        axis = {"b": 0} if self.column else {"a": 1}
        if sharded_offsets and sharded_offsets[0][0] == 0:  # the layer axis TransformerBlock adds
            sharded_offsets = ((0, *self.slot), *sharded_offsets[1:])
        state = make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            axis,
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group")
            or parallel_state.get_data_parallel_group(with_context_parallel=True),
        )
        if self.swiglu:
            singleton = (metadata or {}).get("singleton_local_shards", False)
            key = f"{prefix}b"
            state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets, singleton)
        return state


class _Adapted:
    """Mixed into an adapted layer's class: base forward plus the adapter's update, and the
    adapter's own sharding in the checkpoint. The base's forward is unchanged otherwise."""

    lora: LoraAdapter

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if _fuses_norm(self):  # TE's fused norm+linear: the adapter reads the norm's output
            out, bias, normed = _with_norm_output(self, super().forward(x, *args, **kwargs))  # type: ignore[misc]
            return out + self.lora(normed).to(out.dtype), bias
        out, bias = super().forward(x, *args, **kwargs)  # type: ignore[misc]
        return out + self.lora(x).to(out.dtype), bias

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: Any = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        # The base's own method lists every tensor in its state dict (the adapter's too, as
        # unsplit); the adapter's entries are replaced by its own, correctly split ones.
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)  # type: ignore[misc]
        adapter_prefix = f"{prefix}{ADAPTER_NAME}."
        state = {k: v for k, v in state.items() if not k.startswith(adapter_prefix)}
        state.update(self.lora.sharded_state_dict(adapter_prefix, sharded_offsets, metadata))
        return state


def _fuses_norm(layer: Any) -> bool:
    return hasattr(layer, "return_layernorm_output") and hasattr(layer, "layer_norm_weight")


def _with_norm_output(layer: Any, result: Any) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Transformer Engine's LayerNormLinear with return_layernorm_output returns (out, ln_out)
    or, with its bias returned, (out, bias, ln_out); megatron-core's wrapper adds a None bias
    to the first form."""
    if layer.te_return_bias:
        out, bias, normed = result
    else:
        (out, normed), bias = result
    return out, bias, normed


_ADAPTED_CLASSES: dict[type, type] = {}


def _adapted_class(base_class: type) -> type:
    """`base_class` with the adapter mixed in (one subclass per base class): isinstance checks
    in megatron-core still see the base class."""
    if base_class not in _ADAPTED_CLASSES:
        _ADAPTED_CLASSES[base_class] = type(
            f"Lora{base_class.__name__}", (_Adapted, base_class), {}
        )
    return _ADAPTED_CLASSES[base_class]


def _features(layer: Any, column: bool) -> tuple[int, int]:
    """(in, out) of the whole (unsplit) layer."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rows, cols = layer.weight.shape  # [out(/tp), in(/tp)]
    return (cols, rows * tp) if column else (cols * tp, rows)


def adapt_layer(layer: Any, name: str, peft: PeftConfig, slot: tuple[int, int]) -> LoraAdapter:
    """Attach an adapter to one linear layer in place (see the module docstring); `slot`:
    (index, count) of its transformer layer among the adapted ones."""
    column = name in COLUMN_PARALLEL
    in_features, out_features = _features(layer, column)
    adapter = LoraAdapter(layer.config, column, in_features, out_features, peft)
    adapter.slot = slot
    adapter.swiglu = name == "linear_fc1" and bool(layer.config.gated_linear_unit)
    adapter.to(layer.weight.device)
    layer.__class__ = _adapted_class(type(layer))
    layer.add_module(ADAPTER_NAME, adapter)
    if _fuses_norm(layer):
        layer.return_layernorm_output = True
    return adapter


def _targets(layer: Any, peft: PeftConfig) -> list[tuple[str, Any]]:
    return [(t, getattr(getattr(layer, OWNERS[t]), t)) for t in peft.target_modules]


def apply_lora(chunks: list[Any], peft: PeftConfig, seed: int) -> None:
    """Freeze every weight of this rank's chunks and attach adapters to the chosen layers
    (peft.layers, 1-based global numbers) and modules; with peft.train_final_norm the final
    norm and its exit copies train too. Call before the chunks are wrapped in DDP (which
    only buckets parameters that train). Relies on megatron-core internals listed in
    docs/DESIGN.md ("Upgrading megatron-core"): checked against the pinned version."""
    require_megatron()
    for chunk in chunks:
        adapted = peft.adapted_layers(chunk.config.num_layers)
        for param in chunk.parameters():
            param.requires_grad = False
        for layer in chunk.decoder.layers:
            if peft.adapts(layer.layer_number):
                slot = (adapted.index(layer.layer_number), len(adapted))
                for name, linear in _targets(layer, peft):
                    adapt_layer(linear, name, peft, slot)
        if peft.train_final_norm:
            for norm in final_norm_copies(chunk):
                for param in norm.parameters():
                    param.requires_grad = True
        if chunk.pre_process:
            chunk.embedding.register_forward_hook(_embedding_output_requires_grad)
    init_adapters(chunks, seed)


def _embedding_output_requires_grad(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
    """The frozen embedding's output would not require a gradient, and megatron-core's
    activation checkpointing (an autograd Function whose inputs then need none) would skip the
    backward of the first checkpointed layers: their adapters would get no gradient. The same
    remedy as transformers' enable_input_require_grads."""
    return output if output.requires_grad else output.requires_grad_(True)


def final_norm_copies(chunk: Any) -> list[torch.nn.Module]:
    """The final norm and every exit replica's norm (they are one tensor, kept in sync by
    soft.parallel.head_sync)."""
    from soft.models.heads import head_of

    head = head_of(chunk)
    return [] if head is None else [head.norm]


def init_adapters(chunks: list[Any], seed: int) -> None:
    """PEFT's initial values, the same at any layout: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming
    uniform with a = sqrt(5)), B = 0."""
    for chunk in chunks:
        for item in walk_leaves(chunk.sharded_state_dict()):
            if isinstance(item, ShardedTensor) and item.key.endswith(f"{ADAPTER_KEY}a"):
                fan_in = item.global_shape[-1]
                fill_shard(item, seed, _uniform(1.0 / math.sqrt(fan_in)))


def _uniform(bound: float) -> Callable[[tuple[int, ...], torch.Generator], torch.Tensor]:
    def draw(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return torch.rand(shape, generator=gen) * (2 * bound) - bound

    return draw


def is_adapter_key(key: str) -> bool:
    return ADAPTER_KEY in key


def adapter_parameters(chunks: list[torch.nn.Module]) -> list[tuple[str, torch.nn.Parameter]]:
    return [
        (name, p)
        for chunk in chunks
        for name, p in chunk.named_parameters()
        if is_adapter_key(name)
    ]
