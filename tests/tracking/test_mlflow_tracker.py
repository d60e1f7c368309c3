"""MLflow tracker: round trip, resume, crash status, rank gating, plots.

Creating a sqlite MLflow store costs a few seconds (schema migrations), so all tests but one
share a module-scoped store; each test uses its own output directory (= its own run).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from soft.config.errors import ConfigError
from soft.tracking import NullTracker, TrackingConfig, build_tracker, plot_exit_losses
from soft.tracking.mlflow_tracker import RUN_ID_FILE, run_status_for

mlflow = pytest.importorskip("mlflow")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def client(store_uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=store_uri)


def _cfg(uri: str | None, **kw) -> TrackingConfig:
    return TrackingConfig(tracking_uri=uri, experiment="soft-test", **kw)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifacts(client, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


def test_params_metrics_artifacts_round_trip(tmp_path: Path, store_uri: str, client) -> None:
    config_yaml = tmp_path / "config.yaml"
    config_yaml.write_text("model:\n  num_layers: 4\n")
    tracker = build_tracker(_cfg(store_uri), tmp_path / "out", rank=0, default_run_name="rt")
    tracker.log_params(
        {"model.num_layers": 4, "soft.exits": [2, 4], "data.train_path": None, "x.long": "a" * 7000}
    )
    for step in (1, 2, 3):
        tracker.log({"train/loss/exit_2": 3.0 - step * 0.1, "train/loss/exit_4": 2.0 / step}, step)
    tracker.log({"lr": 1e-4}, step=3)
    tracker.log_artifact(config_yaml)
    tracker.close()

    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "rt"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.num_layers"] == "4"
    assert params["soft.exits"] == "[2, 4]"
    assert params["data.train_path"] == "None"
    assert len(params["x.long"]) == 6000 and params["x.long"].endswith("[truncated]")
    assert _history(client, tracker.run_id, "train/loss/exit_4") == [
        (1, 2.0),
        (2, 1.0),
        (3, 2.0 / 3),
    ]
    assert _history(client, tracker.run_id, "lr") == [(3, 1e-4)]
    assert {"config.yaml", "exit_losses.png"} <= _artifacts(client, tracker.run_id)
    assert (tmp_path / "out" / RUN_ID_FILE).read_text().strip() == tracker.run_id
    # The plot artifact is a real PNG.
    local = client.download_artifacts(tracker.run_id, "exit_losses.png", str(tmp_path))
    assert Path(local).read_bytes()[:8] == PNG_MAGIC


def test_resume_reopens_run_and_drops_replayed_steps(
    tmp_path: Path, store_uri: str, client, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    first = build_tracker(_cfg(store_uri), out, rank=0, default_run_name="resume")
    first.log_params({"train.train_iters": 10, "model.num_layers": 2})
    for step in range(1, 6):
        first.log({"train/loss/exit_1": float(step), "train/loss/exit_2": 10.0 + step}, step)
    first.close("KILLED")  # preempted
    assert client.get_run(first.run_id).info.status == "KILLED"

    # The requeued job: same output dir, replays steps 4-5 (after its checkpoint at step 3).
    second = build_tracker(_cfg(store_uri), out, rank=0, default_run_name="resume")
    assert second.run_id == first.run_id
    assert client.get_run(second.run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="soft.tracking.mlflow_tracker"):
        second.log_params({"train.train_iters": 20, "model.num_layers": 2})  # must not raise
    assert "train.train_iters" in caplog.text
    for step in range(4, 9):
        second.log({"train/loss/exit_1": 100.0 + step, "train/loss/exit_2": 10.0 + step}, step)
    second.close()

    run = client.get_run(second.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.train_iters"] == "10"  # MLflow params are immutable
    assert run.data.tags["param_changed.train.train_iters"] == "20"
    exit_1 = _history(client, run.info.run_id, "train/loss/exit_1")
    assert [s for s, _ in exit_1] == list(range(1, 9))  # no step lost or repeated
    assert dict(exit_1)[5] == 5.0 and dict(exit_1)[6] == 106.0  # the first copy of 4-5 stays
    assert [s for s, _ in _history(client, run.info.run_id, "train/loss/exit_2")] == list(
        range(1, 9)
    )
    experiment = client.get_experiment_by_name("soft-test")
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'resume'")
    assert len(runs) == 1
    assert "exit_losses.png" in _artifacts(client, run.info.run_id)


def test_context_manager_sets_failed_and_killed(tmp_path: Path, store_uri: str, client) -> None:
    cfg = _cfg(store_uri)
    with pytest.raises(RuntimeError), build_tracker(cfg, tmp_path / "a", 0, "crash") as tracker:
        tracker.log({"train/loss/exit_1": 1.0}, 1)
        raise RuntimeError("boom")
    assert client.get_run(tracker.run_id).info.status == "FAILED"

    with (
        pytest.raises(KeyboardInterrupt),
        build_tracker(cfg, tmp_path / "b", 0, "ctrl-c") as tracker,
    ):
        raise KeyboardInterrupt
    assert client.get_run(tracker.run_id).info.status == "KILLED"

    with build_tracker(cfg, tmp_path / "c", 0, "ok") as tracker:
        tracker.log({"lr": 0.1}, 1)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    tracker.close("FAILED")  # closing twice is a no-op
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_run_status_for() -> None:
    assert run_status_for(None) == "FINISHED"
    assert run_status_for(SystemExit(0)) == "FINISHED"
    assert run_status_for(SystemExit(3)) == "FAILED"
    assert run_status_for(KeyboardInterrupt()) == "KILLED"
    assert run_status_for(ValueError()) == "FAILED"


def test_null_tracker_on_other_ranks_and_when_disabled(tmp_path: Path, store_uri: str) -> None:
    for tracker in (
        build_tracker(_cfg(store_uri), tmp_path / "r1", rank=1, default_run_name="x"),
        build_tracker(
            _cfg(store_uri, enabled=False), tmp_path / "off", rank=0, default_run_name="x"
        ),
    ):
        assert isinstance(tracker, NullTracker)
        with tracker:
            tracker.log_params({"a": 1})
            tracker.log({"loss": 1.0}, 1)
            tracker.log_artifact(tmp_path / "missing.yaml")
        assert tracker.run_id is None
    assert not (tmp_path / "r1").exists() and not (tmp_path / "off").exists()


def test_default_uri_is_sqlite_in_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with build_tracker(TrackingConfig(), out, rank=0, default_run_name="default") as tracker:
        tracker.log({"train/loss/exit_1": 1.0}, 1)
    assert (out / "mlflow.db").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(tracker.run_id)
    assert run.info.experiment_id == client.get_experiment_by_name("soft").experiment_id
    # Artifacts live next to the database, not in ./mlruns of the current directory.
    assert run.info.artifact_uri.startswith((out / "mlartifacts").as_uri())
    assert list((out / "mlartifacts").rglob("exit_losses.png"))


def test_plot_exit_losses(tmp_path: Path) -> None:
    assert plot_exit_losses({"lr": [(1, 0.1)]}, tmp_path / "none.png") is None
    history = {
        "train/loss/exit_2": [(1, 3.0), (2, 2.5)],
        "train/loss/exit_10": [(1, 2.0), (2, 1.5)],
        "valid/loss/exit_2": [(2, 2.8)],
        "lr": [(1, 0.1)],
    }
    path = plot_exit_losses(history, tmp_path / "sub" / "p.png")
    assert path is not None and path.read_bytes()[:8] == PNG_MAGIC


def test_tracking_config_validate() -> None:
    TrackingConfig().validate()
    with pytest.raises(ConfigError, match="tracking.experiment"):
        TrackingConfig(experiment=" ").validate()
    with pytest.raises(ConfigError, match="x.tracking_uri"):
        TrackingConfig(tracking_uri="").validate("x")


def test_a_moved_run_folder_keeps_its_artifacts(tmp_path: Path) -> None:
    """The default store (mlflow.db in the run folder) records absolute artifact locations;
    after the folder is moved, a resumed job reads the old artifacts and writes new ones in the
    folder's new place, and nothing is written at the old path."""
    import shutil

    first = tmp_path / "a" / "run"
    note = tmp_path / "note.txt"
    note.write_text("first job")
    tracker = build_tracker(TrackingConfig(), first, rank=0, default_run_name="moved")
    tracker.log_artifact(note)
    tracker.close()
    moved = tmp_path / "b" / "run"
    shutil.move(first.parent, moved.parent)
    note.write_text("second job")
    (tmp_path / "second.txt").write_text("second")
    # The resumed job is a new process: MLflow's per-process cache of artifact stores is empty.
    from mlflow.tracking._tracking_service import utils as mlflow_utils

    mlflow_utils._artifact_repos_cache.clear()
    tracker = build_tracker(TrackingConfig(), moved, rank=0, default_run_name="moved")
    tracker.log_artifact(tmp_path / "second.txt")
    tracker.close()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{moved / 'mlflow.db'}")
    run = client.get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith((moved / "mlartifacts").as_uri())
    assert {"note.txt", "second.txt"} <= _artifacts(client, tracker.run_id)
    local = Path(client.download_artifacts(tracker.run_id, "note.txt", str(tmp_path / "dl")))
    assert local.read_text() == "first job"
    assert not first.parent.exists()


