"""ResumableBatchSampler: determinism, DP shards, resume, epoch boundary."""

from __future__ import annotations

import pytest
import torch

from soft.config.errors import ConfigError
from soft.data import ResumableBatchSampler, collate


def flat(microbatches: list[list[int]]) -> list[int]:
    return [i for mb in microbatches for i in mb]


def test_deterministic_and_seeded() -> None:
    a = ResumableBatchSampler(100, 16, seed=3).indices_for_step(0, 0, 1, 4)
    assert a == ResumableBatchSampler(100, 16, seed=3).indices_for_step(0, 0, 1, 4)
    assert a != ResumableBatchSampler(100, 16, seed=4).indices_for_step(0, 0, 1, 4)
    assert [len(mb) for mb in a] == [4, 4, 4, 4]


def test_dp_shards_are_disjoint_and_cover_the_global_batch() -> None:
    sampler = ResumableBatchSampler(50, 24, seed=0)
    for consumed in (0, 24, 48):
        shards = [flat(sampler.indices_for_step(consumed, r, 3, 2)) for r in range(3)]
        assert [len(s) for s in shards] == [8, 8, 8]
        assert sum(shards, []) == sampler.global_indices(consumed, 24)  # rank order, contiguous
        if consumed == 0:  # within one epoch: no sample twice
            assert len(set(sum(shards, []))) == 24


def test_resume_from_consumed_samples() -> None:
    gbs = 8
    run = ResumableBatchSampler(30, gbs, seed=7)
    steps = [run.indices_for_step(step * gbs, 1, 2, 2) for step in range(10)]
    resumed = ResumableBatchSampler(30, gbs, seed=7)  # a fresh process after a restart
    assert [resumed.indices_for_step(step * gbs, 1, 2, 2) for step in range(4, 10)] == steps[4:]


def test_epoch_boundary() -> None:
    n = 10
    sampler = ResumableBatchSampler(n, 4, seed=1)
    order = flat([mb for step in range(5) for mb in sampler.indices_for_step(step * 4, 0, 1, 4)])
    epoch0 = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    epoch1 = torch.randperm(n, generator=torch.Generator().manual_seed(2)).tolist()
    assert order == (epoch0 + epoch1)[:20]
    assert sorted(order[:10]) == sorted(order[10:20]) == list(range(n))  # each epoch is full
    assert sampler.epoch_of(8) == 0 and sampler.epoch_of(12) == 1
    # A global batch larger than the dataset spans epochs.
    big = ResumableBatchSampler(3, 8, seed=0)
    assert len(flat(big.indices_for_step(0, 0, 1, 8))) == 8


def test_batch_size_checks() -> None:
    sampler = ResumableBatchSampler(100, 12, seed=0)
    with pytest.raises(ConfigError, match=r"global_batch_size=12 must be divisible by .* = 8"):
        sampler.indices_for_step(0, 0, 2, 4)
    with pytest.raises(ConfigError, match="dp_rank=2"):
        sampler.indices_for_step(0, 2, 2, 2)
    with pytest.raises(ConfigError, match="empty dataset"):
        ResumableBatchSampler(0, 4, seed=0)


def test_collate_stacks() -> None:
    samples = [
        {"tokens": torch.arange(4), "labels": torch.arange(4), "loss_mask": torch.ones(4)}
        for _ in range(3)
    ]
    batch = collate(samples)
    assert batch["tokens"].shape == (3, 4) and batch["loss_mask"].dtype == torch.float
