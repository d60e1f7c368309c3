"""One writer per run folder: an advisory lock held for the whole job.

Two jobs on one train.output_dir would interleave logs, race on `latest`, and overwrite each
other's checkpoints. Rank 0 of a job takes `<output_dir>/.lock` with flock(2) before anything
is written and holds it until the job ends; the file names the holder (host, pid, start time)
so a refused second job can say who has it. The kernel drops a flock when its process dies,
however it dies, so a stale lock (a killed job) is taken over at the next start, and the
caller is told whose it was. On file systems without flock support (some Lustre mounts), a
holder on this host that is still alive is respected and any other is taken over, with a
warning.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from soft.config.errors import InputError

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


class RunFolderBusy(InputError):
    """Another live job holds the run folder."""


@dataclass
class RunLock:
    path: Path
    fd: int
    previous: dict | None  # the dead holder this lock was taken over from, if any

    def release(self) -> None:
        if self.fd < 0:
            return
        _HELD.pop(self.path, None)
        try:
            os.ftruncate(self.fd, 0)  # a lock left empty is not mistaken for a dead holder's
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


_HELD: dict[Path, RunLock] = {}  # this process's locks (a process may set up a run twice)


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:500],
    }


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        holder = json.loads(raw) if raw.strip() else None
    except ValueError:
        return {"unreadable": raw[:80].decode("utf-8", "replace")}
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "an unknown process"
    return (
        f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')} "
        f"({holder.get('command', '')[:120]})"
    )


def _alive_here(holder: dict | None) -> bool:
    if not holder or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire(folder: Path) -> RunLock:
    """Take `folder`'s lock (creating the folder) or raise RunFolderBusy naming the holder."""
    folder = folder.absolute()
    path = folder / LOCK_FILE
    if path in _HELD:
        return _HELD[path]
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_holder(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise RunFolderBusy(
                f"run folder '{folder}' is in use by another job: {_describe(holder)} (lock "
                f"file '{path}'). Wait for it to end, stop it, or set another train.output_dir"
            ) from None
        if _alive_here(holder):  # no flock on this file system: fall back to the pid
            os.close(fd)
            raise RunFolderBusy(
                f"run folder '{folder}' is in use by {_describe(holder)} (lock file '{path}'; "
                "this file system does not support flock, the holder's pid is alive)"
            ) from None
        log.warning("file locking is not supported in %s (%s): taking the run folder", folder, exc)
    previous = _read_holder(fd)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(_holder()).encode())
    os.fsync(fd)
    lock = RunLock(path, fd, previous)
    _HELD[path] = lock
    return lock
