"""A real one-node SLURM cluster for the tests in this folder (session-scoped fixture).

`slurm_cluster` installs SLURM + munge with .ci/setup_slurm.sh when they are missing (root and
apt-get needed), then starts munged, slurmctld and slurmd in the foreground (so the fixture
owns exactly those processes) with a generated munge key and slurm.conf in a fresh /tmp
folder, waits for the node to be idle and stops everything afterwards.

Skipped (with the reason) when not root or without apt-get; with CI=true it fails instead.
SLURM_CONF is only set in the environment of the commands the fixture runs (`cluster.env`),
never in this process's os.environ. Set SOFT_SLURM_KEEP=1 to keep the folder (logs, state).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO_ROOT / ".ci" / "setup_slurm.sh"
NODE = "localhost"
PARTITION = "debug"
BINARIES = (
    "munged", "mungekey", "munge", "unmunge",
    "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue",
)  # fmt: skip
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
START_TIMEOUT_S = 45
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
     "DEADLINE", "PREEMPTED"}
)  # fmt: skip


def _required() -> bool:
    """CI=true: the SLURM tests must run, so missing prerequisites fail instead of skipping."""
    return os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str) -> None:
    if _required():
        pytest.fail(f"SLURM test cluster required (CI=true) but {reason}", pytrace=False)
    pytest.skip(reason)


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SBIN_PATH}")


def _ensure_installed() -> None:
    if all(_which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        _unavailable("SLURM/munge are not installed and installing them needs root")
    if shutil.which("apt-get") is None:
        _unavailable("SLURM/munge are not installed and there is no apt-get to install them")
    proc = subprocess.run(
        ["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
    )
    if proc.returncode != 0 or not all(_which(b) for b in BINARIES):
        _unavailable(f"{SETUP_SCRIPT.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hardware() -> dict[str, int]:
    """`slurmd -C` values; slurmd drains a node whose configured CPUs/memory exceed them."""
    out = subprocess.run(
        [_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, check=True
    ).stdout
    values = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", out.splitlines()[0])}
    for key in ("CPUs", "RealMemory"):
        if key not in values:
            raise RuntimeError(f"unexpected `slurmd -C` output: {out!r}")
    return values


def _slurm_conf(root: Path, hw: dict[str, int], ports: tuple[int, int]) -> str:
    topology = " ".join(
        f"{k}={hw[k]}" for k in ("Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
        if k in hw
    )  # fmt: skip
    # Leave memory headroom: a RealMemory above what slurmd measures drains the node.
    memory = max(hw["RealMemory"] * 9 // 10, 1)
    return f"""\
