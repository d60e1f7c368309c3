"""The model part of a megatron-core load request, fitted to what a checkpoint holds.

- Every tensor's global shape is compared with the stored one first: megatron-core's loader
  reads a smaller request out of a larger stored tensor without a word (a 512-row embedding
  request is served rows 0-511 of a 32000-row checkpoint), so a mismatch here is an error that
  names the key and both shapes.
- ict heads that the checkpoint lacks (an SFT checkpoint) are read from the shared head.
- extracted: a k-layer model reads the first k layers of a deeper checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.transformer.module import MegatronModule

from soft.checkpointing.directory import CheckpointError
from soft.models import heads
from soft.models.gpt import walk_leaves

log = logging.getLogger(__name__)
LAYER_KEY_PREFIX = "decoder.layers."


class Chunk(Protocol):
    """What checkpointing uses of a model chunk: a megatron-core MegatronModule (GPTModel), or
    a stand-in holding a prebuilt sharded state dict (soft.conversion's ModelOnly)."""

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: Any = (), metadata: dict | None = None
    ) -> dict[str, Any]: ...

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.nn.Parameter]]: ...

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any: ...


def model_state(
    chunks: Sequence[Chunk],
    metadata: dict[str, Any] | None = None,
    keep: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Every chunk's sharded state dict; `keep`: only the entries whose state-dict key it
    accepts (an adapter run saves what trains and loads the rest from its base)."""
    states = {
        f"model{i}": chunk.sharded_state_dict(metadata=metadata) for i, chunk in enumerate(chunks)
    }
    if keep is None:
        return states
    return {name: {k: v for k, v in s.items() if keep(k)} for name, s in states.items()}


def model_request(
    ckpt: Path,
    chunks: Sequence[MegatronModule],
    stored: dict[str, Any],
    extract: bool,
    keep: Callable[[str], bool] | None = None,
) -> tuple[dict[str, Any], bool]:
    """(request, partial): partial is True when the request reads only part of the stored
    layer tensors (extract=True with a deeper checkpoint). `keep`: see model_state."""
    needs_init = heads.has_separate_heads(chunks) and not any(
        k.startswith(f"{heads.SEPARATE_HEADS_NAME}.") for k in stored
    )
    if needs_init:
        log.info("%s has no separate exit heads: initialising them from its shared head", ckpt)
    request = model_state(chunks, {heads.READ_SHARED_HEAD: True} if needs_init else None, keep)
    model_layers = chunks[0].config.num_layers
    stored_layers = stored_num_layers(stored)
    partial = False
    if stored_layers is not None and stored_layers != model_layers:
        partial = True
        if not (extract and stored_layers > model_layers):
            raise CheckpointError(
                f"checkpoint '{ckpt}' holds a {stored_layers}-layer model but model.num_layers is "
                f"{model_layers}; to fine-tune the first {model_layers} layers of a deeper model "
                "set soft.mode=extracted (with checkpoint.finetune=true)"
            )
        widen_layer_axis(request, model_layers, stored_layers)
    check_shapes(request, stored, ckpt)
    return request, partial


def check_shapes(request: dict[str, Any], stored: dict[str, Any], ckpt: Path) -> None:
    """Every requested tensor has the stored global shape (see the module docstring)."""
    for item in walk_leaves(request):
        tensors = walk_leaves(item.build()) if isinstance(item, ShardedTensorFactory) else [item]
        for tensor in tensors:
            if not isinstance(tensor, ShardedTensor):
                continue
            meta = stored.get(tensor.key)
            have = tuple(getattr(meta, "global_shape", ()) or ())
            want = tuple(tensor.global_shape)
            if meta is not None and have and have != want:
                raise CheckpointError(
                    f"checkpoint '{ckpt}': tensor '{tensor.key}' has shape {list(have)} there "
                    f"but {list(want)} in this model; the model section of the config (or the "
                    "tokenizer's vocabulary) does not describe the checkpoint. Its own config is "
                    f"'{ckpt / 'config.yaml'}' (an HF import also writes model.yaml beside it: "
                    "pass it with --config)"
                )


def stored_num_layers(stored: dict[str, Any]) -> int | None:
    """Every per-layer key has the layer count as its leading global dimension, except LoRA
    adapters (`<layer>.lora.a/b`, soft.peft.lora): their leading axis counts the ADAPTED
    layers (peft.layers), so an adapter checkpoint of a layer subset is not a shallower model."""
    for key, meta in stored.items():
        if key.startswith(LAYER_KEY_PREFIX) and ".lora." not in key:
            return int(meta.global_shape[0])
    return None


def widen_layer_axis(tree: Any, model_layers: int, stored_layers: int) -> Any:
    """Make a k-layer model's request address layers 0..k-1 of an N-layer checkpoint.

    megatron-core stores every per-layer tensor under one key with the layer as a prepended
    axis of global size num_layers (TransformerBlock.sharded_state_dict); the request of a
    shallower model differs only in that size. SwiGLU's fc1 is a ShardedTensorFactory whose
    sharded tensors are built later, so its build function is wrapped."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            tree[key] = widen_layer_axis(value, model_layers, stored_layers)
        return tree
    if isinstance(tree, list):
        return [widen_layer_axis(v, model_layers, stored_layers) for v in tree]
    if not getattr(tree, "key", "").startswith(LAYER_KEY_PREFIX):
        return tree
    if isinstance(tree, ShardedTensorFactory):
        build = tree.build_fn

        def widened_build(*args: Any, **kwargs: Any) -> Any:
            return widen_layer_axis(build(*args, **kwargs), model_layers, stored_layers)

        tree.build_fn = widened_build
    elif isinstance(tree, ShardedObject) or (
        isinstance(tree, ShardedTensor) and tree.prepend_axis_num > 0
    ):
        if tree.global_shape[0] != model_layers:
            raise RuntimeError(f"'{tree.key}': expected {model_layers} layers on axis 0")
        tree.global_shape = (stored_layers, *tree.global_shape[1:])
        # Only a ShardedTensor records how each axis is split.
        if isinstance(tree, ShardedTensor) and tree.axis_fragmentations is not None:
            tree.axis_fragmentations = (stored_layers, *tree.axis_fragmentations[1:])
    return tree
