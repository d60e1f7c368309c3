"""Deterministic, resumable batch order for data-parallel training.

The sample order is the concatenation of per-epoch permutations (epoch e shuffled with
seed + e). A global batch is the contiguous slice [consumed, consumed + global_batch_size)
of that stream, so the order depends only on (num_samples, global_batch_size, seed) and the
number of samples consumed: resuming needs nothing but the saved `consumed_samples`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from soft.config.errors import ConfigError


def check_batch_sizes(global_batch_size: int, micro_batch_size: int, dp_size: int) -> None:
    """Each data-parallel rank must get a whole number of microbatches per global batch."""
    if min(global_batch_size, micro_batch_size, dp_size) < 1:
        raise ConfigError(
            f"batch sizes must be >= 1: global_batch_size={global_batch_size}, "
            f"micro_batch_size={micro_batch_size}, data-parallel size={dp_size}"
        )
    if global_batch_size % (micro_batch_size * dp_size):
        raise ConfigError(
            f"global_batch_size={global_batch_size} must be divisible by micro_batch_size "
            f"({micro_batch_size}) x data-parallel size ({dp_size}) = "
            f"{micro_batch_size * dp_size}"
        )


class ResumableBatchSampler:
    """Microbatch indices per data-parallel rank, stateless given `consumed_samples`."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int):
        if num_samples < 1:
            raise ConfigError(
                f"cannot sample batches from an empty dataset (num_samples={num_samples})"
            )
        if global_batch_size < 1:
            raise ConfigError(f"global_batch_size must be >= 1, got {global_batch_size}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        """The sample order of `epoch` (the last two are cached: a batch spans at most a
        few epochs, and consecutive steps reuse the current one)."""
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(self.num_samples, generator=gen).tolist()
            while len(self._perms) > 2:
                del self._perms[min(self._perms)]
        return self._perms[epoch]

    def epoch_of(self, consumed_samples: int) -> int:
        return consumed_samples // self.num_samples

    def global_indices(self, start: int, count: int) -> list[int]:
        """Samples [start, start + count) of the concatenated epoch permutations."""
        out: list[int] = []
        pos = start
        while len(out) < count:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(count - len(out), self.num_samples - offset)
            out.extend(self.permutation(epoch)[offset : offset + take])
            pos += take
        return out

    def indices_for_step(
        self, consumed_samples: int, dp_rank: int, dp_size: int, micro_batch_size: int
    ) -> list[list[int]]:
        """This rank's microbatches of the global batch that starts at `consumed_samples`.

        Rank r gets the r-th contiguous 1/dp_size share of the global batch, split into
        microbatches of `micro_batch_size`.
        """
        check_batch_sizes(self.global_batch_size, micro_batch_size, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} is outside [0, {dp_size})")
        if consumed_samples < 0:
            raise ConfigError(f"consumed_samples must be >= 0, got {consumed_samples}")
        share = self.global_batch_size // dp_size
        mine = self.global_indices(consumed_samples + dp_rank * share, share)
        return [mine[i : i + micro_batch_size] for i in range(0, share, micro_batch_size)]


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of samples (dicts of equal-shaped tensors) into one batch."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
