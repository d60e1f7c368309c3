"""The run folder: its files (RunDir), why a job stopped (status) and who holds it (lock)."""

from soft.runs.lock import RunFolderBusy, RunLock, acquire
from soft.runs.rundir import TRAIN_LOG, VALID_LOG, RunDir
from soft.runs.status import STOP_STATUS_FILE, read_stop_reason, write_stop_status

__all__ = [
    "STOP_STATUS_FILE",
    "TRAIN_LOG",
    "VALID_LOG",
    "RunDir",
    "RunFolderBusy",
    "RunLock",
    "acquire",
    "read_stop_reason",
    "write_stop_status",
]
