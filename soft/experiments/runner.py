"""Running one training run of the plan as a user would: torchrun on the project's launcher."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from soft.checkpointing.directory import CheckpointError, find_checkpoint
from soft.config.errors import ConfigError
from soft.experiments.plan import Layout, RunSpec
from soft.runs import TRAIN_LOG, RunDir

LAUNCHER_MODULE = "soft.training.cli"  # what launchers/pretrain_soft.py runs
FINGERPRINT = "repro_fingerprint.json"
# A fresh rendezvous of its own: no variables from whatever process started this one.
_RENDEZVOUS_VARS = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID",
}  # fmt: skip


class RunFailed(RuntimeError):
    """A training subprocess failed; the message names the run and its log."""


@dataclass
class RunOutcome:
    name: str
    wall_s: float
    final_loss: float | None
    log: Path


def launch_command(spec: RunSpec, nproc: int, python: str = sys.executable) -> list[str]:
    return [
        python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "--module", LAUNCHER_MODULE, *spec.overrides,
    ]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_VARS}
    env.setdefault("PYTHONWARNINGS", "ignore")
    # One thread per rank unless the user says otherwise: on a small shared CPU, OpenMP
    # threads competing for the same cores made steps 2-3x slower in our measurements.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def is_finished(run_dir: Path) -> bool:
    """The launcher writes exit_status.json 'finished' after the final checkpoint."""
    folder = RunDir.of(run_dir)
    try:
        return folder.read_status() == "finished" and find_checkpoint(folder.save_dir) is not None
    except CheckpointError:
        return False


def final_loss(run_dir: Path) -> float | None:
    """The last training step's loss from train_log.jsonl (None when there is none)."""
    records = RunDir.of(run_dir).read_log(TRAIN_LOG)
    return float(records[-1]["loss"]) if records and "loss" in records[-1] else None


_CAUSE = re.compile(r"^(\[rank\d+\]:\s*)?(error: |[\w.]*(Error|Exception)\b)")


