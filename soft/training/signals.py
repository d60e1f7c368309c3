"""Stop requests (SLURM preemption / time limit): finish the step, save, exit cleanly."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopRequest:
    """SIGUSR1/SIGTERM on any rank set a flag; all ranks agree on it after each step."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank when any rank was signalled."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
