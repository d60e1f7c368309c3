"""Setting up a training run: take the run folder, build data and model, and decide where the
run starts (its own checkpoint, another run's, imported weights, or step 0).

Nothing is written into the run folder until all of that has been validated: a bad config,
data file or checkpoint leaves the folder as it was (or absent, when the job created it).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from soft.checkpointing import compatibility, directory
from soft.checkpointing.checkpoint import (
    CheckpointError,
    TrainState,
    has_optimizer_state,
    load_weights,
    resume,
)
from soft.checkpointing.directory import CheckpointDamaged
from soft.config.core import flatten, save_yaml, to_dict
from soft.config.errors import ConfigError
from soft.config.root import RootConfig
from soft.data import SFTDataset, build_datasets
from soft.models.gpt import check_runtime_support, padded_vocab_size
from soft.parallel import collectives
from soft.parallel.collectives import Peers
from soft.parallel.setup import Topology, init_distributed
from soft.peft.base import base_reference, resolve_base, stored_reference, trained_keys
from soft.peft.lora import is_adapter_key
from soft.runs import RunDir, RunFolderBusy, RunLock, acquire
from soft.runs.lock import LOCK_FILE
from soft.training.model import SoftModel, build_soft_model
from soft.training.optim import apply_optimizer_hyperparameters, build_optimizer, build_scheduler

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a training run holds; built once by `setup`."""

    cfg: RootConfig
    topo: Topology
    model: SoftModel
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    train_data: SFTDataset
    valid_data: SFTDataset | None
    tokenizer_identity: dict  # recorded in every checkpoint, compared on resume and fine-tune
    run_dir: RunDir
    lock: RunLock | None  # held by rank 0
    state: TrainState
    peers: Peers  # which process each rank is: a survivor can say which peer died
    saved_iteration: int | None = None  # the iteration whose checkpoint exists (never re-saved)
    load_s: float = 0.0  # how long loading the starting checkpoint took
    # The last validation (iteration, loss): a checkpoint of that iteration records it, and
    # pruning keeps the newest checkpoint whose validation loss was finite.
    validated: tuple[int, float] | None = None
    # peft runs: the base checkpoint the adapters adapt (path and checksum), recorded in
    # every checkpoint (soft.peft.base).
    peft_base: dict[str, str] | None = None

    def checkpoint_keep(self) -> Callable[[str], bool] | None:
        """Which model tensors this run's checkpoints hold: what trains, for adapter runs."""
        if self.peft_base is None:
            return None
        return trained_keys(self.model.unwrapped).__contains__

    @property
    def output_dir(self) -> Path:
        return self.run_dir.root

    @property
    def save_dir(self) -> Path:
        return self.run_dir.save_dir


