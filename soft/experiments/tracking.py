"""The reproduction's parent MLflow run: settings, the comparison and its files; the training
runs (logged by the launcher into the same experiment) are nested under it."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if urlparse(uri).scheme == "sqlite":
        # As the training tracker does: artifacts beside the store, not in the cwd.
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _metrics(rows: Sequence[Mapping]) -> list[tuple[str, float, int]]:
    """(key, value, step = exit layer): MLflow then plots each series against depth."""
    out = []
    for row in rows:
        k = int(row["layer"])
        for mode, got in row["metrics"].items():
            for name, value in (got or {}).items():
                if value is not None and math.isfinite(float(value)):
                    out.append((f"{mode}/{name}", float(value), k))
        for comparison, wr in row["win_rates"].items():
            if wr is not None:
                out.append((f"win/{comparison}/score", float(wr["score"]), k))
    return out


def report_params(report: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    """A reproduction report's MLflow parameters: its settings, corpus and base, and `keys`
    of the report as they are (one seed's results.json and the seeds' aggregate alike)."""
    return {
        **{f"settings.{k}": v for k, v in report["settings"].items()},
        **{f"corpus.{k}": v for k, v in report["corpus"].items()},
        "base": report["base_description"],
        **{k: report[k] for k in keys},
    }


def log_parent_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, object],
    rows: Sequence[Mapping],
    artifacts: Sequence[Path],
    child_run_ids: Sequence[str],
) -> str:
    """Create the parent run, log everything, nest the children; returns its id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(_experiment_id(client, experiment, uri), run_name=run_name)
    run_id = run.info.run_id
    try:
        flat = [Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in params.items()]
        for i in range(0, len(flat), 100):  # MLflow's batch limit
            client.log_batch(run_id, params=flat[i : i + 100])
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value, step in _metrics(rows)]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        for child in child_run_ids:
            client.set_tag(child, PARENT_TAG, run_id)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
