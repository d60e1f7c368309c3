"""dist_checkpointing's writer-results queue, served by a process that dies with its rank.

megatron-core 0.16 collects the results of its checkpoint writer processes through a queue
served by a `spawn`-context Manager process (`strategies/filesystem_async.py:51-56`,
`_get_write_results_queue`). Two problems with it:
- starting it re-imports `__main__` (megatron-core, torch): ~19 s per job on a CPU machine;
- when its rank is killed (SIGKILL, OOM killer), the Manager process lives on as an orphan of
  300-470 MB that keeps the job's stdout/stderr pipes open.
`apply()` installs the same queue served by a fork-context Manager (0.3 s; megatron forks its
own writer workers the same way, line 266) whose server process asks the kernel to SIGKILL it
when its parent dies (PR_SET_PDEATHSIG). `restore()` stops it and puts megatron's lazy
default back.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
from multiprocessing.managers import SyncManager

from soft.compat.versions import require_megatron

_MANAGER: SyncManager | None = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Runs first in the Manager's server process."""
    # Not Linux (no prctl): no orphan protection, the queue still works.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)
    # The training process handles SIGINT/SIGTERM (save, then stop); its helper must not die
    # first on a Ctrl-C sent to the whole process group, or the save in progress loses its queue.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def apply() -> None:
    """Idempotent; call before the first dist_checkpointing.save."""
    global _MANAGER
    require_megatron()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _MANAGER is not None:
        return
    manager = SyncManager(ctx=mp.get_context("fork"))
    manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    _MANAGER = manager
    # megatron declares the module global as a bare `= None`, so its inferred type is None.
    filesystem_async._results_queue = manager.Queue()  # type: ignore[assignment]


def restore() -> None:
    """Stop the Manager process (also needed by processes that leave through os._exit)."""
    global _MANAGER
    if _MANAGER is None:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    _MANAGER.shutdown()
    _MANAGER = None
    filesystem_async._results_queue = None


def is_applied() -> bool:
    return _MANAGER is not None
