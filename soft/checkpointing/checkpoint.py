"""Distributed checkpoints: `save`, `resume` and `load_weights` over megatron-core's
dist_checkpointing (torch_dist format).

How a save becomes visible and which checkpoint a run continues from is the directory
protocol (soft.checkpointing.directory); the checksums that loading verifies are the manifest
(soft.checkpointing.manifest); fitting a load request to what a checkpoint holds (shape
checks, ict heads, extracted layers) is soft.checkpointing.requests.

Model tensors are stored by their global (layout-free) keys, so a checkpoint saved at one
TP/PP/DP layout loads at another; the head replicas of exit stages map onto the real head's
keys (see soft.models.heads), so one copy is stored.

Every function here is collective: every rank of the job calls it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import MegatronModule

from soft.checkpointing import directory, manifest
from soft.checkpointing.compatibility import saved_config
from soft.checkpointing.directory import CheckpointDamaged, CheckpointError, CheckpointSaveFailed
from soft.checkpointing.requests import Chunk, model_request, model_state
from soft.compat import checkpoint_queue, optimizer_state
from soft.config.core import save_yaml
from soft.failpoints import failpoint
from soft.parallel.collectives import any_rank, barrier, gather_to_all, rank_world

T = TypeVar("T")
log = logging.getLogger(__name__)
# 3: every checkpoint has a manifest (so one without it is damaged); 2 and 1 may predate them.
FORMAT_VERSION = 3
# A key that configs have held since manifests were introduced (with format 2): a format-2
# checkpoint whose config.yaml has it was written with a manifest too.
MANIFEST_ERA_KEY = "checkpoint.on_corrupt"


@dataclass
class TrainState:
    """Where training stands: restored on resume so the loss curve continues."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0  # optimizer updates skipped (fp16 overflow, non-finite policy 'skip')


class NonFiniteCheckpointError(RuntimeError):
    """Refused to save: some parameter or optimizer state is NaN or infinite."""


# ----------------------------------------------------------------------------- saving


def _local_tensors(
    chunks: Sequence[Chunk], optimizer: MegatronOptimizer | None
) -> list[tuple[str, torch.Tensor]]:
    """Every parameter of this rank and the optimizer state it holds (fp32 master weights and
    Adam moments included: a bf16 run's master weights can go bad before the bf16 copy)."""
    named: list[tuple[str, torch.Tensor]] = [
        (name, p) for chunk in chunks for name, p in chunk.named_parameters()
    ]
    for opt in getattr(optimizer, "chained_optimizers", [optimizer] if optimizer else []):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            named += [("optimizer main param", p) for p in group["params"]]
        for state in getattr(inner, "state", {}).values():
            named += [(f"optimizer {k}", v) for k, v in state.items() if torch.is_tensor(v)]
    return named


def ensure_finite(
    chunks: Sequence[Chunk], optimizer: MegatronOptimizer | None, iteration: int
) -> None:
    """Refuse (on every rank) to save a state with a NaN or infinite value anywhere."""
    bad = next(
        (name for name, t in _local_tensors(chunks, optimizer)
         if t.is_floating_point() and not bool(torch.isfinite(t).all())),
        None,
    )  # fmt: skip
    if any_rank(bad is not None):
        where = f" (on this rank: {bad})" if bad else " (on another rank)"
        raise NonFiniteCheckpointError(
            f"refusing to save the checkpoint of iteration {iteration}: parameters or optimizer "
            f"state are not finite{where}; the existing checkpoints are left as they are"
        )


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
    rank, world = rank_world()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _optimizer_metadata(optimizer: MegatronOptimizer | None, fmt: str) -> dict[str, Any] | None:
    """How megatron-core lays out distributed-optimizer state in the checkpoint: see
    CheckpointConfig.optimizer_format."""
    return {"distrib_optim_sharding_type": fmt} if _distributed(optimizer) else None


def _distributed(optimizer: MegatronOptimizer | None) -> bool:
    return bool(getattr(getattr(optimizer, "config", None), "use_distributed_optimizer", False))


