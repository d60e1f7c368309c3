"""SLURM support: the exit-status contract between the training loop and the batch script,
and the job's SLURM environment. The batch scripts live in launchers/slurm/."""

from soft.runs.status import (
    EXIT_STATUS_FILE,
    clear_exit_status,
    read_exit_reason,
    write_exit_status,
)
from soft.slurm.env import in_slurm_job, slurm_job_info

__all__ = [
    "EXIT_STATUS_FILE",
    "clear_exit_status",
    "in_slurm_job",
    "read_exit_reason",
    "slurm_job_info",
    "write_exit_status",
]