def _cause(path: Path) -> str | None:
    """The first error line of a log: the launcher's 'error: ...' or a traceback's last line
    (torchrun's own ChildFailedError summary, which follows it, says nothing new)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    found = (ln.strip() for ln in lines if _CAUSE.match(ln) and "ChildFailedError" not in ln)
    return next(found, None)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def train(spec: RunSpec, layout: Layout, nproc: int) -> RunOutcome:
    """Run `spec` from scratch (its folder is cleared: a stale checkpoint would be resumed)."""
    run_dir, log_path = layout.run_dir(spec.name), layout.log(spec.name)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(launch_command(spec, nproc)) + "\n\n")
        log.flush()
        proc = subprocess.run(
            launch_command(spec, nproc),
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not is_finished(run_dir):
        why = f"exit code {proc.returncode}" if proc.returncode else "no finished checkpoint"
        cause = _cause(log_path)
        raise RunFailed(
            f"training run '{spec.name}' failed ({why}); full log: {log_path}\n"
            + (f"cause: {cause}\n" if cause else "")
            + f"last lines:\n{_tail(log_path)}"
        )
    return RunOutcome(spec.name, wall, final_loss(run_dir), log_path)


def default_jobs(nproc: int) -> int:
    """Runs at a time: one on a GPU machine (every run would take the same devices); on CPU
    as many as the cores allow at `nproc` ranks each (at most 4: only sft, soft and the
    extracted runs are ever ready together)."""
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) // nproc))


def run_plan(
    plan: list[RunSpec],
    done: set[str],
    jobs: int,
    train_one: Callable[[RunSpec], RunOutcome],
    on_start: Callable[[RunSpec], None] = lambda spec: None,
    on_done: Callable[[RunSpec, RunOutcome], None] = lambda spec, outcome: None,
) -> dict[str, RunOutcome]:
    """Train the runs not in `done`, up to `jobs` at a time, each once the run it loads is done.

    On a failure no new run starts; the ones in flight finish, then the first failure is raised
    (their logs stay complete for the user to read).
    """
    done = set(done)
    pending = [spec for spec in plan if spec.name not in done]
    running: dict[Future, RunSpec] = {}
    outcomes: dict[str, RunOutcome] = {}
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for spec in [s for s in pending if s.loads is None or s.loads in done]:
                if len(running) >= jobs:
                    break
                pending.remove(spec)
                on_start(spec)
                running[pool.submit(train_one, spec)] = spec
            if not running:
                names = ", ".join(f"{s.name} (loads {s.loads})" for s in pending)
                raise ConfigError(f"runs waiting for runs that are not in the plan: {names}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                spec = running.pop(future)
                try:
                    outcome = future.result()
                except Exception as exc:  # noqa: BLE001 (re-raised once the others finish)
                    failure = failure or exc
                    pending.clear()
                    continue
                done.add(spec.name)
                outcomes[spec.name] = outcome
                on_done(spec, outcome)
    if failure is not None:
        raise failure
    return outcomes


# ----------------------------------------------------------------------------- base reuse


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_fingerprint(spec: RunSpec, layout: Layout) -> dict:
    """What makes two base runs the same: overrides (minus tracking) and the input files."""
    overrides = [o for o in spec.overrides if not o.startswith("tracking.")]
    return {
        "overrides": overrides,
        "tokenizer_sha256": sha256(layout.tokenizer),
        "corpus_sha256": sha256(layout.corpus),
    }


def write_fingerprint(spec: RunSpec, layout: Layout) -> None:
    path = layout.run_dir(spec.name) / FINGERPRINT
    path.write_text(json.dumps(base_fingerprint(spec, layout), indent=1) + "\n")


def read_fingerprint(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / FINGERPRINT).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _shape(overrides: list[str]) -> dict[str, str]:
    """The overrides that a fine-tuning run loading the base must agree with."""
    pairs = (o.partition("=") for o in overrides)
    return {k: v for k, _, v in pairs if k.startswith("model.")}


def reusable_base(spec: RunSpec, layout: Layout) -> bool:
    """Automatic reuse: a finished base trained with exactly these settings and inputs."""
    run_dir = layout.run_dir(spec.name)
    recorded = read_fingerprint(run_dir)
    return (
        is_finished(run_dir)
        and recorded is not None
        and layout.tokenizer.is_file()
        and layout.corpus.is_file()
        and recorded == base_fingerprint(spec, layout)
    )


def check_forced_reuse(spec: RunSpec, layout: Layout) -> list[str]:
    """--reuse-base: the base must be finished and of the same shape and tokenizer; other
    differences (steps, learning rate) are allowed and returned as notes."""
    run_dir = layout.run_dir(spec.name)
    if not is_finished(run_dir):
        raise ConfigError(
            f"--reuse-base: no finished base run in '{run_dir}' (exit_status.json 'finished' "
            "and checkpoints/latest); run once without --reuse-base"
        )
    if not layout.tokenizer.is_file():
        raise ConfigError(f"--reuse-base: the base's tokenizer '{layout.tokenizer}' is missing")
    recorded = read_fingerprint(run_dir)
    if recorded is None:
        return [f"base in {run_dir} has no {FINGERPRINT}: its settings were not checked"]
    if recorded.get("tokenizer_sha256") != sha256(layout.tokenizer):
        raise ConfigError(f"--reuse-base: '{layout.tokenizer}' is not the tokenizer of the base")
    want, have = _shape(list(spec.overrides)), _shape(recorded.get("overrides", []))
    wrong = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: base {a}, now {b}" for k, (a, b) in sorted(wrong.items()))
        raise ConfigError(f"--reuse-base: the base model has a different shape ({detail})")
    now = {o for o in spec.overrides if not o.startswith("tracking.")}
    changed = sorted(now - set(recorded.get("overrides", [])))
    return [f"base reused although these settings differ: {', '.join(changed)}"] if changed else []
