"""data.packing: first-fit-decreasing packs, their layout, the cache, the sampler over packs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from soft.data import DataConfig, ResumableBatchSampler, build_datasets
from soft.data.dataset import SFTDataset, pack_first_fit_decreasing


def _packs_as_lists(lengths: list[int], capacity: int) -> list[list[int]]:
    packs = pack_first_fit_decreasing(np.asarray(lengths), capacity)
    return [packs.pack(p).tolist() for p in range(len(packs))]


def test_first_fit_decreasing_by_hand() -> None:
    # Decreasing: 7 (i1), 5 (i3), 4 (i0), 3 (i2), 3 (i5), 2 (i4), ties by index.
    # 7 -> P0 (3 left); 5 -> P1 (5 left); 4 -> P1 (1 left); 3 (i2) -> P0 (0 left);
    # 3 (i5) -> P2 (7 left); 2 -> P2 (5 left).
    assert _packs_as_lists([4, 7, 3, 5, 2, 3], 10) == [[1, 2], [0, 3], [4, 5]]
    assert _packs_as_lists([], 10) == []
    with pytest.raises(ValueError, match="lengths"):
        pack_first_fit_decreasing(np.asarray([11]), 10)


def test_packing_is_a_deterministic_partition_within_capacity() -> None:
    lengths = np.random.default_rng(0).integers(1, 200, size=3000)
    packs = pack_first_fit_decreasing(lengths, 256)
    again = pack_first_fit_decreasing(lengths.copy(), 256)
    assert np.array_equal(packs.members, again.members)
    assert np.array_equal(packs.offsets, again.offsets)
    assert sorted(packs.members.tolist()) == list(range(3000))  # each sample once, none split
    sums = [int(lengths[packs.pack(p)].sum()) for p in range(len(packs))]
    assert max(sums) <= 256
    # FFD is within 11/9 OPT + 1 of the lower bound; on this input it packs far tighter.
    assert len(packs) <= int(np.ceil(lengths.sum() / 256)) + 3


def test_first_fit_matches_a_plain_scan() -> None:
    """The max-tree search gives the packs of the textbook scan (first open pack with room)."""
    lengths = np.random.default_rng(1).integers(1, 100, size=500)
    order = sorted(range(500), key=lambda i: (-lengths[i], i))
    rooms: list[int] = []
    owner = [0] * 500
    for i in order:
        p = next((j for j, room in enumerate(rooms) if room >= lengths[i]), len(rooms))
        if p == len(rooms):
            rooms.append(100)
        rooms[p] -= int(lengths[i])
        owner[i] = p
    expected = [[i for i in range(500) if owner[i] == p] for p in range(len(rooms))]
    assert _packs_as_lists(lengths.tolist(), 100) == expected


def _pairs(n: int) -> list[tuple[str, str]]:
    return [(f"Repeat the word {'ab ' * (i % 7)}", "ok " * (1 + i % 5)) for i in range(n)]


def test_packed_layout_keeps_each_example_intact() -> None:
    from soft.data.builtin import BUILTIN_TOKENIZER_PATH
    from soft.data.tokenizer import load_tokenizer

    tok = load_tokenizer(BUILTIN_TOKENIZER_PATH)
    plain = SFTDataset.from_pairs(_pairs(30), tok, 48)
    packed = SFTDataset.from_examples(plain_examples(30), tok, 48, packing=True)
    assert len(packed) < len(plain)
    assert packed.stats.num_samples == plain.stats.num_samples == 30
    batch = packed.batch(range(len(packed)))
    seen = 0
    for row, pack in enumerate(range(len(packed))):
        members = packed.packs.pack(pack)
        doc = batch["document"][row]
        for d, example in enumerate(members.tolist()):
            where = (doc == d).nonzero().flatten()
            one = plain[example]
            n = len(where)
            # Contiguous, positions restart at 0, and the example's own tokens/labels/mask.
            assert where.tolist() == list(range(int(where[0]), int(where[0]) + n))
            assert batch["position_ids"][row, where].tolist() == list(range(n))
            assert batch["tokens"][row, where].equal(one["tokens"][:n])
            assert batch["labels"][row, where].equal(one["labels"][:n])
            assert batch["loss_mask"][row, where].equal(one["loss_mask"][:n])
            assert one["loss_mask"][n:].sum() == 0  # nothing of the example left out
            seen += 1
        pad = doc == -1
        assert (
            batch["loss_mask"][row, pad].sum() == 0 and batch["position_ids"][row, pad].sum() == 0
        )
    assert seen == 30
    # Loss tokens are the same set: the boundary never adds or loses a target.
    assert batch["loss_mask"].sum() == plain.batch(range(30))["loss_mask"].sum()
    assert 0 < plain.fill_ratio() < packed.fill_ratio() <= 1
    assert "packed into" in packed.describe() and "fill" in packed.describe()
    assert "packed" not in plain.describe()


def plain_examples(n: int):
    from soft.data.prompts import PlainExample

    return [PlainExample(p, r) for p, r in _pairs(n)]


def _write_records(path: Path, n: int) -> None:
    rows = [
        {"instruction": f"Echo {'x ' * (i % 11)}{i}.", "input": "", "output": f"{i} " * (i % 4 + 1)}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_packs_are_cached_and_resume_exact(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    _write_records(data, 120)
    cfg = DataConfig(
        train_path=str(data), valid_fraction=0.2, seq_length=160, packing=True,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    train, valid, _ = build_datasets(cfg, seed=3)
    assert valid is not None and not train.packs_cached and not valid.packs_cached
    assert len(list((tmp_path / "cache").glob("*/packs-*.npz"))) == 2  # train and valid
    again, valid_again, _ = build_datasets(cfg, seed=3)
    assert again.packs_cached and valid_again.packs_cached
    assert "from the cache" in again.describe()
    assert np.array_equal(again.packs.members, train.packs.members)
    # Another hold-out is another selection: other packs, not a stale cache hit.
    other, _, _ = build_datasets(cfg, seed=4)
    assert not other.packs_cached
    # Unpacked data from the same rows is unchanged by the packs beside them.
    unpacked, _, _ = build_datasets(dataclasses.replace(cfg, packing=False), seed=3)
    assert unpacked.packs is None and len(unpacked) == train.stats.num_samples > len(train)
    assert set(unpacked.batch([0])) == {"tokens", "labels", "loss_mask"}
    # The sampler draws packs: a resumed run's step k is the uninterrupted run's step k.
    sampler = ResumableBatchSampler(len(train), 8, seed=0)
    resumed = ResumableBatchSampler(len(again), 8, seed=0)
    for step in (0, 3, 7):
        (mb,) = sampler.indices_for_step(step * 8, 0, 1, 8)
        (mb2,) = resumed.indices_for_step(step * 8, 0, 1, 8)
        assert mb == mb2
        assert all(train.batch(mb)[k].equal(v) for k, v in again.batch(mb2).items())


def test_overlong_examples_follow_the_policy_and_are_never_split(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": "Say it.", "input": "", "output": "word " * n} for n in (2, 200, 3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(train_path=str(data), valid_fraction=0.0, seq_length=128, packing=True)
    cut, _, _ = build_datasets(DataConfig(**common, overlong="truncate"), seed=0)
    dropped, _, _ = build_datasets(DataConfig(**common, overlong="drop"), seed=0)
    assert cut.stats.num_truncated == 1 and dropped.stats.num_dropped == 1
    assert dropped.stats.num_samples == 2 and len(dropped) == 1 and len(cut) == 2
    # The truncated example fills a pack of its own: whole, alone, at position 0.
    full = [p for p in range(len(cut)) if len(cut.packs.pack(p)) == 1]
    batch = cut.batch(full)
    assert (batch["document"] == 0).all(dim=1).any()
    assert sorted(cut.packs.members.tolist()) == [0, 1, 2]


class FakeCollective:
    """torch.distributed as one rank of a 2-rank job sees it, for `cached_packs`: rank 0's
    broadcast box is recorded, and replayed to rank 1 (which waits for rank 0 in a real job)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torch.distributed as dist

        self.rank = 0
        self.box: list | None = None
        self.broadcasts = 0
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
        monkeypatch.setattr(dist, "get_rank", lambda *a: self.rank)
        monkeypatch.setattr(dist, "broadcast_object_list", self._broadcast)

    def _broadcast(self, box: list, src: int = 0, **_) -> None:
        assert src == 0
        self.broadcasts += 1
        if self.rank == 0:
            self.box = list(box)
        else:
            box[:] = self.box


