"""Per-exit loss curves as a PNG (logged as an MLflow artifact when a run closes)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from soft.tracking.keys import exit_loss_keys, parse_exit_metric_key

__all__ = ["exit_loss_keys", "plot_exit_losses"]


def plot_exit_losses(history: dict[str, list[tuple[int, float]]], path: str | Path) -> Path | None:
    """Draw one panel per split (train, valid, ...) with one loss curve per exit.

    `history` maps metric keys to (step, value) points; keys that are not `<split>/loss/exit_<n>`
    are ignored. Returns the written path, or None when there is nothing to draw.
    """
    panels: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for key, points in history.items():
        parsed = parse_exit_metric_key(key)
        if parsed and points:  # the split picks the panel, the exit the line
            panels[parsed[0]].append((parsed[1], key))
    if not panels:
        return None

    # The object API (no pyplot): no global figure state and no GUI backend, so this is safe
    # in a training process and in tests that run many trackers.
    from matplotlib.figure import Figure

    splits = sorted(panels)
    fig = Figure(figsize=(6.4 * len(splits), 4.8), layout="constrained")
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    for ax, split in zip(axes, splits, strict=True):
        for exit_layer, key in sorted(panels[split]):
            steps, values = zip(*sorted(history[key]), strict=True)
            ax.plot(
                steps, values, label=f"exit {exit_layer}", marker="." if len(steps) < 30 else None
            )
        ax.set_title(f"{split} loss per exit")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
