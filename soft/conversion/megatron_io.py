"""The megatron side: distributed-checkpoint keys and shards, built and read without a model.

megatron-core stores a model tensor under a layout-free key: per-layer parameters share one key
(`decoder.layers.<name>`) with the layer index as a prepended axis of the global shape, and the
local (non-TE) layer spec renames its norms to the TE names (`sharded_state_dict_keys_map`), so
checkpoints are interchangeable between the two specs. We build exactly those ShardedTensors
(checked against a built model's `sharded_state_dict()` in tests), so `load_checkpoint` reshards
them into any TP/PP layout, and read them back one layer at a time.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from soft.checkpointing.partial_read import read_slices
from soft.config.errors import ConfigError
from soft.conversion.mapping import Row, Shapes, layer_rows
from soft.models.config import ModelConfig

_LAYER_PARAM = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


@functools.cache
def _keys_map() -> dict[str, str]:
    """megatron's own renaming for the local spec (input_layernorm -> linear_qkv.layer_norm_...)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    # ModuleSpec.submodules is typed `type | object`: a TransformerLayerSubmodules here.
    submodules: Any = get_gpt_layer_local_spec(normalization="RMSNorm").submodules
    return dict(submodules.sharded_state_dict_keys_map)


def checkpoint_key(param: str) -> tuple[str, int | None]:
    """Megatron parameter name -> (dist-checkpoint key, layer index or None)."""
    match = _LAYER_PARAM.fullmatch(param)
    if match is None:
        return param, None
    rest = match[2]
    for old, new in _keys_map().items():
        if rest.startswith(old):
            rest = new + rest[len(old) :]
    return f"decoder.layers.{rest}", int(match[1])


def sharded_tensor(param: str, tensor: torch.Tensor, num_layers: int) -> ShardedTensor:
    key, layer = checkpoint_key(param)
    if layer is None:
        return ShardedTensor.from_rank_offsets(key, tensor, replica_id=0)
    return ShardedTensor.from_rank_offsets(
        key, tensor, (0, layer, num_layers), replica_id=0, prepend_axis_num=1
    )


def extra_state_objects(model: ModelConfig, layer: int) -> dict[str, ShardedObject]:
    """The (empty) `_extra_state` entries of a layer's linear modules: the local spec saves and
    requests them, so a checkpoint without them fails a strict load."""
    out = {}
    for row in layer_rows(model):
        module = row.megatron.rsplit(".", 1)[0].replace("*", str(layer))
        if "layernorm" in module:
            continue
        param = f"{module}._extra_state"
        key, _ = checkpoint_key(param)
        out[param] = ShardedObject(key, None, (model.num_layers,), (layer,), replica_id=0)
    return out


class ModelOnly(torch.nn.Module):
    """Stands in for a model chunk in checkpointing.save: its sharded state dict is prebuilt."""

    def __init__(self, sharded: dict[str, Any]) -> None:
        super().__init__()
        self._sharded = sharded

    def sharded_state_dict(
        self,
        prefix: str = "",
        sharded_offsets: tuple[tuple[int, int, int], ...] = (),
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return self._sharded


def ensure_single_rank_world() -> None:
    """dist_checkpointing.save needs torch.distributed; a plain process gets a world of one."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        if dist.get_world_size() != 1:
            raise ConfigError("checkpoint conversion runs in one process (got a multi-rank world)")
        return
    from soft.parallel.config import ParallelConfig
    from soft.parallel.setup import init_distributed

    init_distributed(ParallelConfig(), seed=0)


class CheckpointReader:
    """Reads a torch_dist checkpoint one layer at a time, whatever TP/PP layout saved it."""

    def __init__(self, ckpt: Path, num_layers: int) -> None:
        self.ckpt = ckpt
        self.num_layers = num_layers
        backend = _backend(ckpt)
        if backend != "torch_dist":
            raise ConfigError(
                f"checkpoint '{ckpt}' uses the '{backend}' format; expected torch_dist"
            )
        try:
            self.metadata = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        except Exception as exc:
            raise ConfigError(f"cannot read checkpoint metadata in '{ckpt}' ({exc})") from exc

    def dtype(self) -> torch.dtype:
        return self._meta("embedding.word_embeddings.weight").properties.dtype

    def padded_vocab(self) -> int:
        return self._meta("embedding.word_embeddings.weight").size[0]

    def _meta(self, key: str) -> Any:
        if key not in self.metadata:
            raise ConfigError(
                f"checkpoint '{self.ckpt}' has no tensor '{key}' (not a LLaMA-shaped SoFT model?)"
            )
        return self.metadata[key]

    def _request(
        self, row: Row, layer: int | None, shapes: Shapes
    ) -> tuple[str, tuple[tuple[int, ...], torch.Tensor]]:
        param = row.megatron.replace("*", str(layer)) if layer is not None else row.megatron
        key, _ = checkpoint_key(param)
        meta = self._meta(key)
        expected = row.megatron_shape(shapes)
        stored = tuple(meta.size)
        want = (self.num_layers, *expected) if layer is not None else expected
        if stored != want:
            raise ConfigError(
                f"checkpoint '{self.ckpt}': '{key}' has shape {stored}, expected {want} from its config.yaml"
            )
        if layer is None:
            return key, ((0,) * len(expected), torch.empty(expected, dtype=meta.properties.dtype))
        return key, (
            (layer,) + (0,) * len(expected),
            torch.empty((1, *expected), dtype=meta.properties.dtype),
        )

    def read(self, rows: list[tuple[Row, int | None]], shapes: Shapes) -> dict[str, torch.Tensor]:
        """{megatron parameter name: tensor} for the given (row, layer) pairs, in one read."""
        requests, names = {}, {}
        for row, layer in rows:
            key, request = self._request(row, layer, shapes)
            requests[key] = [request]
            names[key] = (
                (row.megatron.replace("*", str(layer)), True)
                if layer is not None
                else (row.megatron, False)
            )
        # One process reads its slices directly (see soft.checkpointing.partial_read).
        read_slices(self.ckpt, requests)
        # Layer requests carry the prepended layer axis (size 1): drop it.
        return {names[k][0]: buf[0] if names[k][1] else buf for k, [(_, buf)] in requests.items()}


def _backend(ckpt: Path) -> str:
    import json

    try:
        return json.loads((ckpt / "metadata.json").read_text())["sharded_backend"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"checkpoint '{ckpt}' has no readable metadata.json ({exc})") from exc
