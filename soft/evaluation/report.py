"""Presenting per-exit results: markdown table, PNG plot, MLflow logging."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    """A GitHub markdown table of `columns` from dict-like rows (None -> '-')."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def plot_exits(records: Sequence[Mapping], path: str | Path, title: str = "") -> Path:
    """Quality (perplexity, exact match) and speed (ms/token, speed-up) against exit depth."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training/eval machines
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in records]
    fig, (quality, speed) = plt.subplots(1, 2, figsize=(11, 4))
    quality.plot(layers, [r["perplexity"] for r in records], "o-", label="perplexity")
    quality.set_xlabel("exit layer")
    quality.set_ylabel("perplexity (response tokens)")
    quality.set_yscale("log")
    if any(r.get("exact_match") is not None for r in records):
        em = quality.twinx()
        em.plot(layers, [r["exact_match"] for r in records], "s--", color="tab:green", label="EM")
        em.plot(
            layers,
            [r["exact_match_normalized"] for r in records],
            "^--",
            color="tab:olive",
            label="EM (normalised)",
        )
        em.set_ylabel("exact match")
        em.set_ylim(-0.02, 1.02)
        em.legend(loc="upper right")
    quality.legend(loc="upper left")
    quality.set_title("quality")
    if any(r.get("ms_per_token") is not None for r in records):
        speed.plot(layers, [r["ms_per_token"] for r in records], "o-", label="ms / token")
        speed.set_ylabel("ms per generated token")
        up = speed.twinx()
        up.plot(layers, [r["speedup"] for r in records], "s--", color="tab:red", label="speed-up")
        up.set_ylabel("speed-up vs full model")
        up.legend(loc="upper right")
    speed.set_xlabel("exit layer")
    for axis in (quality, speed):
        axis.set_xticks(layers)
    speed.set_title("speed")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_to_mlflow(
    uri: str,
    params: Mapping[str, object],
    records: Sequence[Mapping],
    artifacts: Sequence[Path],
    experiment: str = "soft-eval-exits",
    artifact_root: Path | None = None,
) -> str:
    """One run: params, every metric per exit (step = exit layer, so MLflow plots it against
    depth), and the artifact files. Returns the run id."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        # A local backend would otherwise put artifacts under the current directory.
        local = urlparse(uri).scheme in ("sqlite", "file", "")
        location = artifact_root.resolve().as_uri() if local and artifact_root else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        for record in records:
            metrics = {
                k: float(v)
                for k, v in record.items()
                if k != "layer"
                and isinstance(v, int | float)
                and not isinstance(v, bool)
                and math.isfinite(float(v))
            }
            mlflow.log_metrics(metrics, step=int(record["layer"]))
        for path in artifacts:
            mlflow.log_artifact(str(path))
        return run.info.run_id