def setup(cfg: RootConfig) -> Run:
    # FP8/TE where they cannot run: fail first. data.packing works on either spec (THD
    # streams on Transformer Engine, a block-diagonal mask on the local spec: see
    # soft.training.model.packed_attention).
    check_runtime_support(cfg.model)
    topo = init_distributed(cfg.parallel, cfg.train.seed)
    run_dir = RunDir.of(cfg.train.output_dir, cfg.checkpoint.save_dir)
    created = not run_dir.root.exists()
    lock = _take_run_folder(run_dir, topo, cfg)
    try:
        return _build(cfg, topo, run_dir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
            if created and [p.name for p in run_dir.root.iterdir()] == [LOCK_FILE]:
                shutil.rmtree(run_dir.root, ignore_errors=True)  # leave no trace of a failed start
        raise


def _take_run_folder(run_dir: RunDir, topo: Topology, cfg: RootConfig) -> RunLock | None:
    """Collective: rank 0 takes the folder's lock; every rank fails alike when it is busy."""
    lock, refusal = None, None
    if topo.is_logging_rank:
        try:
            lock = acquire(run_dir.root)
        except RunFolderBusy as exc:
            refusal = str(exc)
    refusal = collectives.broadcast_object(refusal)
    if refusal is not None:
        raise RunFolderBusy(refusal)
    if lock is not None:
        if lock.previous:
            log.warning(
                "run folder %s was held by a job that is gone (%s): taking it over",
                run_dir.root,
                lock.previous,
            )
            from soft.tracking import mark_run_ended

            mark_run_ended(
                cfg.tracking, run_dir.root, "KILLED", "killed", "its job died without closing it"
            )
        for debris in directory.clean_debris(run_dir.save_dir):
            log.warning("removed %s, left by an interrupted save", debris)
    return lock


def _build(cfg: RootConfig, topo: Topology, run_dir: RunDir, lock: RunLock | None) -> Run:
    train_data, valid_data, tokenizer = build_datasets(cfg.data, cfg.train.seed)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        hint = (
            f" (model.vocab_size comes from the checkpoint in {cfg.checkpoint.load_dir}: set "
            "data.tokenizer_path to that checkpoint's tokenizer)"
            if cfg.checkpoint.load_dir
            else ""
        )
        raise ConfigError(
            f"config key 'model.vocab_size' ({vocab}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}, {cfg.data.tokenizer_path or 'built-in tokenizer'}){hint}"
        )
    tp = cfg.parallel.tensor_model_parallel_size
    model = build_soft_model(
        cfg.model,
        cfg.parallel,
        cfg.soft,
        cfg.exit_plan(),
        padded_vocab_size(vocab, cfg.model, tp),
        cfg.train.seed,
        packed=cfg.data.packing,
        peft=cfg.peft,
    )
    optimizer = build_optimizer(model, cfg.train, cfg.model, cfg.parallel)
    scheduler = build_scheduler(optimizer, cfg.train)
    run = Run(
        cfg=cfg,
        topo=topo,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_data=train_data,
        valid_data=valid_data,
        tokenizer_identity=tokenizer.identity(),
        run_dir=run_dir,
        lock=lock,
        state=TrainState(),
        peers=Peers.gather(),
    )
    started = time.perf_counter()
    run.state = starting_state(run)
    run.load_s = time.perf_counter() - started
    if topo.is_logging_rank:  # everything is validated: now the folder may change
        save_yaml(cfg, run_dir.config_path)
        run_dir.truncate_logs(run.state.iteration)
        run_dir.clear_status()
        log.info(train_data.describe())
        if valid_data is not None:
            log.info(valid_data.describe())
    return run


# ----------------------------------------------------------------------------- where the run starts


def starting_state(run: Run) -> TrainState:
    """Where the run starts: its own newest checkpoint (a resumed or requeued job), else
    checkpoint.load_dir (another run's checkpoint, or weights to fine-tune), else step 0."""
    ck = run.cfg.checkpoint
    own = directory.find_checkpoint(run.save_dir)
    if own is not None and ck.start_over and not _is_own_run(own.path, run):
        _start_over(run)
        own = None
    if own is not None:
        if not ck.auto_resume:
            raise ConfigError(
                f"'{run.save_dir}' holds checkpoints of an earlier run (newest: {own.path.name}) "
                "and checkpoint.auto_resume is false: training from step 1 would overwrite them. "
                "Set checkpoint.start_over=true to move them aside (to "
                f"'{run.output_dir / 'previous'}'), or use another train.output_dir"
            )
        return _resume_own(run, own)
    if ck.load_dir is None:
        return TrainState()
    found = directory.find_checkpoint(ck.load_dir)
    if found is None:
        raise ConfigError(
            f"checkpoint.load_dir '{ck.load_dir}' is not a checkpoint: expected an iter_* "
            f"folder or a folder with a '{directory.LATEST}' file or complete iter_* folders"
        )
    if found.note:
        log.warning("checkpoint.load_dir: %s", found.note)
    requested = flatten(to_dict(run.cfg))
    if ck.finetune:
        extract = run.model.plan.extracts_layers
        log.info("fine-tuning from the weights in %s", found.path)
        compatibility.check_weights_load(found.path, requested, run.tokenizer_identity, extract)
        keep = _base_keys(run, found.path)
        load_weights(
            found.path,
            run.model.unwrapped,
            extract=extract,
            allow_unverified=ck.allow_unverified,
            keep=keep,
        )
        # Optimizer main params (fp32 copies for bf16) must pick up the loaded weights.
        if hasattr(run.optimizer, "reload_model_params"):
            run.optimizer.reload_model_params()
        return TrainState()
    if not has_optimizer_state(found.path):
        raise ConfigError(
            f"checkpoint.load_dir '{ck.load_dir}' holds model weights only (e.g. a converted HF "
            "model): set checkpoint.finetune=true to start training from them"
        )
    changes = compatibility.check_resume(
        found.path, requested, run.tokenizer_identity, ignore=compatibility.STARTING_POINT
    )
    return _resumed(run, found.path, changes)


def _base_keys(run: Run, base: Path) -> Callable[[str], bool] | None:
    """peft: the base's tensors are everything but the adapters; the run records the base
    (an adapter checkpoint as the base of another adapter run is refused: merge it first)."""
    if not run.cfg.peft.enabled:
        return None
    if stored_reference(base) is not None:
        raise ConfigError(
            f"checkpoint.load_dir '{base}' holds adapters, not a base model: fine-tune from its "
            "base, or export the merged model (soft-export) and import that"
        )
    run.peft_base = base_reference(base)
    return lambda key: not is_adapter_key(key)


def _load_adapter_base(run: Run, ckpt: Path) -> Callable[[str], bool] | None:
    """Resuming an adapter checkpoint: the base weights first, from the base it names (checked
    by checksum); returns what the checkpoint itself holds."""
    reference = stored_reference(ckpt)
    if reference is None:
        return None
    base = resolve_base(ckpt, reference)
    trained = trained_keys(run.model.unwrapped)
    log.info("loading the base weights of %s from %s", ckpt, base)
    load_weights(
        base,
        run.model.unwrapped,
        allow_unverified=run.cfg.checkpoint.allow_unverified,
        keep=lambda key: key not in trained,
    )
    run.peft_base = reference
    return trained.__contains__


def _is_own_run(ckpt: Path, run: Run) -> bool:
    """A job requeued with checkpoint.start_over=true resumes what its first attempt saved."""
    saved = compatibility.saved_config(ckpt) or {}
    requested = flatten(to_dict(run.cfg))
    keys = (*compatibility.ARCHITECTURE, *compatibility.RUN, *compatibility.STARTING_POINT)
    return bool(saved.get("checkpoint.start_over")) and not compatibility.differences(
        saved, requested, keys
    )


def _start_over(run: Run) -> None:
    if run.topo.is_logging_rank:
        moved = run.run_dir.move_aside()
        log.warning("checkpoint.start_over: moved the earlier run's files to %s", moved)
    collectives.barrier()


def _resume_own(run: Run, found: directory.Found) -> TrainState:
    """The run's own checkpoint; with checkpoint.on_corrupt=previous, a damaged one is moved
    aside and the newest older complete checkpoint is used."""
    if found.note:
        log.warning("resuming: %s", found.note)
    candidates = [found.path]
    if run.cfg.checkpoint.on_corrupt == "previous":
        candidates += directory.older_complete(found.path)
    requested = flatten(to_dict(run.cfg))
    for i, ckpt in enumerate(candidates):
        changes = compatibility.check_resume(ckpt, requested, run.tokenizer_identity)
        try:
            state = _resumed(run, ckpt, changes)
        except CheckpointDamaged as exc:
            if i + 1 == len(candidates):
                raise
            log.error("%s; falling back to %s", exc, candidates[i + 1].name)
            continue
        if i > 0 and run.topo.is_logging_rank:
            for bad in candidates[:i]:
                aside = bad.with_name(bad.name + ".damaged")
                bad.rename(aside)
                log.warning("moved the damaged checkpoint to %s", aside)
            directory.write_latest(run.save_dir, ckpt.name)
        return state
    raise AssertionError("unreachable")


def _resumed(run: Run, ckpt: Path, changes: list[compatibility.Change]) -> TrainState:
    log.info("resuming from %s", ckpt)
    keep = _load_adapter_base(run, ckpt)
    state = resume(
        ckpt,
        run.model.unwrapped,
        run.optimizer,
        run.scheduler,
        allow_unverified=run.cfg.checkpoint.allow_unverified,
        keep=keep,
    )
    for change in changes:
        log.warning("resuming with a changed setting (applied): %s", change)
    apply_optimizer_hyperparameters(run.optimizer, run.cfg.train, run.scheduler)
    if state.iteration > run.cfg.train.train_iters:
        raise CheckpointError(
            f"checkpoint '{ckpt}' is at step {state.iteration}, beyond train.train_iters="
            f"{run.cfg.train.train_iters}: raise train.train_iters to continue this run, or use "
            "another train.output_dir for a new one"
        )
    if ckpt.parent.resolve() == run.save_dir.resolve():
        run.saved_iteration = state.iteration  # this folder has it: never saved again
    return state
