"""A one-process megatron-core world (gloo) shared by the tests of one pytest process."""

from __future__ import annotations

import functools

from soft.config.root import RootConfig, load_config
from soft.parallel.setup import init_distributed


@functools.cache
def single_rank_world() -> None:
    init_distributed(load_config(None, []).parallel, seed=42)


def tiny_config(*overrides: str) -> RootConfig:
    """The default tiny model with small batches, for fast tests."""
    base = ["train.micro_batch_size=2", "train.global_batch_size=4", "data.seq_length=64"]
    return load_config(None, base + list(overrides))