def test_a_run_left_running_by_a_dead_job_is_marked_and_tagged(tmp_path: Path) -> None:
    from soft.tracking import mark_run_ended

    out = tmp_path / "run"
    tracker = build_tracker(TrackingConfig(), out, rank=0, default_run_name="dead")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_run(tracker.run_id).info.status == "RUNNING"  # SIGKILL: never closed
    assert mark_run_ended(TrackingConfig(), out, "KILLED", "killed", "its job died")
    run = client.get_run(tracker.run_id)
    assert (run.info.status, run.data.tags["soft.stop_reason"]) == ("KILLED", "killed")
    # Only a RUNNING run is marked: a run its job closed keeps its status.
    assert not mark_run_ended(TrackingConfig(), out, "FAILED", "failed", "a peer says so")
    assert client.get_run(tracker.run_id).info.status == "KILLED"
    assert not mark_run_ended(
        TrackingConfig(enabled=False), tmp_path / "nothing", "KILLED", "killed", ""
    )


def test_close_sets_the_status_before_drawing_the_plot(tmp_path: Path, monkeypatch) -> None:
    """Drawing the plot takes seconds; a job killed meanwhile must not leave RUNNING."""
    out = tmp_path / "run"
    tracker = build_tracker(TrackingConfig(), out, rank=0, default_run_name="slow plot")
    tracker.log({"train/exit_1": 1.0}, 1)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    seen = []
    monkeypatch.setattr(
        tracker, "_log_exit_loss_plot", lambda: seen.append(client.get_run(tracker.run_id))
    )
    tracker.close("KILLED", reason="exit_interval")
    assert [(r.info.status, r.data.tags["soft.stop_reason"]) for r in seen] == [
        ("KILLED", "exit_interval")
    ]


