"""Experiment tracking: a tiny `Tracker` interface with an MLflow implementation.

Only rank 0 talks to MLflow; every other rank (and a disabled config) gets a `NullTracker`,
so training code calls `tracker.log(...)` unconditionally.

Resume (a restarted or SLURM-requeued job on the same output directory):
  * The run id is kept in `<output_dir>/mlflow_run_id`. A new tracker on that directory reopens
    the run (status back to RUNNING) instead of creating a second one.
  * No step lost or repeated: on reopen the tracker reads the last step already recorded for
    every metric key and drops any later `log()` point for that key whose step is <= that step.
    A resumed job replays the steps after its last checkpoint with the same values; the first
    copy stays in MLflow.
  * Params cannot change once logged in MLflow. Identical params are not re-logged; a param
    whose value differs (e.g. a raised `train.train_iters`) keeps its first value, a warning is
    logged and the new value is recorded as the tag `param_changed.<key>`.

Tags (soft.tracking.tags): host, user, SLURM job id / array task, git commit of the checkout
and library versions, set when the run is created and again when a job reopens it.

Closing: `close(status)` with FINISHED / FAILED / KILLED. Callers either do
`try: ... except BaseException: tracker.close("FAILED"); raise` or use the tracker as a context
manager, which closes FINISHED on success, KILLED on KeyboardInterrupt and FAILED on any other
exception. A job stopped for preemption (it will be requeued) may close with "KILLED"; the next
job sets the run back to RUNNING. At close the tracker draws the per-exit loss curves it has
seen (including those recorded before a resume) to `exit_losses.png` and logs it as an artifact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from soft.failpoints import failpoint
from soft.tracking.config import TrackingConfig
from soft.tracking.keys import exit_loss_keys
from soft.tracking.plots import plot_exit_losses

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
PLOT_NAME = "exit_losses.png"
STATUSES = ("FINISHED", "FAILED", "KILLED")
STOP_REASON_TAG = "soft.stop_reason"  # exit_status.json's reason: why the job stopped
# MLflow 3 limits (mlflow.utils.validation); kept here so that importing this module (on every
# rank) does not import mlflow.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


class Tracker:
    """Interface; also the no-op implementation (`NullTracker`)."""

    @property
    def run_id(self) -> str | None:
        return None

    def log_params(self, flat: dict[str, Any]) -> None:
        """Log a flat `{"model.num_layers": 4, ...}` dict (the resolved config)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log scalar metrics at training iteration `step`."""

    def log_artifact(self, path: str | Path) -> None:
        """Copy a file (e.g. the resolved config YAML) into the run's artifacts."""

    def close(self, status: str = "FINISHED", reason: str | None = None, plot: bool = True) -> None:
        """End the run with status FINISHED, FAILED or KILLED; `reason` (why the job stopped:
        soft.runs.status) becomes the tag `soft.stop_reason`; `plot`: draw the exit-loss plot
        (seconds of matplotlib: skipped by a job that is being torn down). Idempotent."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        self.close(run_status_for(exc))
        return False  # never swallow the exception


class NullTracker(Tracker):
    """Does nothing: ranks != 0 and `tracking.enabled: false`."""


def run_status_for(exc: BaseException | None) -> str:
    """The run status for leaving a `with tracker:` block with `exc` (None = normal exit)."""
    if exc is None:
        return "FINISHED"
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED"
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        return "FINISHED"  # sys.exit(0) is a clean exit
    return "FAILED"


def param_value(value: Any) -> str:
    """Stringify a config value the same way every time (so a resume can compare them)."""
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        # MLflow rejects longer values; the full config is also logged as a YAML artifact.
        suffix = "...[truncated]"
        text = text[: MAX_PARAM_VALUE_LENGTH - len(suffix)] + suffix
    return text


DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{output_dir.resolve() / DB_FILE}"


def relocate_artifacts(output_dir: Path) -> None:
    """Keep the run folder's own MLflow store pointing at its own artifacts after the folder
    was moved or copied.

    MLflow stores absolute artifact locations (an experiment's artifact_location and each
    run's artifact_uri; a relative path is made absolute at creation), so a moved run folder
    would read its plots from, and write new ones to, the old place. For the default store
    (mlflow.db inside the run folder, artifacts in mlartifacts/ beside it) those locations are
    rewritten to the folder's current path. Other tracking URIs are left alone."""
    import sqlite3

    db = output_dir / DB_FILE
    if not db.is_file():
        return
    here = (output_dir.resolve() / ARTIFACTS_DIR).as_uri()
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        rows = con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall()
        for experiment_id, old in rows:
            if not old or old == here or not old.rstrip("/").endswith(f"/{ARTIFACTS_DIR}"):
                continue
            con.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                (here, experiment_id),
            )
            con.execute(
                "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                (here, len(old) + 1, experiment_id, len(old), old),
            )
            log.info("MLflow artifacts of %s: %s -> %s (the run folder moved)", db, old, here)


