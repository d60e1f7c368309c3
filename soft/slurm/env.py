"""What SLURM tells a job through its environment (for logs and MLflow tags)."""

from __future__ import annotations

import os
from collections.abc import Mapping

# SLURM variable -> short name. SLURM_RESTART_COUNT is only set once a job was requeued.
_JOB_VARS = {
    "SLURM_JOB_ID": "job_id",
    "SLURM_JOB_NAME": "job_name",
    "SLURM_JOB_NODELIST": "nodelist",
    "SLURM_NNODES": "nnodes",
    "SLURM_JOB_PARTITION": "partition",
    "SLURM_RESTART_COUNT": "restart_count",
    "SLURM_CLUSTER_NAME": "cluster",
    "SLURM_ARRAY_JOB_ID": "array_job_id",
    "SLURM_ARRAY_TASK_ID": "array_task_id",
}


def in_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return "SLURM_JOB_ID" in env


def slurm_job_info(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """{"job_id": ..., "restart_count": "0", ...}; empty outside a SLURM job.

    Meant for MLflow tags (e.g. `{f"slurm.{k}": v}`): tags, unlike params, may change when a
    requeued job reopens the run.
    """
    env = os.environ if environ is None else environ
    if not in_slurm_job(env):
        return {}
    info = {short: env[var] for var, short in _JOB_VARS.items() if var in env}
    info.setdefault("restart_count", "0")
    return info
