"""The checkpoint directory protocol (soft.checkpointing.directory): which checkpoint a run
continues from, what pruning may delete, what a crash leaves. Plain files, no megatron."""

from __future__ import annotations

import pytest

from soft.checkpointing import directory as d


def _ckpt(save_dir, iteration, manifest=True, name=None):
    """A folder that looks like a complete (or, without manifest/config, unfinished) save."""
    path = save_dir / (name or d.iter_name(iteration))
    path.mkdir(parents=True)
    (path / d.MEGATRON_METADATA).write_text("{}")
    if manifest:
        (path / d.MANIFEST).write_text("{}")
    return path


def test_iteration_numbers_not_names_order_the_checkpoints(tmp_path):
    """iter_10000000 (8 digits) sorts before iter_9999999 by name: pruning by name order would
    delete the newest checkpoint."""
    for it in (9_999_998, 9_999_999, 10_000_000):
        _ckpt(tmp_path, it)
    d.write_latest(tmp_path, d.iter_name(10_000_000))
    assert [d.iteration_of(p) for p in d.complete_checkpoints(tmp_path)] == [
        9_999_998,
        9_999_999,
        10_000_000,
    ]
    deleted = d.prune(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["iter_9999998"]
    assert (tmp_path / "iter_10000000").is_dir() and (tmp_path / "iter_9999999").is_dir()


def test_prune_never_deletes_what_latest_names(tmp_path):
    """A job resumed from an older checkpoint (on_corrupt=previous) may have newer complete
    folders beside `latest`; the one it names is kept whatever keep_last says."""
    for it in (2, 4, 6):
        _ckpt(tmp_path, it)
    d.write_latest(tmp_path, d.iter_name(2))
    d.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "iter_0000002",
        "iter_0000006",
    ]


def test_unfinished_saves_are_never_found_or_pruned_and_are_cleaned(tmp_path):
    _ckpt(tmp_path, 2)
    d.write_latest(tmp_path, d.iter_name(2))
    tmp = _ckpt(tmp_path, 4, manifest=False, name="iter_0000004.tmp")
    (tmp_path / "latest.tmp").write_text("iter_0000004")
    (tmp_path / "notes.tmp").write_text("the user's")  # not ours: left alone
    assert d.find_checkpoint(tmp_path) == d.Found(tmp_path / "iter_0000002")
    assert d.prune(tmp_path, keep_last=1) == []
    removed = d.clean_debris(tmp_path)
    assert sorted(p.name for p in removed) == ["iter_0000004.tmp", "latest.tmp"]
    assert not tmp.exists() and (tmp_path / "notes.tmp").exists()
    with pytest.raises(d.CheckpointError, match="unfinished save"):
        d.find_checkpoint(_ckpt(tmp_path, 6, name="iter_0000006.tmp"))


@pytest.mark.parametrize(
    "latest, why",
    [
        (None, "is missing"),
        (b"\x8f\xff\x00garbage\n", "is unreadable"),
        (b"../../etc\n", "does not name an iter_"),
        (b"iter_0000009\n", "names 'iter_0000009', which is missing or incomplete"),
    ],
)
def test_a_missing_or_broken_latest_falls_back_to_the_newest_complete(tmp_path, latest, why):
    _ckpt(tmp_path, 2)
    _ckpt(tmp_path, 4)
    _ckpt(tmp_path, 6, manifest=False)  # renamed without manifest or config: not complete
    if latest is not None:
        (tmp_path / d.LATEST).write_bytes(latest)
    found = d.find_checkpoint(tmp_path)
    assert found.path == tmp_path / "iter_0000004"
    assert why in found.note and "newest complete checkpoint" in found.note


def test_a_broken_latest_with_nothing_complete_is_a_named_error(tmp_path):
    (tmp_path / d.LATEST).write_bytes(b"\xff\xfe")
    with pytest.raises(d.CheckpointError, match="latest' is unreadable"):
        d.find_checkpoint(tmp_path)
    assert d.find_checkpoint(tmp_path / "empty") is None


def test_commit_never_replaces_the_checkpoint_latest_names(tmp_path):
    """Saving an iteration twice (a stop request right after a periodic save, a relaunched
    finished run) used to delete the `latest` checkpoint before renaming its replacement."""
    _ckpt(tmp_path, 4)
    d.write_latest(tmp_path, d.iter_name(4))
    tmp = d.begin_save(tmp_path, 4)
    with pytest.raises(d.CheckpointError, match="refusing to replace"):
        d.commit_save(tmp, keep_last=2)
    assert d.find_checkpoint(tmp_path).path == tmp_path / "iter_0000004"


def test_commit_replaces_a_same_iteration_folder_latest_never_named(tmp_path):
    """A job killed between the rename and the `latest` update leaves iter_6 complete but
    unnamed; the resumed job redoes step 6 and its save replaces that folder."""
    _ckpt(tmp_path, 4)
    stale = _ckpt(tmp_path, 6)
    (stale / "stale-marker").write_text("old")
    d.write_latest(tmp_path, d.iter_name(4))
    tmp = _ckpt(tmp_path, 6, name="iter_0000006.tmp")
    final = d.commit_save(tmp, keep_last=2)
    assert final == tmp_path / "iter_0000006" and not (final / "stale-marker").exists()
    assert d.find_checkpoint(tmp_path).path == final
    assert d.older_complete(final) == [tmp_path / "iter_0000004"]


def test_checkpoints_written_before_manifests_are_complete(tmp_path):
    """Format 1 (no manifest): config.yaml, written last before the rename, marks them."""
    old = _ckpt(tmp_path, 2, manifest=False)
    (old / d.CONFIG).write_text("model: {}\n")
    d.write_latest(tmp_path, old.name)
    assert d.find_checkpoint(tmp_path) == d.Found(old)


def test_a_prune_killed_halfway_leaves_no_checkpoint_behind(tmp_path, monkeypatch):
    """The fault matrix killed a job while pruning: 6 of 8 files of iter_2 were left, with its
    manifest, and counted as a complete checkpoint. Pruning now renames first: what a kill
    leaves is iter_N.deleting, which no reader takes for a checkpoint and the next start
    removes."""
    for it in (2, 4, 6):
        _ckpt(tmp_path, it)
    d.write_latest(tmp_path, d.iter_name(6))

    def killed(name):
        if name == "prune:renamed":
            raise KeyboardInterrupt  # stands in for the SIGKILL: nothing after it runs

    monkeypatch.setattr(d, "failpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        d.prune(tmp_path, keep_last=2)
    assert (tmp_path / "iter_0000002.deleting").is_dir()
    assert [p.name for p in d.complete_checkpoints(tmp_path)] == ["iter_0000004", "iter_0000006"]
    assert [p.name for p in d.clean_debris(tmp_path)] == ["iter_0000002.deleting"]


def test_prune_keeps_the_newest_checkpoint_with_a_finite_validation_loss(tmp_path):
    """A skip-policy run whose weights went bad after iter_4: keep_last=1 must not delete the
    last good one."""
    for it in (2, 4, 6, 8):
        _ckpt(tmp_path, it)
    d.write_latest(tmp_path, d.iter_name(8))
    deleted = d.prune(tmp_path, keep_last=1, keep=tmp_path / d.iter_name(4))
    assert [p.name for p in deleted] == ["iter_0000002", "iter_0000006"]
    assert [p.name for p in d.complete_checkpoints(tmp_path)] == ["iter_0000004", "iter_0000008"]
