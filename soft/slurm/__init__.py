"""SLURM support: the exit-status contract between the training loop and the batch script,
and the job's SLURM environment. The batch scripts live in launchers/slurm/."""

from soft.runs.status import (
    STOP_STATUS_FILE,
    clear_stop_status,
    read_stop_reason,
    write_stop_status,
)
from soft.slurm.env import in_slurm_job, slurm_job_info

__all__ = [
    "STOP_STATUS_FILE",
    "clear_stop_status",
    "in_slurm_job",
    "read_stop_reason",
    "slurm_job_info",
    "write_stop_status",
]