def save(
    save_dir: str | Path,
    chunks: Sequence[Chunk],
    state: TrainState,
    config: Any,
    *,
    optimizer: MegatronOptimizer | None = None,
    scheduler: OptimizerParamScheduler | None = None,
    keep_last: int = 0,
    optimizer_format: str = "fully_reshardable",
    identity: dict[str, Any] | None = None,
    valid_loss: float | None = None,
    keep: Callable[[str], bool] | None = None,
) -> Path:
    """Write iter_N (model; with `optimizer`, also optimizer, scheduler, RNG and data
    position), then make it `latest` and prune. Returns the checkpoint folder.

    `identity` goes into the manifest (e.g. the tokenizer's checksum) for later loads to check;
    so does `valid_loss`, the validation loss of these weights when one was measured: pruning
    keeps the newest checkpoint whose validation loss was finite. Nothing in `save_dir`
    changes when the state is not finite or the save fails (a failed save's files are
    removed at once: on a full disk they would hold the last free bytes). `keep`: only the
    model tensors whose state-dict key it accepts (an adapter run's: what trains)."""
    save_dir = Path(save_dir)
    ensure_finite(chunks, optimizer, state.iteration)
    checkpoint_queue.apply()
    rank, world = rank_world()
    tmp = save_dir / f"{directory.iter_name(state.iteration)}{directory.TMP_SUFFIX}"
    if rank == 0:
        directory.begin_save(save_dir, state.iteration)
    barrier()
    sharded = model_state(chunks, keep=keep)
    if optimizer is not None:  # it finds its parameters' keys in the model entries
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, metadata=_optimizer_metadata(optimizer, optimizer_format)
        )
        sharded["rng_state"] = _rng_sharded_object(_rng_state())
        sharded["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    sharded["train_state"] = asdict(state)
    sharded["format_version"] = FORMAT_VERSION
    try:
        dist_checkpointing.save(sharded, str(tmp))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # e.g. a full disk: the previous checkpoint stays `latest`
        # torch's writer gathers every rank's result, so all ranks are done writing here.
        # The free space is read before the unfinished save is removed: it names the cause.
        message = _save_failure(save_dir, tmp, exc)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveFailed(message) from exc
    if rank == 0:
        save_yaml(config, tmp / directory.CONFIG)
    barrier()
    failpoint("save:files_written")
    hashes = gather_to_all(manifest.hash_share(tmp, rank, world))
    if rank == 0:
        files = {name: digest for part in hashes for name, digest in part.items()}
        extra = {"world_size": world, "weights_only": optimizer is None, **(identity or {})}
        if valid_loss is not None:
            extra["valid_loss"] = valid_loss
        manifest.write_manifest(tmp, files, state.iteration, extra)
        failpoint("save:manifest_written")
        directory.commit_save(tmp, keep_last, keep=manifest.newest_validated(save_dir, tmp))
    barrier()
    return save_dir / directory.iter_name(state.iteration)


def _save_failure(save_dir: Path, tmp: Path, exc: BaseException) -> str:
    """torch reports a full disk as e.g. 'unexpected pos 704 vs 598': say what matters.
    Called while the unfinished save still holds its bytes, so a full disk reads as full."""
    free = ""
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(save_dir)
        free = f"; {usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.0f} MiB there"
        if usage.free < 2**20 or "No space left" in _summary(exc):
            free += " (No space left on device)"
    return (
        f"saving checkpoint '{tmp.name.removesuffix(directory.TMP_SUFFIX)}' in '{save_dir}' "
        f"failed ({_summary(exc)}{free}); the previous checkpoint is untouched and the "
        f"unfinished '{tmp.name}' was removed"
    )


# ----------------------------------------------------------------------------- loading


def verify(ckpt: Path, allow_unverified: bool = False) -> None:
    """Check every file against the manifest, the work split over the ranks; a mismatch
    anywhere is a CheckpointDamaged on every rank, naming the files.

    A checkpoint without a manifest is damaged when it was written with one (its manifest was
    removed or lost: nothing vouches for its files); one written before manifests existed is
    refused unless `allow_unverified` (checkpoint.allow_unverified, --allow-unverified)."""
    expected = manifest.read_manifest(ckpt)
    if expected is None:
        _check_unverified(ckpt, allow_unverified)
        return
    rank, world = rank_world()
    problems = [p for part in gather_to_all(manifest.verify_share(ckpt, expected, rank, world))
                for p in part]  # fmt: skip
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise CheckpointDamaged(f"checkpoint '{ckpt}' is damaged: {shown}")


def _written_with_manifest(ckpt: Path) -> str | None:
    """Why `ckpt` must have had a manifest (None when it may predate them)."""
    config = saved_config(ckpt) or {}
    if MANIFEST_ERA_KEY in config:
        return f"its config.yaml has '{MANIFEST_ERA_KEY}', which came with manifests"
    common = _reading(ckpt, dist_checkpointing.load_common_state_dict, str(ckpt))
    version = common.get("format_version", 1) if isinstance(common, dict) else 1
    if version >= 3:
        return f"it is format {version}, which always has one"
    return None


def _check_unverified(ckpt: Path, allow_unverified: bool) -> None:
    why = _written_with_manifest(ckpt)
    if why is not None:
        raise CheckpointDamaged(
            f"checkpoint '{ckpt}' is damaged: its {directory.MANIFEST} is missing, but it was "
            f"written with one ({why}); without it nothing vouches for its files"
        )
    if not allow_unverified:
        raise CheckpointError(
            f"checkpoint '{ckpt}' has no {directory.MANIFEST}: it was written before checksums "
            "existed, so its files cannot be verified. To load it anyway, set "
            "checkpoint.allow_unverified=true (tools: --allow-unverified)"
        )
    log.warning(
        "checkpoint %s has no manifest (written before checksums existed): loaded unverified "
        "(checkpoint.allow_unverified=true)",
        ckpt,
    )


def _stored_metadata(ckpt: Path) -> dict[str, Any]:
    """{checkpoint key: sharded metadata (global shape, ...)} of everything the folder holds."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return _reading(ckpt, load_sharded_metadata, str(ckpt))


def _summary(exc: BaseException) -> str:
    """One line for an error of megatron/torch checkpoint code. torch's CheckpointException
    (a BaseException) carries each failed rank's exception with a full traceback."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, inner = next(iter(failures.items()))
        inner = getattr(inner, "exc", inner)  # torch wraps it with its traceback
        return f"rank {rank}: {type(inner).__name__}: {inner}".strip()
    return f"{type(exc).__name__}: {exc}".strip()


def _reading(ckpt: Path, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a megatron read; a damaged or foreign folder becomes an error that names it."""
    try:
        return fn(*args, **kwargs)
    except (CheckpointError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise CheckpointDamaged(f"checkpoint '{ckpt}' could not be read ({_summary(exc)})") from exc


def has_optimizer_state(ckpt: Path) -> bool:
    """False for weights-only checkpoints (HF imports, model-only saves)."""
    return any(k.startswith("optimizer.") for k in _stored_metadata(ckpt))


def _saved_world_size(stored: dict[str, Any]) -> int | None:
    for key, obj in stored.items():
        if key.startswith("rng_state"):
            return obj.global_shape[0]
    return None  # metadata without RNG states (model-only checkpoints)


def _load(ckpt: Path, request: dict[str, Any], partial: bool) -> dict[str, Any]:
    """`partial`: the request reads only part of some tensors (extracted layers), which
    megatron-core's access check (every shard read exactly once) would reject."""
    options: dict[str, Any] = {}
    if partial:
        from soft.checkpointing.partial_read import SliceLoadStrategy

        options = {"sharded_strategy": SliceLoadStrategy(), "validate_access_integrity": False}
    loaded = _reading(ckpt, dist_checkpointing.load, request, str(ckpt), **options)
    # (state, missing keys, unexpected keys) comes back only in the strict=RETURN_* modes.
    if isinstance(loaded, tuple):
        raise RuntimeError("dist_checkpointing.load returned key lists: not a strict load")
    return loaded


def _load_model(
    loaded: dict[str, Any], chunks: Sequence[Chunk], keep: Callable[[str], bool] | None, ckpt: Path
) -> None:
    """Strict, except that a partial request (`keep`) leaves out exactly what it did not ask."""
    for i, chunk in enumerate(chunks):
        result = chunk.load_state_dict(loaded[f"model{i}"], strict=keep is None)
        if keep is not None:
            asked = [k for k in result.missing_keys if keep(k)]
            if asked or result.unexpected_keys:
                raise CheckpointError(
                    f"checkpoint '{ckpt}': no values for {asked[:5]}"
                    + (
                        f"; unexpected {result.unexpected_keys[:5]}"
                        if result.unexpected_keys
                        else ""
                    )
                )


def load_weights(
    ckpt: Path,
    chunks: Sequence[MegatronModule],
    extract: bool = False,
    allow_unverified: bool = False,
    keep: Callable[[str], bool] | None = None,
) -> None:
    """Model weights only (fine-tuning starts at step 0 with a fresh optimizer).

    `extract`: the model may have fewer layers than the checkpoint; it gets the first ones
    (soft.mode=extracted). `allow_unverified`: see `verify`. `keep`: only the tensors whose
    state-dict key it accepts (an adapter run's base: everything but the adapters)."""
    verify(ckpt, allow_unverified)
    stored = _stored_metadata(ckpt)
    request, partial = model_request(ckpt, chunks, stored, extract, keep)
    _load_model(_load(ckpt, request, partial), chunks, keep, ckpt)


def resume(
    ckpt: Path,
    chunks: Sequence[MegatronModule],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler | None,
    allow_unverified: bool = False,
    keep: Callable[[str], bool] | None = None,
) -> TrainState:
    """Everything a run needs to continue where the checkpoint stopped: weights, optimizer
    and scheduler state, RNG states (at the same world size) and the data position.
    `allow_unverified`: see `verify`. `keep`: the model tensors the checkpoint holds (an
    adapter checkpoint: what trains; the caller loads the rest from its base first)."""
    verify(ckpt, allow_unverified)
    stored = _stored_metadata(ckpt)
    request, _ = model_request(ckpt, chunks, stored, extract=False, keep=keep)
    distributed = _distributed(optimizer)
    if distributed:
        optimizer_state.materialise_state(optimizer)
    fmt = _stored_optimizer_format(ckpt) if distributed else ""
    request["optimizer"] = optimizer.sharded_state_dict(
        request, is_loading=True, metadata=_optimizer_metadata(optimizer, fmt)
    )
    _, world = rank_world()
    if _saved_world_size(stored) == world:  # RNG states are per rank: only at the same world size
        request["rng_state"] = _rng_sharded_object(None)
    loaded = _load(ckpt, request, partial=False)
    _load_model(loaded, chunks, keep, ckpt)
    with torch.no_grad():  # fp32 distributed-optimizer shards are views of the parameters
        optimizer.load_state_dict(loaded["optimizer"])
    if distributed:
        optimizer_state.repair_adam_steps(optimizer, loaded["optimizer"])
    if scheduler is not None and loaded.get("scheduler") is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if loaded.get("rng_state") is not None:
        _set_rng_state(loaded["rng_state"])
    saved = loaded["train_state"]
    return TrainState(**{k: int(saved.get(k, 0)) for k in asdict(TrainState())})


def _stored_optimizer_format(ckpt: Path) -> str:
    """The distributed-optimizer layout a checkpoint was saved with (its common state)."""
    common = _reading(ckpt, dist_checkpointing.load_common_state_dict, str(ckpt))
    return (common.get("optimizer") or {}).get("param_state_sharding_type", "dp_reshardable")


def rewind_to_validated(save_dir: Path) -> Path | None:
    """After a non-finite validation loss: point `latest` (rank 0) at the newest checkpoint
    whose validation loss was finite, so that a relaunch continues from weights known to be
    good, not from the newest ones. Returns that checkpoint (None: there is none)."""
    good = manifest.newest_validated(save_dir)
    current, _ = directory.read_latest(save_dir)
    if good is not None and rank_world()[0] == 0 and (current is None or current != good):
        directory.write_latest(save_dir, good.name)
    return good
