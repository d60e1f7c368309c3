"""MLflow tags that say where and with what a run ran: host, user, SLURM job (and array task),
the git commit of the checkout, and the versions of the libraries that shape the numbers.

Tags, unlike params, may change: a resumed or requeued job (another node, another SLURM job)
overwrites them with its own, so they describe the latest job of the run. The git commit uses
MLflow's own tag (`mlflow.source.git.commit`, shown in its UI).
"""

from __future__ import annotations

import contextlib
import getpass
import importlib.metadata
import os
import platform
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

from soft.slurm.env import slurm_job_info

GIT_COMMIT_TAG = "mlflow.source.git.commit"  # mlflow.utils.mlflow_tags.MLFLOW_GIT_COMMIT
USER_TAG = "mlflow.user"  # mlflow.utils.mlflow_tags.MLFLOW_USER
VERSIONED = ("torch", "megatron-core", "transformers", "transformer-engine", "datasets", "mlflow")
CHECKOUT = Path(__file__).resolve().parents[2]  # the folder holding soft/


def git_state(checkout: Path = CHECKOUT) -> dict[str, str]:
    """{commit tag: sha, "soft.git_dirty": "true"/"false"}; {} outside a git checkout (an
    installed package) or without git."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        return {}
    # Tracked files only: untracked run folders and caches do not make the code dirty.
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {GIT_COMMIT_TAG: sha, "soft.git_dirty": "true" if dirty else "false"}


def versions() -> dict[str, str]:
    out = {"soft.version.python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[f"soft.version.{dist}"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def run_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every tag above for this process."""
    env = os.environ if environ is None else environ
    tags = {"soft.host": socket.gethostname()}
    with contextlib.suppress(KeyError, OSError):  # no passwd entry (some containers)
        tags[USER_TAG] = getpass.getuser()
    tags.update({f"slurm.{k}": v for k, v in slurm_job_info(env).items()})
    tags.update(git_state())
    tags.update(versions())
    return tags
