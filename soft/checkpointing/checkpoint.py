"""Distributed checkpoints (megatron-core dist_checkpointing, torch_dist format).

Layout of a checkpoint directory:

    <save_dir>/iter_0000020/      one complete checkpoint (model, optimizer, scheduler,
                                  data position, RNG states, config.yaml)
    <save_dir>/latest             the name of the newest complete checkpoint

A checkpoint is written to `iter_N.tmp`, renamed to `iter_N` once every rank has finished,
and only then is `latest` replaced (write + rename). A crash or kill mid-save leaves a `.tmp`
folder that is never read, and the previous checkpoint stays loadable.

Model tensors are stored by their global (layout-free) keys, so a checkpoint saved at one
TP/PP/DP layout loads at another; the head replicas of exit stages map onto the real head's
keys (see soft.models.shared_head), so one copy is stored.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from soft.config.core import save_yaml
from soft.config.errors import ConfigError

LATEST = "latest"
_MANAGER = None  # the fork-context Manager behind dist_checkpointing's results queue
FORMAT_VERSION = 1
_LAYER_KEY_PREFIX = "decoder.layers."


@dataclass
class TrainState:
    """Where training stands: restored on resume so the loss curve continues."""

    iteration: int = 0
    consumed_samples: int = 0


def _use_fork_results_queue() -> None:
    """dist_checkpointing collects writer results through a spawn-context Manager
    (`strategies/filesystem_async.py:_get_write_results_queue`), whose start-up re-imports
    `__main__` and took ~19 s a save on CPU. A fork-context Manager gives the same queue
    without the re-import (0.3 s). CPU runs only: GPU runs keep megatron-core's default."""
    if torch.cuda.is_available():
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    global _MANAGER
    if filesystem_async._results_queue is None:
        _MANAGER = mp.get_context("fork").Manager()
        filesystem_async._results_queue = _MANAGER.Queue()


def shutdown_writer_processes() -> None:
    """Stop the results-queue Manager process (also done at interpreter exit; processes that
    leave through os._exit, like forked test ranks, must call this)."""
    global _MANAGER
    if _MANAGER is not None:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        _MANAGER.shutdown()
        _MANAGER = None
        filesystem_async._results_queue = None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _rng_sharded_object(state: Any) -> ShardedObject:
    """One RNG state per rank; restored only when the layout is unchanged."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _model_state(chunks) -> dict[str, Any]:
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _optimizer_metadata(use_distributed_optimizer: bool, fmt: str) -> dict[str, Any] | None:
    """How megatron-core lays out distributed-optimizer state in the checkpoint: see
    CheckpointConfig.optimizer_format."""
    return {"distrib_optim_sharding_type": fmt} if use_distributed_optimizer else None


def _stored_optimizer_format(ckpt: Path) -> str:
    """The distributed-optimizer layout a checkpoint was saved with (its common state)."""
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    return (common.get("optimizer") or {}).get("param_state_sharding_type", "dp_reshardable")


def save_checkpoint(
    save_dir: str | Path,
    chunks,
    optimizer,
    scheduler,
    state: TrainState,
    config: Any,
    use_distributed_optimizer: bool = False,
    keep_last: int = 0,
    optimizer_format: str = "fully_reshardable",
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    _use_fork_results_queue()
    save_dir = Path(save_dir)
    final = save_dir / iter_name(state.iteration)
    tmp = save_dir / f"{final.name}.tmp"
    if _is_rank0():
        if tmp.exists():
            shutil.rmtree(tmp)  # a previous attempt died mid-save
        tmp.mkdir(parents=True)
    _barrier()
    sharded = _model_state(chunks)
    if optimizer is not None:  # it finds its parameters' keys in the model entries
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, metadata=_optimizer_metadata(use_distributed_optimizer, optimizer_format)
        )
    sharded["rng_state"] = _rng_sharded_object(_rng_state())
    sharded["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    sharded["train_state"] = {
        "iteration": state.iteration,
        "consumed_samples": state.consumed_samples,
    }
    sharded["format_version"] = FORMAT_VERSION
    dist_checkpointing.save(sharded, str(tmp))
    _barrier()
    if _is_rank0():
        save_yaml(config, tmp / "config.yaml")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _write_latest(save_dir, final.name)
        _prune(save_dir, keep_last)
    _barrier()
    return final


def _write_latest(save_dir: Path, name: str) -> None:
    tmp = save_dir / f"{LATEST}.tmp"
    tmp.write_text(name + "\n")
    tmp.replace(save_dir / LATEST)


def _prune(save_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    complete = sorted(
        p for p in save_dir.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")
    )
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint folder from `path`: an iter_* folder itself, or a save dir's `latest`."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    pointer = path / LATEST
    if pointer.is_file():
        target = path / pointer.read_text().strip()
        if not (target / "metadata.json").is_file():
            raise ConfigError(
                f"checkpoint pointer '{pointer}' names '{target.name}', which is not a complete checkpoint"
            )
        return target
    return None


def load_checkpoint(
    path: str | Path,
    chunks,
    optimizer=None,
    scheduler=None,
    use_distributed_optimizer: bool = False,
    strict: bool = True,
    allow_extract: bool = False,
) -> TrainState:
    """Load model (and, unless fine-tuning, optimizer/scheduler/RNG) into this layout.

    `allow_extract`: the model may have fewer layers than the checkpoint; it gets the first
    ones (soft.mode=extracted)."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise ConfigError(
            f"checkpoint.load_dir '{path}' is not a checkpoint: expected an iter_* folder with "
            f"metadata.json or a folder with a '{LATEST}' file"
        )
    stored = _stored_metadata(ckpt)
    request, partial = _model_request(ckpt, chunks, stored, allow_extract)
    if optimizer is not None and use_distributed_optimizer:
        _materialise_distributed_optimizer_state(optimizer)
    if optimizer is not None:
        fmt = _stored_optimizer_format(ckpt) if use_distributed_optimizer else ""
        request["optimizer"] = optimizer.sharded_state_dict(
            request, is_loading=True, metadata=_optimizer_metadata(use_distributed_optimizer, fmt)
        )
        request["rng_state"] = _rng_sharded_object(None)
    loaded = _load_with_rng_fallback(request, ckpt, stored, partial)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"], strict=strict)
    if optimizer is None:
        return TrainState()
    with torch.no_grad():  # fp32 distributed-optimizer shards are views of the parameters
        optimizer.load_state_dict(loaded["optimizer"])
    if use_distributed_optimizer:
        _restore_adam_steps(optimizer, loaded["optimizer"])
    if scheduler is not None and loaded.get("scheduler") is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if loaded.get("rng_state") is not None:
        _set_rng_state(loaded["rng_state"])
    ts = loaded["train_state"]
    return TrainState(iteration=int(ts["iteration"]), consumed_samples=int(ts["consumed_samples"]))


