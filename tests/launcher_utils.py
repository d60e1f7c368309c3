"""Run the launcher as a user would (python or torchrun) and read its MLflow run back; run a
scenario harness on the scenarios pytest selected."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "pretrain_soft.py"


def launch(args: list[str], nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    # A fresh process of its own: no rendezvous variables from whatever ran this test.
    skip = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, str(LAUNCHER), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            str(LAUNCHER),
            *args,
        ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and "expect_failure" not in args:
        print(proc.stdout[-5000:], proc.stderr[-10000:])
    return proc


def mlflow_metrics(
    output_dir: Path,
) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str], str]:
    """{metric: [(step, value), ...]}, params, status of the run recorded in output_dir."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir.resolve() / 'mlflow.db'}")
    run = client.get_run((output_dir / "mlflow_run_id").read_text().strip())
    history = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }
    return history, run.data.params, run.info.status


def run_harness(module: str, out: Path, *args: str, timeout: int) -> dict:
    """Run a test harness module (`python -m MODULE OUT [args]`: it imports megatron-core once
    and forks its jobs) and return the report.json it writes into OUT."""
    import json

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, str(out), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    path = out / "report.json"
    assert path.is_file(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(path.read_text())


def selected_names(request: pytest.FixtureRequest, test: Callable[..., object]) -> list[str]:
    """The `name` parameters of `test` that this session runs, in collection order: what is
    left after -k, -m, node ids and --deselect (request.session.items is the final list). A
    harness fixture launches just these, all in one launch when there are several."""
    names = [
        item.callspec.params["name"]
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.function is test
    ]
    return list(dict.fromkeys(names))


def scenario_failure(result: dict) -> str:
    """A failed scenario's whole error and traceback, as the harness recorded them."""
    return "\n\n".join(part for part in (result.get("error"), result.get("traceback")) if part)
