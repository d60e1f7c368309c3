"""Named points where the fault-injection tests kill a process, as a crash would, or slow it
down, as a loaded machine would.

`SOFT_FAILPOINT=<name>` in a process's environment makes it SIGKILL itself when it reaches
`failpoint(<name>)`; `<name>#<n>` waits for the n-th time, `<name>@<rank>` (or
`<name>#<n>@<rank>`) acts only on that rank, and `<name>~<seconds>` sleeps that long there
instead of dying. Unset, a failpoint costs one dictionary lookup. The points are listed in
POINTS so that a test naming a point that no longer exists fails instead of silently testing
nothing.
"""

from __future__ import annotations

import os
import signal
import time

POINTS = (
    "save:files_written",  # every rank's checkpoint files are in iter_N.tmp, no manifest yet
    "save:manifest_written",  # iter_N.tmp is complete, not renamed
    "save:renamed",  # iter_N exists, `latest` still names the previous checkpoint
    "save:latest_written",  # `latest` names iter_N, old checkpoints not pruned yet
    "prune:renamed",  # an old checkpoint renamed to iter_N.deleting, not yet removed
    "train:step_done",  # after an optimizer step, before logging and saving
    "tracking:closed",  # the MLflow run's status is set, the loss plot not yet drawn
)
ENV = "SOFT_FAILPOINT"
_reached: dict[str, int] = {}


def failpoint(name: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    if name not in POINTS:
        raise ValueError(f"unknown failpoint {name!r}; known: {POINTS}")
    spec, _, rank = wanted.partition("@")
    spec, _, delay = spec.partition("~")
    point, _, nth = spec.partition("#")
    if point != name or (rank and rank != os.environ.get("RANK", "0")):
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(nth or 1):
        return
    if delay:
        time.sleep(float(delay))
    else:
        os.kill(os.getpid(), signal.SIGKILL)