def _saved_adam_steps(tree: Any) -> set[float]:
    """Every `step` recorded in the param groups of a loaded (distributed) optimizer state."""
    if isinstance(tree, list):
        return set().union(*(_saved_adam_steps(v) for v in tree))
    if not isinstance(tree, dict):
        return set()
    groups = tree.get("param_groups")
    steps = (
        {float(g["step"]) for g in groups if isinstance(g, dict) and "step" in g}
        if isinstance(groups, list)
        else set()
    )
    return steps.union(*(_saved_adam_steps(v) for v in tree.values()))


def _restore_adam_steps(optimizer, loaded_state: Any) -> None:
    """Give every parameter its own, correct Adam `step` tensor after a load.

    With torch's Adam (no Apex/TE), megatron-core 0.16.1's distributed optimizer keeps the step
    count in the param groups of its checkpoint and, on load:
    - assigns ONE step tensor to every parameter's state (distrib_optimizer.py:822-825), which
      torch's Adam then increments once per parameter: bias correction goes wrong from the
      first step after loading;
    - with dp_reshardable, copies the pre-load (dummy) per-parameter step back over it
      (load_parameter_state_from_dp_reshardable, line 1804).
    Checked by the resume tests, which compare the second step after loading."""
    steps = _saved_adam_steps(loaded_state)
    if len(steps) != 1:
        return  # not a torch-Adam distributed-optimizer state: nothing to repair
    (step,) = steps
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = torch.tensor(step, dtype=state["step"].dtype)


def _materialise_distributed_optimizer_state(optimizer) -> None:
    """megatron-core 0.16.1's DistributedOptimizer.sharded_state_dict(is_loading=True) first
    calls state_dict(), which with torch's Adam (no Apex/TE: CPU runs) asserts that every
    parameter has the same 'step' (distrib_optimizer.py:642) and fails on a fresh optimizer
    with no state. Its own remedy, `_init_optimizer_states_with_dummy_values` (line 1137), runs
    only after that assert; run it first. The dummy values are overwritten by the load (checked
    by the exact-resume test)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _load_with_rng_fallback(
    request: dict[str, Any], ckpt: Path, stored: dict[str, Any], partial: bool = False
) -> dict[str, Any]:
    """RNG states are per rank; at a different world size they cannot apply and are skipped.

    `partial`: the request reads only part of some tensors (extracted layers), which
    megatron-core's access check (every shard read exactly once) would reject."""
    saved_world = _saved_world_size(stored)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if "rng_state" in request and saved_world != world:
        request.pop("rng_state")
    if not partial:
        return dist_checkpointing.load(request, str(ckpt))
    from soft.checkpointing.partial_read import SliceLoadStrategy

    return dist_checkpointing.load(
        request, str(ckpt), sharded_strategy=SliceLoadStrategy(), validate_access_integrity=False
    )


