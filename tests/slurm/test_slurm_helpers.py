"""soft.slurm helpers used by the batch script (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from soft.slurm import (
    STOP_STATUS_FILE,
    clear_stop_status,
    read_stop_reason,
    slurm_job_info,
    write_stop_status,
)
from soft.slurm.__main__ import main


def test_exit_status_round_trip(tmp_path: Path) -> None:
    assert read_stop_reason(tmp_path) == "missing"
    write_stop_status(tmp_path / "out", "signal", 12)
    assert read_stop_reason(tmp_path / "out") == "signal"
    write_stop_status(tmp_path / "out", "exit_interval", 16)
    assert read_stop_reason(tmp_path / "out") == "exit_interval"
    write_stop_status(tmp_path / "out", "finished", 20)
    assert read_stop_reason(tmp_path / "out") == "finished"
    (tmp_path / STOP_STATUS_FILE).write_text("{not json")
    assert read_stop_reason(tmp_path) == "invalid"
    clear_stop_status(tmp_path)
    clear_stop_status(tmp_path)  # no error when already gone
    assert read_stop_reason(tmp_path) == "missing"
    with pytest.raises(ValueError):
        write_stop_status(tmp_path, "crashed", 1)  # type: ignore[arg-type]


def test_cli_exit_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_stop_status(tmp_path, "signal", 3)
    assert main(["exit-reason", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "signal"
    assert main(["clear-exit-status", str(tmp_path)]) == 0
    assert not (tmp_path / STOP_STATUS_FILE).exists()


def test_cli_output_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  output_dir: from_yaml\n")
    monkeypatch.chdir(tmp_path)
    assert main(["output-dir", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "from_yaml")
    assert main(["output-dir", "--config", str(config), f"train.output_dir={tmp_path}/cli"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    # A bad config fails here, before the job starts torchrun on every node.
    assert main(["output-dir", "train.nonsense=1"]) == 2
    assert "train.nonsense" in capsys.readouterr().err


def test_slurm_job_info() -> None:
    assert slurm_job_info({}) == {}
    info = slurm_job_info({"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "HOME": "/root"})
    assert info == {"job_id": "7", "nnodes": "2", "restart_count": "0"}
    assert slurm_job_info({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "3"})["restart_count"] == "3"
