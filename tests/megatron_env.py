"""A one-process megatron-core world (gloo) shared by the tests of one pytest process."""

from __future__ import annotations

import functools
import tempfile

from soft.config.root import RootConfig, load_config
from soft.parallel.setup import init_distributed
from soft.training.run_config import load_run_config


@functools.cache
def single_rank_world() -> None:
    init_distributed(load_config(None, []).parallel, seed=42)


def tiny_config(*overrides: str) -> RootConfig:
    """The default tiny model with small batches, for fast tests. Without a
    train.output_dir override the run goes to a fresh temporary folder: the default
    (runs/default, relative to the working directory) is a user's run folder."""
    base = ["train.micro_batch_size=2", "train.global_batch_size=4", "data.seq_length=64"]
    if not any(o.startswith("train.output_dir=") for o in overrides):
        base.append(f"train.output_dir={tempfile.mkdtemp(prefix='soft-test-run-')}")
    return load_run_config(None, base + list(overrides))