def mark_run_ended(
    cfg: TrackingConfig, output_dir: Path, status: str, reason: str, why: str
) -> bool:
    """Mark the run folder's MLflow run `status` when it is still RUNNING: its job died
    without closing it (SIGKILL, a lost node), seen by another process (the next job that takes
    the folder, or a surviving rank). `why` is logged. A job that resumes the run reopens it as
    RUNNING. Returns whether the run was marked."""
    if not cfg.enabled or not (output_dir / RUN_ID_FILE).is_file():
        return False
    if cfg.tracking_uri is None and not (output_dir / DB_FILE).is_file():
        return False
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=cfg.tracking_uri or default_tracking_uri(output_dir))
    run_id = (output_dir / RUN_ID_FILE).read_text().strip()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_tag(run_id, STOP_REASON_TAG, reason)
        client.set_terminated(run_id, status=status)
    except MlflowException as exc:
        log.warning("MLflow run %s could not be marked %s: %s", run_id, status, exc)
        return False
    log.warning("MLflow run %s was left RUNNING (%s): marked %s", run_id, why, status)
    return True


def build_tracker(
    cfg: TrackingConfig, output_dir: Path, rank: int, default_run_name: str
) -> Tracker:
    """The MLflow tracker on rank 0 when enabled, else a `NullTracker`."""
    if not cfg.enabled or rank != 0:
        return NullTracker()
    output_dir = Path(output_dir)
    if cfg.tracking_uri is None:
        relocate_artifacts(output_dir)
    return MlflowTracker(
        tracking_uri=cfg.tracking_uri or default_tracking_uri(output_dir),
        experiment=cfg.experiment,
        run_name=cfg.run_name or default_run_name,
        output_dir=output_dir,
    )


