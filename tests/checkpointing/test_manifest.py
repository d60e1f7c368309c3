"""Checksums of every checkpoint file (soft.checkpointing.manifest): any damage is named."""

from __future__ import annotations

import hashlib
import os

import pytest

from soft.checkpointing import manifest as m
from soft.checkpointing.directory import MANIFEST, CheckpointError


def _checkpoint(tmp_path):
    ckpt = tmp_path / "iter_0000004"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(os.urandom(100))
    for r in range(3):
        (ckpt / f"__{r}_0.distcp").write_bytes(os.urandom(5000 + r))
    (ckpt / "common.pt").write_bytes(os.urandom(300))
    return ckpt


def _manifest(ckpt, world):
    files = {}
    for rank in range(world):  # as the ranks of a job would, each its share
        files.update(m.hash_share(ckpt, rank, world))
    m.write_manifest(ckpt, files, 4, {"tokenizer": None})
    return m.read_manifest(ckpt)


def test_the_ranks_hash_every_file_once_including_hidden_ones(tmp_path):
    ckpt = _checkpoint(tmp_path)
    shares = [m.share(m.checkpoint_files(ckpt), r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(m.checkpoint_files(ckpt))
    assert not set(shares[0]) & set(shares[1])
    manifest = _manifest(ckpt, world=2)
    assert ".metadata" in manifest["files"] and MANIFEST not in manifest["files"]
    digest = hashlib.sha256((ckpt / "common.pt").read_bytes()).hexdigest()
    assert manifest["files"]["common.pt"] == {"size": 300, "sha256": digest}
    assert all(m.verify_share(ckpt, manifest, r, 3) == [] for r in range(3))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damage_is_named_by_file(tmp_path, damage):
    ckpt = _checkpoint(tmp_path)
    manifest = _manifest(ckpt, world=1)
    shard = ckpt / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[2000:2004] = bytes(b ^ 0xFF for b in data[2000:2004])  # same size, other bytes
        shard.write_bytes(data)
    elif damage == "truncate":
        shard.write_bytes(data[:1000])
    else:
        shard.unlink()
    problems = [p for r in range(2) for p in m.verify_share(ckpt, manifest, r, 2)]
    expected = {
        "flip": "does not match its sha256",
        "truncate": "has 1000 bytes",
        "delete": "missing",
    }
    assert len(problems) == 1 and str(shard) in problems[0] and expected[damage] in problems[0]


def test_an_unreadable_manifest_is_a_named_error(tmp_path):
    ckpt = _checkpoint(tmp_path)
    assert m.read_manifest(ckpt) is None  # written before manifests existed
    (ckpt / MANIFEST).write_bytes(b"\x00\x01not json")
    with pytest.raises(CheckpointError, match="manifest.json' is unreadable"):
        m.read_manifest(ckpt)
    (ckpt / MANIFEST).write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="is not a soft-checkpoint manifest"):
        m.read_manifest(ckpt)


def test_the_newest_checkpoint_with_a_finite_validation_loss_is_found(tmp_path):
    """What pruning spares (soft.checkpointing.directory.prune's `keep`)."""
    for it, loss in ((2, 1.5), (4, 1.2), (6, float("nan")), (8, None)):
        ckpt = tmp_path / f"iter_{it:07d}"
        ckpt.mkdir()
        (ckpt / ".metadata").write_bytes(b"x")
        (ckpt / "metadata.json").write_text("{}")
        m.write_manifest(ckpt, {}, it, {} if loss is None else {"valid_loss": loss})
    assert m.newest_validated(tmp_path).name == "iter_0000004"
    assert m.recorded_valid_loss(tmp_path / "iter_0000008") is None
    fresh = tmp_path / "iter_0000010.tmp"  # the save being committed counts too
    fresh.mkdir()
    m.write_manifest(fresh, {}, 10, {"valid_loss": 0.9})
    assert m.newest_validated(tmp_path, fresh) == fresh