ClusterName=softtest
SlurmctldHost={NODE}
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/run/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: track processes through /proc, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={hw["CPUs"]} {topology} RealMemory={memory} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """Handle on the running test cluster; every command gets SLURM_CONF through `env`."""

    root: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    startup_seconds: float = 0.0

    def run(
        self, *args: str, check: bool = True, timeout: float = 30, **kw
    ) -> subprocess.CompletedProcess:
        env = {**self.env, **kw.pop("env", {})}
        proc = subprocess.run(
            list(args), env=env, capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, env=env or {}, cwd=cwd).stdout
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` fields (JobState, Restarts, Reason, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(
        self, job_id: str, until: Sequence[str] = tuple(FINAL_STATES), timeout: float = 120
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} not in {sorted(until)} after {timeout}s: {info}\n{self.logs()}"
                )
            time.sleep(0.25)

    def start_requeued_now(self, job_id: str) -> None:
        """A requeued job waits ~2 minutes (BeginTime) before it may start again; skip that.

        Not at once: slurmd revoked the killed run's credential, and refuses a new launch
        whose credential is from the same second ("Job N already killed, do not launch batch
        job"; the job then fails). SLURM's own requeue delay exists to avoid exactly that.
        """
        time.sleep(2.0)
        self.run("scontrol", "update", f"jobid={job_id}", "starttime=now")

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-n", NODE, "-o", "%t", check=False).stdout.strip()

    def logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def _start(cluster: SlurmCluster, name: str, *args: str) -> None:
    """Start a daemon in the foreground (it stays our child), output to log/<name>.out."""
    out = open(cluster.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 - lives as long as the daemon
    cluster.procs[name] = subprocess.Popen(
        list(args), env=cluster.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    out.close()  # the child has its own copy


def _wait(cluster: SlurmCluster, what: str, ready, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _munge_works(cluster: SlurmCluster) -> bool:
    sock = str(cluster.root / "run" / "munge.socket")
    cred = subprocess.run(["munge", "-n", "-S", sock], capture_output=True, check=False)
    if cred.returncode != 0:
        return False
    check = subprocess.run(["unmunge", "-S", sock], input=cred.stdout, capture_output=True)
    return check.returncode == 0


def _node_idle(cluster: SlurmCluster) -> bool:
    state = cluster.node_state()
    if state.startswith(("down", "drain", "fail")):
        # E.g. registered before slurmctld was ready, or stale state: put it back in service.
        cluster.run("scontrol", "update", f"nodename={NODE}", "state=resume", check=False)
    return state == "idle"


def _start_cluster(cluster: SlurmCluster) -> None:
    root = cluster.root
    key = root / "munge" / "munge.key"
    subprocess.run([_which("mungekey") or "mungekey", "--create", f"--keyfile={key}"], check=True)
    key.chmod(0o600)
    _start(
        cluster, "munged", _which("munged") or "munged", "--foreground",
        f"--key-file={key}", f"--socket={root}/run/munge.socket",
        f"--pid-file={root}/run/munged.pid", f"--seed-file={root}/munge/munged.seed",
        f"--log-file={root}/log/munged.log",
    )  # fmt: skip
    _wait(cluster, "munged", lambda: _munge_works(cluster))
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, _hardware(), (_free_port(), _free_port())))
    _start(cluster, "slurmctld", _which("slurmctld") or "slurmctld", "-D", "-f", str(conf))
    _start(cluster, "slurmd", _which("slurmd") or "slurmd", "-D", "-N", NODE, "-f", str(conf))
    _wait(cluster, "the node to be idle in sinfo", lambda: _node_idle(cluster))


def _stop_cluster(cluster: SlurmCluster) -> None:
    if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
        # Cancel leftover jobs first: their slurmstepd processes do not die with slurmd.
        jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            cluster.run("scancel", *jobs, check=False)
            deadline = time.monotonic() + 15
            while (
                time.monotonic() < deadline
                and cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.strip()
            ):
                time.sleep(0.25)
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        _unavailable("the SLURM test cluster needs root (munged/slurmd run as root)")
    if shutil.which("apt-get") is None and not all(_which(b) for b in BINARIES):
        _unavailable("no apt-get to install SLURM/munge")
    _ensure_installed()

    # Not pytest's tmp_path: munged refuses a socket below a folder others cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="soft-slurm-", dir="/tmp"))
    root.chmod(0o755)
    for sub, mode in (("munge", 0o700), ("run", 0o755), ("state", 0o755), ("spool", 0o755),
                      ("log", 0o755)):  # fmt: skip
        (root / sub).mkdir(mode=mode)
    env = {
        **os.environ,
        "SLURM_CONF": str(root / "slurm.conf"),
        "PATH": f"{os.environ.get('PATH', '')}:{SBIN_PATH}",
    }
    cluster = SlurmCluster(root=root, env=env)
    started = time.monotonic()
    try:
        _start_cluster(cluster)
    except Exception as exc:
        logs = cluster.logs()
        _stop_cluster(cluster)
        pytest.fail(f"SLURM test cluster did not start: {exc}\n{logs}", pytrace=False)
    cluster.startup_seconds = time.monotonic() - started
    print(f"\nSLURM test cluster up in {cluster.startup_seconds:.1f}s ({root})")
    try:
        yield cluster
    finally:
        _stop_cluster(cluster)
        if not os.environ.get("SOFT_SLURM_KEEP"):
            shutil.rmtree(root, ignore_errors=True)
