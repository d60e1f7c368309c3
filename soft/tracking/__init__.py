"""Experiment tracking (MLflow on rank 0, no-ops elsewhere)."""

from soft.tracking.config import TrackingConfig
from soft.tracking.mlflow_tracker import (
    MlflowTracker,
    NullTracker,
    Tracker,
    build_tracker,
    mark_run_ended,
    relocate_artifacts,
    run_status_for,
)
from soft.tracking.plots import plot_exit_losses

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingConfig",
    "build_tracker",
    "run_status_for",
    "mark_run_ended",
    "plot_exit_losses",
    "relocate_artifacts",
]
