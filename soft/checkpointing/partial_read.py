"""Reading chosen slices of a torch_dist checkpoint, without collectives.

megatron-core's torch_dist loader cannot read part of a tensor in a one-process world: it
describes every chunk it does not read as placed on rank (rank + 1) % world_size, which there
is itself, and torch's ShardedTensor then refuses the layout. Two users need partial reads:
- the HF export reads a stacked per-layer tensor one layer at a time (soft.conversion);
- soft.mode=extracted loads the first k layers of a deeper checkpoint.
Both read with torch.distributed.checkpoint directly through `SlicePlanner`: each process
reads exactly the slices it asks for, whatever the world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedStateDict,
    ShardedTensor,
    StateDict,
)
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from soft.compat.versions import require_megatron

# checkpoint key -> [(global offsets, destination buffer)]: one key may be read several times
# (SwiGLU's fc1 halves, several layers of a stacked tensor).
SliceRequests = dict[str, list[tuple[tuple[int, ...], torch.Tensor]]]


class SlicePlanner(DefaultLoadPlanner):
    """Reads the requested chunks of stored tensors into the given buffers."""

    def __init__(self, requests: SliceRequests) -> None:
        super().__init__()
        self.requests = requests

    def create_local_plan(self) -> LoadPlan:
        if self.metadata is None:
            raise RuntimeError("SlicePlanner: dcp.load planned before reading the metadata")
        items = []
        for key, slices in self.requests.items():
            stored = self.metadata.state_dict_metadata[key]
            if not isinstance(stored, TensorStorageMetadata):
                raise RuntimeError(f"checkpoint key '{key}' holds bytes, not a tensor to slice")
            chunks = [
                ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
                for offsets, dest in slices
            ]
            items += create_read_items_for_chunk_list(key, stored, chunks)
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        index = read_item.dest_index.index  # create_local_plan numbered every chunk
        if index is None:
            raise RuntimeError(f"read item of '{read_item.dest_index.fqn}' without a chunk index")
        dest = self.requests[read_item.dest_index.fqn][index][1]
        return narrow_tensor_by_index(dest, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: nothing to copy back


def read_slices(ckpt: str | Path, requests: SliceRequests) -> None:
    """Fill every requested buffer from the checkpoint (no process group needed)."""
    dcp.load(
        {},
        storage_reader=dcp.FileSystemReader(str(ckpt)),
        planner=SlicePlanner(requests),
        no_dist=True,
    )


class SliceLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron-core load strategy that reads each ShardedTensor's own slice and nothing else.

    Used for partial loads (a request covering only part of the stored tensors), where the
    default strategy fails in a one-process world. Sharded objects (the layers' `_extra_state`:
    empty for the local spec, FP8 scaling history for Transformer Engine) are not read: they
    start fresh, as they do for any fine-tuning run's new layers.
    """

    # megatron's base class declares a property, which its TorchDistLoadShardedStrategy
    # shadows with a plain method; base.py reads the attribute, so a property is right.
    @property
    def can_handle_sharded_objects(self) -> bool:  # type: ignore[override]
        return True

    def load(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: str | Path) -> StateDict:
        # megatron-core 0.16's LoadShardedStrategy.load(sharded_state_dict, checkpoint_dir)
        # (dist_checkpointing/strategies/base.py:130, called at serialization.py's
        # `sharded_strategy.load`); 0.19 passes a third argument, async_strategy.
        require_megatron()
        requests: SliceRequests = {}
        buffers: dict[int, torch.Tensor] = {}
        for sh in nested_values(sharded_state_dict):
            if not isinstance(sh, ShardedTensor):
                continue
            prepended = (1,) * sh.prepend_axis_num
            dest = torch.empty((*prepended, *sh.local_shape), dtype=sh.dtype)
            requests.setdefault(sh.key, []).append((tuple(sh.global_offset), dest))
            buffers[id(sh)] = dest.reshape(sh.local_shape)
        read_slices(checkpoint_dir, requests)

        def result(sh: Any) -> Any:
            if isinstance(sh, ShardedObject):
                return None
            if not isinstance(sh, ShardedTensor):
                return sh
            # The read buffer goes where the request's own tensor lives (CPU when it has none).
            return buffers[id(sh)].to(sh.data.device if sh.data is not None else "cpu")

        return dict_list_map_inplace(result, sharded_state_dict)