def _stored_metadata(ckpt: Path) -> dict[str, Any]:
    """{checkpoint key: sharded metadata (global shape, ...)} of everything the folder holds."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return load_sharded_metadata(str(ckpt))


def _model_request(
    ckpt: Path, chunks, stored: dict[str, Any], allow_extract: bool
) -> tuple[dict[str, Any], bool]:
    """The model part of a load request, adapted to what the checkpoint holds: ict heads it
    lacks are read from the shared head; a deeper checkpoint gives its first layers (then the
    second value is True: the request reads part of the checkpoint's layer tensors)."""
    from soft.models import shared_head

    needs_init = shared_head.has_separate_heads(chunks) and not any(
        k.startswith(f"{shared_head.SEPARATE_HEADS_NAME}.") for k in stored
    )
    if needs_init:
        logging.getLogger("soft").info(
            "%s has no separate exit heads: initialising them from its shared head", ckpt
        )
    reading = shared_head.separate_heads_read_shared_head if needs_init else contextlib.nullcontext
    with reading(chunks):
        request = _model_state(chunks)
    model_layers = chunks[0].config.num_layers
    stored_layers = _stored_num_layers(stored)
    if stored_layers is not None and stored_layers != model_layers:
        if not (allow_extract and stored_layers > model_layers):
            raise ConfigError(
                f"checkpoint '{ckpt}' holds a {stored_layers}-layer model but model.num_layers is "
                f"{model_layers}; to fine-tune the first {model_layers} layers of a deeper model "
                "set soft.mode=extracted (with checkpoint.finetune=true)"
            )
        _widen_layer_axis(request, model_layers, stored_layers)
        return request, True
    return request, False


def _stored_num_layers(stored: dict[str, Any]) -> int | None:
    """Every per-layer key has the layer count as its leading global dimension."""
    for key, meta in stored.items():
        if key.startswith(_LAYER_KEY_PREFIX):
            return int(meta.global_shape[0])
    return None


def _widen_layer_axis(tree: Any, model_layers: int, stored_layers: int) -> Any:
    """Make a k-layer model's request address layers 0..k-1 of an N-layer checkpoint.

    megatron-core stores every per-layer tensor under one key with the layer as a prepended
    axis of global size num_layers (TransformerBlock.sharded_state_dict); the request of a
    shallower model differs only in that size. SwiGLU's fc1 is a ShardedTensorFactory whose
    sharded tensors are built later, so its build function is wrapped."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(tree, dict):
        for key, value in tree.items():
            tree[key] = _widen_layer_axis(value, model_layers, stored_layers)
        return tree
    if isinstance(tree, list):
        return [_widen_layer_axis(v, model_layers, stored_layers) for v in tree]
    if not getattr(tree, "key", "").startswith(_LAYER_KEY_PREFIX):
        return tree
    if isinstance(tree, ShardedTensorFactory):
        build = tree.build_fn

        def widened_build(*args, **kwargs):
            return _widen_layer_axis(build(*args, **kwargs), model_layers, stored_layers)

        tree.build_fn = widened_build
    elif isinstance(tree, ShardedObject) or (
        isinstance(tree, ShardedTensor) and tree.prepend_axis_num > 0
    ):
        if tree.global_shape[0] != model_layers:
            raise RuntimeError(f"'{tree.key}': expected {model_layers} layers on axis 0")
        tree.global_shape = (stored_layers, *tree.global_shape[1:])
        fragments = getattr(tree, "axis_fragmentations", None)
        if fragments is not None:
            tree.axis_fragmentations = (stored_layers, *fragments[1:])
    return tree


def has_optimizer_state(path: str | Path) -> bool:
    """False for weights-only checkpoints (HF imports, model-only saves)."""
    ckpt = find_checkpoint(path)
    return ckpt is not None and any(k.startswith("optimizer.") for k in _stored_metadata(ckpt))


def _saved_world_size(stored: dict[str, Any]) -> int | None:
    for key, obj in stored.items():
        if key.startswith("rng_state"):
            return obj.global_shape[0]
    return None  # metadata without RNG states (model-only checkpoints)
