"""Tracking section of the config (MLflow)."""

from __future__ import annotations

from dataclasses import dataclass

from soft.config.core import option
from soft.config.errors import ConfigError


@dataclass
class TrackingConfig:
    enabled: bool = option(True, "Log params, metrics and artifacts to MLflow (rank 0 only).")
    tracking_uri: str | None = option(
        None,
        "MLflow tracking URI (e.g. sqlite:////abs/mlflow.db or http://host:5000). "
        "null = sqlite:///<train.output_dir>/mlflow.db.",
    )
    experiment: str = option("soft", "MLflow experiment name (created when missing).")
    run_name: str | None = option(
        None, "MLflow run name; null = derived from the output directory by the launcher."
    )

    def validate(self, prefix: str = "tracking") -> None:
        if not self.experiment.strip():
            raise ConfigError(f"config key '{prefix}.experiment': expected a non-empty name")
        if self.tracking_uri is not None and not self.tracking_uri.strip():
            raise ConfigError(
                f"config key '{prefix}.tracking_uri': expected a URI or null, got an empty string"
            )
        if self.run_name is not None and not self.run_name.strip():
            raise ConfigError(f"config key '{prefix}.run_name': expected a non-empty name or null")
