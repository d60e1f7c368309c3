"""The job-wide collectives the training code needs outside megatron-core's own: a flag any
rank may raise, a small object gathered or broadcast, a barrier; and which process each rank
is, so that a survivor can tell which peer died.

Each works in a world of one too (no process group: the plain `python launcher.py` job, tools),
where it is the identity. Every function here is collective: every rank of the job calls it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _distributed():
        dist.barrier()


def _flag_device() -> torch.device:
    """NCCL reduces device tensors only; gloo host tensors."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any (one all-reduce)."""
    if not _distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_to_all(value: T) -> list[T]:
    """`value` of every rank, in rank order, on every rank (pickled: small objects only)."""
    if not _distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: T, src: int = 0) -> T:
    """Rank `src`'s `value` on every rank (pickled: small objects only)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------- peers


class PeerLost(RuntimeError):
    """The job failed and a peer rank is gone: nothing collective can complete any more (the
    process groups' teardown included, which can hang), so the rank leaves at once."""


@dataclass(frozen=True)
class Process:
    host: str
    pid: int


def this_process() -> Process:
    return Process(socket.gethostname(), os.getpid())


@dataclass(frozen=True)
class Peers:
    """Which process each rank is (gathered once, at the start of a job), so that a rank left
    behind can say which peer died or hangs instead of guessing. Only processes on this host
    can be looked at; the others are reported as unknown."""

    processes: tuple[Process, ...]
    me: int

    @classmethod
    def gather(cls) -> Peers:
        rank, _ = rank_world()
        return cls(tuple(gather_to_all(this_process())), rank)

    def state(self, rank: int) -> str:
        """'alive', 'gone', 'stopped' (SIGSTOP, a debugger) or 'unknown' (another host)."""
        import psutil

        peer = self.processes[rank]
        if peer.host != socket.gethostname():
            return "unknown"
        try:
            status = psutil.Process(peer.pid).status()
        except psutil.NoSuchProcess:
            return "gone"
        if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return "gone"
        if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
            return "stopped"
        return "alive"

    def others(self) -> dict[int, str]:
        """Every other rank's state."""
        return {r: self.state(r) for r in range(len(self.processes)) if r != self.me}

    def describe(self, rank: int, state: str) -> str:
        peer = self.processes[rank]
        return f"rank {rank} (pid {peer.pid} on {peer.host}) is {state}"

    def first_live_on_host_of(self, rank: int) -> int | None:
        """The lowest rank other than `rank` that runs on `rank`'s host and is alive: the one
        that stands in for `rank` when it died (e.g. rank 0, the owner of the run's status)."""
        host = self.processes[rank].host
        for r, p in enumerate(self.processes):
            if r != rank and p.host == host and self.state(r) == "alive":
                return r
        return None

    def report(self) -> str:
        """One line on the other ranks for a rank that is giving up on them."""
        states = self.others()
        odd = [self.describe(r, s) for r, s in states.items() if s in ("gone", "stopped")]
        if odd:
            return "; ".join(odd)
        elsewhere = sorted(r for r, s in states.items() if s == "unknown")
        if elsewhere:
            return (
                f"every rank on this host is alive; ranks {elsewhere} run on other hosts and "
                "cannot be checked from here"
            )
        return "every other rank is alive (this rank's own work outlasted the grace)"
