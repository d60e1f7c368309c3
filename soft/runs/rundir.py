"""A run folder (`train.output_dir`) and the files in it; the one place that names them.

<output_dir>/config.yaml        the resolved config of the latest job (written once the
                                job's config, data and checkpoint have been validated)
<output_dir>/checkpoints/       soft.checkpointing.directory (or checkpoint.save_dir)
<output_dir>/train_log.jsonl    one record per training step: each step once, also after
<output_dir>/valid_log.jsonl    resumes (replayed steps replace the old records)
<output_dir>/exit_status.json   why the last job stopped (soft.runs.status)
<output_dir>/.lock              the job that holds the folder (soft.runs.lock)
<output_dir>/mlflow.db, mlflow_run_id, mlartifacts/   MLflow (soft.tracking)
<output_dir>/previous/<time>/   what checkpoint.start_over moved aside
"""

from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soft.runs import status

CONFIG_FILE = "config.yaml"
TRAIN_LOG = "train_log.jsonl"
VALID_LOG = "valid_log.jsonl"
PREVIOUS = "previous"
MLFLOW_FILES = ("mlflow_run_id",)  # a fresh run after start_over gets a fresh MLflow run


@dataclass(frozen=True)
class RunDir:
    root: Path
    save_dir: Path

    @classmethod
    def of(cls, output_dir: str | Path, save_dir: str | Path | None = None) -> RunDir:
        root = Path(output_dir)
        return cls(root, Path(save_dir) if save_dir else root / "checkpoints")

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    # -- per-step logs -------------------------------------------------------------------

    def append(self, log_name: str, record: dict[str, Any]) -> None:
        with open(self.root / log_name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_log(self, log_name: str) -> list[dict[str, Any]]:
        """The records of a log; a torn last line (a kill mid-write) is left out."""
        path = self.root / log_name
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("iteration"), int):
                records.append(record)
        return records

    def truncate_logs(self, iteration: int) -> None:
        """Keep the records up to `iteration` (the checkpoint a job resumes from): the steps
        after it are run again and logged again, so each step appears once."""
        for name in (TRAIN_LOG, VALID_LOG):
            path = self.root / name
            if not path.is_file():
                continue
            kept = [r for r in self.read_log(name) if r["iteration"] <= iteration]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(path)

    # -- status --------------------------------------------------------------------------

    def write_status(
        self, reason: status.Reason, iteration: int, detail: str | None = None
    ) -> Path:
        return status.write_stop_status(self.root, reason, iteration, detail)

    def read_status(self) -> str:
        return status.read_stop_reason(self.root)

    def clear_status(self) -> None:
        status.clear_stop_status(self.root)

    # -- starting over -------------------------------------------------------------------

    def earlier_run_files(self) -> list[Path]:
        """What an earlier run left that a new run from step 1 would mix with or overwrite."""
        names = [TRAIN_LOG, VALID_LOG, status.STOP_STATUS_FILE, *MLFLOW_FILES]
        found = [self.root / n for n in names if (self.root / n).exists()]
        if self.save_dir.is_dir() and any(self.save_dir.iterdir()):
            found.append(self.save_dir)
        return found

    def move_aside(self) -> Path | None:
        """checkpoint.start_over: move the earlier run's files to previous/<time>/ (nothing
        is deleted). Returns that folder, or None when there was nothing to move."""
        files = self.earlier_run_files()
        if not files:
            return None
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        target = self.root / PREVIOUS / stamp
        target.mkdir(parents=True)
        for path in files:
            shutil.move(path, target / path.name)  # save_dir may be on another file system
        return target
