"""The checkpoint directory protocol: how a save becomes visible and which checkpoint a run
continues from. Plain files and renames; no megatron import.

    <save_dir>/iter_0000040/       a complete checkpoint: megatron-core's files, config.yaml and
                                   manifest.json (written last: size and sha256 of every file)
    <save_dir>/iter_0000060.tmp/   a save in progress, or one a crash interrupted: never read,
                                   removed by the next job that takes the run folder
    <save_dir>/latest              "iter_0000040": the checkpoint a resumed run continues from

The rules, each checked by tests/checkpointing (with processes killed at every step of a save):
1. A save writes into iter_N.tmp; manifest.json is written once every file is complete; then
   iter_N.tmp is renamed to iter_N, and only then is `latest` replaced (write + rename + fsync).
2. The checkpoint `latest` names is never deleted or overwritten. Pruning keeps the newest
   `keep_last` complete checkpoints by iteration number (never by name order), and the newest
   one whose validation loss was finite; it renames a checkpoint to iter_N.deleting before
   removing it, so a half-deleted folder never passes for a checkpoint.
3. `latest` missing, unreadable or naming something incomplete: the newest complete iter_*
   checkpoint is used and the caller is told why.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from soft.config.errors import InputError
from soft.failpoints import failpoint

LATEST = "latest"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
MEGATRON_METADATA = "metadata.json"  # megatron-core's own marker of a dist checkpoint
TMP_SUFFIX = ".tmp"
DELETING_SUFFIX = ".deleting"  # a pruned checkpoint on its way out
_ITER_RE = re.compile(r"iter_(\d+)")


class CheckpointError(InputError):
    """A checkpoint that cannot be used as asked; the message names the file or folder."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files do not match its manifest or cannot be read."""


class CheckpointSaveFailed(RuntimeError):
    """A save could not be completed (e.g. a full disk); the previous checkpoint is intact."""


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(path: str | Path) -> int | None:
    """N for a folder named iter_N (any number of digits); None for anything else."""
    match = _ITER_RE.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def iteration_number(path: str | Path) -> int:
    """N for iter_N or its save folder iter_N.tmp: for paths known to be checkpoints, which
    sort by it (anything else is a caller's bug)."""
    name = Path(path).name.removesuffix(TMP_SUFFIX)
    it = iteration_of(name)
    if it is None:
        raise ValueError(f"'{path}' is not an iter_N checkpoint folder")
    return it


def is_checkpoint(path: Path) -> bool:
    """A folder holding one checkpoint (complete or not): megatron-core's metadata is there."""
    return (path / MEGATRON_METADATA).is_file()


def is_complete(path: Path) -> bool:
    """Complete = renamed from its .tmp folder after the save finished. Checkpoints written
    before manifests existed (format 1) are recognised by the config.yaml written last."""
    if path.name.endswith(TMP_SUFFIX) or not is_checkpoint(path):
        return False
    return (path / MANIFEST).is_file() or (path / CONFIG).is_file()


def complete_checkpoints(save_dir: Path) -> list[Path]:
    """Complete iter_* checkpoints in `save_dir`, oldest first (by iteration number)."""
    if not save_dir.is_dir():
        return []
    found = [(iteration_of(p), p) for p in save_dir.iterdir() if p.is_dir()]
    return [p for it, p in sorted((it, p) for it, p in found if it is not None) if is_complete(p)]


@dataclass(frozen=True)
class Found:
    """The checkpoint to continue from; `note` says why it is not the one `latest` names."""

    path: Path
    note: str | None = None


def read_latest(save_dir: Path) -> tuple[Path | None, str | None]:
    """(checkpoint `latest` names, None) or (None, what is wrong with it); (None, None) when
    there is no `latest` file at all."""
    pointer = save_dir / LATEST
    if not pointer.exists():
        return None, None
    try:
        name = pointer.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"'{pointer}' is unreadable ({type(exc).__name__})"
    if iteration_of(name) is None:
        return None, f"'{pointer}' does not name an iter_* checkpoint (it holds {name[:40]!r})"
    target = save_dir / name
    if not is_complete(target):
        return None, f"'{pointer}' names '{name}', which is missing or incomplete"
    return target, None