class MlflowTracker(Tracker):
    """Logs to one MLflow run through `MlflowClient` (no fluent global active run, so several
    trackers in one process never interfere). See the module docstring for resume rules."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, output_dir: Path):
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._output_dir = Path(output_dir)
        self._output_dir.mkdir(parents=True, exist_ok=True)
        self._closed = False
        # Last step recorded per metric key before this job started (the resume floor).
        self._floor: dict[str, int] = {}
        self._params: dict[str, str] = {}
        # (step, value) per exit-loss key, for the plot at close.
        self._history: dict[str, list[tuple[int, float]]] = defaultdict(list)

        run_id = self._reopen_run()
        if run_id is None:
            experiment_id = self._experiment_id(experiment, tracking_uri)
            run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
            _write_atomic(self._output_dir / RUN_ID_FILE, run_id + "\n")
            log.info("MLflow run %s created (experiment %r, %s)", run_id, experiment, tracking_uri)
        self._run_id = run_id
        self._tag_run()

    def _tag_run(self) -> None:
        """Host, SLURM job, git commit, library versions (soft.tracking.tags): set at creation
        and again at every reopen, so they describe the job now running."""
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        from soft.tracking.tags import run_tags

        tags = [RunTag(k, param_value(v)) for k, v in run_tags().items()]
        try:
            self._client.log_batch(self._run_id, tags=tags)
        except MlflowException as exc:  # tags are context: never fail a training job for them
            log.warning("MLflow run tags not set: %s", exc)

    @property
    def run_id(self) -> str:
        return self._run_id

    # -- opening -----------------------------------------------------------------------------

    def _reopen_run(self) -> str | None:
        """Reopen the run named in `<output_dir>/mlflow_run_id`; None when there is none usable."""
        from mlflow.exceptions import MlflowException

        id_file = self._output_dir / RUN_ID_FILE
        if not id_file.is_file():
            return None
        run_id = id_file.read_text().strip()
        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            # E.g. the output dir was copied or the tracking URI changed: start a fresh run
            # rather than failing the training job.
            log.warning(
                "MLflow run %s from %s not found (%s); creating a new run", run_id, id_file, exc
            )
            return None
        if run.info.lifecycle_stage != "active":
            log.warning("MLflow run %s was deleted; creating a new run", run_id)
            return None
        self._client.update_run(run_id, status="RUNNING")
        self._params = dict(run.data.params)
        self._floor = _last_steps(self._client, run)
        for key in exit_loss_keys(self._floor):
            self._history[key] = [
                (m.step, m.value) for m in self._client.get_metric_history(run_id, key)
            ]
        log.info(
            "MLflow run %s reopened (%d metric keys already recorded)", run_id, len(self._floor)
        )
        return run_id

    def _experiment_id(self, name: str, tracking_uri: str) -> str:
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        # MLflow's default artifact root for a sqlite store is ./mlruns relative to the current
        # directory; keep artifacts next to the database instead.
        artifact_location = None
        if tracking_uri.startswith("sqlite:///"):
            db_path = Path(tracking_uri.removeprefix("sqlite:///"))
            artifact_location = (db_path.resolve().parent / ARTIFACTS_DIR).as_uri()
        return self._client.create_experiment(name, artifact_location=artifact_location)

    # -- logging -----------------------------------------------------------------------------

    def log_params(self, flat: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        new: list[Param] = []
        changed: list[RunTag] = []
        for key, value in flat.items():
            text = param_value(value)
            old = self._params.get(key)
            if old is None:
                new.append(Param(key, text))
            elif old != text:
                log.warning(
                    "MLflow param %r was %r in this run and is now %r; MLflow params cannot "
                    "change, the old value stays (new value in tag param_changed.%s)",
                    key,
                    old,
                    text,
                    key,
                )
                changed.append(RunTag(f"param_changed.{key}", text))
        for chunk in _chunks(new, MAX_PARAMS_PER_BATCH):
            self._log_param_batch(chunk)
        for chunk in _chunks(changed, MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, tags=chunk)
        self._params.update({p.key: p.value for p in new})

    def _log_param_batch(self, params: list[Any]) -> None:
        """Log params; if MLflow rejects the batch (a value changed behind our back, e.g. the
        run was edited elsewhere), fall back to one by one and only warn."""
        from mlflow.exceptions import MlflowException

        try:
            self._client.log_batch(self._run_id, params=params)
            return
        except MlflowException:
            pass
        for param in params:
            try:
                self._client.log_param(self._run_id, param.key, param.value)
            except MlflowException as exc:
                log.warning("MLflow param %r not logged: %s", param.key, exc)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if step <= self._floor.get(key, -math.inf):
                continue  # replayed after a resume: the first copy stays
            value = float(value)
            batch.append(Metric(key, value, timestamp, step))
            if key in self._history or exit_loss_keys([key]):
                self._history[key].append((step, value))
        for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=chunk)

    def log_artifact(self, path: str | Path) -> None:
        self._client.log_artifact(self._run_id, str(path))

    # -- closing -----------------------------------------------------------------------------

    def close(self, status: str = "FINISHED", reason: str | None = None, plot: bool = True) -> None:
        if status not in STATUSES:
            raise ValueError(f"tracker status must be one of {STATUSES}, got {status!r}")
        if self._closed:
            return
        self._closed = True
        # The status first: drawing the plot takes seconds (matplotlib), and a job killed in
        # the meantime must not leave the run RUNNING. Artifacts can be added after the end.
        if reason is not None:
            self._client.set_tag(self._run_id, STOP_REASON_TAG, reason)
        self._client.set_terminated(self._run_id, status=status)
        failpoint("tracking:closed")
        if not plot:
            return
        try:
            self._log_exit_loss_plot()
        except Exception as exc:  # a plotting problem must not hide the run's real status
            log.warning("exit-loss plot not logged: %s", exc)

    def _log_exit_loss_plot(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_exit_losses(dict(self._history), Path(tmp) / PLOT_NAME)
            if path is not None:
                self.log_artifact(path)


def _last_steps(client: Any, run: Any) -> dict[str, int]:
    """Highest step recorded per metric key of `run`."""
    # MLflow keeps each key's latest metric, ordered by (step, timestamp, value), so its step
    # is the maximum; RunData exposes those Metric objects only as `_metric_objs`. Fall back to
    # the (slower: every point) public history API if that attribute ever goes away.
    latest = getattr(run.data, "_metric_objs", None)
    if latest is not None:
        return {m.key: m.step for m in latest}
    return {
        key: max(m.step for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