def test_runs_are_tagged_with_host_slurm_job_commit_and_versions(
    tmp_path: Path, store_uri: str, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.metadata
    import socket
    import subprocess

    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    out = tmp_path / "out"
    tracker = build_tracker(_cfg(store_uri), out, rank=0, default_run_name="tags")
    tracker.close("KILLED")
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["soft.host"] == socket.gethostname()
    assert (tags["slurm.job_id"], tags["slurm.array_job_id"], tags["slurm.array_task_id"]) == (
        "4242", "4240", "2",
    )  # fmt: skip
    assert tags["slurm.restart_count"] == "0"
    repo = Path(__file__).resolve().parents[2]
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode == 0:  # a git checkout (CI's clone is one)
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert tags["soft.git_dirty"] in ("true", "false")
    for dist in ("torch", "megatron-core", "transformers", "mlflow"):
        assert tags[f"soft.version.{dist}"] == importlib.metadata.version(dist)
    # A requeued job reopens the run and its tags describe the new job.
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = build_tracker(_cfg(store_uri), out, rank=0, default_run_name="tags")
    assert again.run_id == tracker.run_id
    again.close()
    tags = client.get_run(tracker.run_id).data.tags
    assert (tags["slurm.job_id"], tags["slurm.restart_count"]) == ("4243", "1")