def find_checkpoint(path: str | Path) -> Found | None:
    """The checkpoint at `path`: an iter_* folder itself, or a save dir's `latest`, or (when
    `latest` is missing or broken) the newest complete checkpoint there. None: no checkpoint."""
    path = Path(path)
    if is_checkpoint(path):
        if path.name.endswith(TMP_SUFFIX):
            raise CheckpointError(f"'{path}' is an unfinished save (.tmp): it cannot be loaded")
        return Found(path)
    target, problem = read_latest(path)
    if target is not None:
        return Found(target)
    candidates = complete_checkpoints(path)
    if candidates:
        why = problem or f"'{path / LATEST}' is missing"
        return Found(candidates[-1], f"{why}; using the newest complete checkpoint instead")
    if problem is not None:
        raise CheckpointError(f"{problem}, and '{path}' holds no complete iter_* checkpoint")
    return None


def older_complete(found: Path) -> list[Path]:
    """Complete checkpoints beside `found` that are older than it, newest first."""
    it = iteration_of(found)
    if it is None:
        return []
    return [p for p in reversed(complete_checkpoints(found.parent)) if iteration_number(p) < it]


def begin_save(save_dir: Path, iteration: int) -> Path:
    """Create the empty .tmp folder a save of `iteration` writes into (rank 0 only)."""
    tmp = save_dir / f"{iter_name(iteration)}{TMP_SUFFIX}"
    if tmp.exists():
        shutil.rmtree(tmp)  # an earlier attempt at this iteration died mid-save
    tmp.mkdir(parents=True)
    return tmp


def commit_save(tmp: Path, keep_last: int, keep: Path | None = None) -> Path:
    """Make a finished save visible (rank 0 only): rename, point `latest` at it, prune (never
    `keep`: see prune)."""
    save_dir = tmp.parent
    final = save_dir / tmp.name.removesuffix(TMP_SUFFIX)
    if final.exists():
        current, _ = read_latest(save_dir)
        if current is not None and current.name == final.name:
            raise CheckpointError(
                f"refusing to replace '{final}': it is the checkpoint '{save_dir / LATEST}' "
                "names (a run saves each iteration once)"
            )
        # A checkpoint of this iteration that `latest` never named: a job died between the
        # rename and the pointer update, and this job redid those steps. Safe to replace.
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(save_dir)
    failpoint("save:renamed")
    write_latest(save_dir, final.name)
    failpoint("save:latest_written")
    prune(save_dir, keep_last, keep)
    return final


def write_latest(save_dir: Path, name: str) -> None:
    tmp = save_dir / f"{LATEST}{TMP_SUFFIX}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(save_dir / LATEST)
    _fsync_dir(save_dir)


def prune(save_dir: Path, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (by iteration number), never
    the one `latest` names nor `keep` (the newest whose validation loss was finite). Returns
    what was deleted.

    Each is first renamed to iter_N.deleting, then removed: a kill halfway through leaves a
    folder no reader takes for a checkpoint (clean_debris removes it), never an iter_N that
    lost some of its files."""
    if keep_last <= 0:
        return []
    protected, _ = read_latest(save_dir)
    spared = {iteration_of(p.name.removesuffix(TMP_SUFFIX)) for p in (protected, keep) if p}
    complete = complete_checkpoints(save_dir)
    doomed = [p for p in complete[:-keep_last] if iteration_of(p) not in spared]
    for old in doomed:
        going = old.with_name(old.name + DELETING_SUFFIX)
        old.rename(going)
        failpoint("prune:renamed")
        shutil.rmtree(going, ignore_errors=True)
    return doomed


def _is_debris(p: Path) -> bool:
    for suffix in (TMP_SUFFIX, DELETING_SUFFIX):
        stem = p.name.removesuffix(suffix)
        if stem != p.name and (iteration_of(stem) is not None or stem == LATEST):
            return True
    return False


def clean_debris(save_dir: Path) -> list[Path]:
    """Remove what interrupted saves and prunes left (iter_*.tmp and iter_*.deleting folders,
    latest.tmp). Only the job that holds the run folder's lock may call this: another job's
    save in progress looks the same."""
    if not save_dir.is_dir():
        return []
    removed = []
    for p in save_dir.iterdir():
        if _is_debris(p):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (a power loss after it must not bring the old name back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