def test_rank_zero_packs_and_the_other_ranks_read_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from soft.data import dataset

    lengths = np.array([5, 9, 3, 7, 2, 8, 4], dtype=np.int64)
    entry = tmp_path / "entry"
    entry.mkdir()
    world = FakeCollective(monkeypatch)
    packed = dataset.pack_first_fit_decreasing
    calls: list[int] = []

    def counting(lens, capacity):
        calls.append(world.rank)
        return packed(lens, capacity)

    monkeypatch.setattr(dataset, "pack_first_fit_decreasing", counting)
    first, hit = dataset.cached_packs(lengths, 12, entry)  # rank 0: packs and writes
    assert not hit and calls == [0] and len(list(entry.glob("packs-*.npz"))) == 1
    world.rank = 1  # rank 1: waits in the broadcast, then reads rank 0's file
    second, hit = dataset.cached_packs(lengths, 12, entry)
    assert calls == [0] and not hit  # rank 0 packed it now, rank 1 packed nothing
    assert np.array_equal(second.members, first.members)
    assert np.array_equal(second.offsets, first.offsets)
    # A later job: rank 0 finds the file, rank 1 reads it, nobody packs.
    world.rank = 0
    assert dataset.cached_packs(lengths, 12, entry)[1]
    world.rank = 1
    assert dataset.cached_packs(lengths, 12, entry)[1] and calls == [0]
    assert world.broadcasts == 4  # one wait per rank per call: every rank is in step
    # Rank 0's file not visible here (node-local cache): this rank packs for itself, says so.
    for f in entry.glob("packs-*.npz"):
        f.unlink()
    world.box = ["built", None]
    with caplog.at_level("WARNING", logger="soft.data.dataset"):
        own, hit = dataset.cached_packs(lengths, 12, entry)
    assert calls == [0, 1] and not hit and np.array_equal(own.members, first.members)
    assert "not visible here" in caplog.text
