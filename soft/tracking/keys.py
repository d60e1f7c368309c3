"""The names of per-exit metrics, built and parsed in one place (loop, tracker, plots)."""

from __future__ import annotations

import re
from collections.abc import Iterable

# `train/loss/exit_4`, `valid/loss/exit_12`: the split, then the exit depth.
EXIT_LOSS_KEY = re.compile(r"^(?P<split>.+)/loss/exit_(?P<exit>\d+)$")


def exit_metric_key(split: str, exit_layer: int) -> str:
    return f"{split}/loss/exit_{exit_layer}"


def parse_exit_metric_key(key: str) -> tuple[str, int] | None:
    """(split, exit depth) of an exit-loss key; None for any other metric."""
    match = EXIT_LOSS_KEY.match(key)
    return (match["split"], int(match["exit"])) if match else None


def exit_loss_keys(keys: Iterable[str]) -> list[str]:
    """The exit-loss keys among `keys`."""
    return [k for k in keys if EXIT_LOSS_KEY.match(k)]
