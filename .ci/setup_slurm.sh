#!/usr/bin/env bash
# Install SLURM (slurmctld, slurmd, client commands) and munge from the distribution's packages
# for the one-node test cluster that tests/slurm/conftest.py starts (the fixture also calls this
# script when the binaries are missing). Idempotent: does nothing when everything is installed.
# Needs root and apt-get (Debian/Ubuntu). Starts no daemon: there is no systemd in CI
# containers, and the fixture runs the daemons itself with its own config.
set -euo pipefail

# The daemons live in sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

binaries=(munged mungekey munge unmunge slurmctld slurmd sbatch srun scontrol scancel sinfo squeue)
missing=()
for binary in "${binaries[@]}"; do
    command -v "$binary" >/dev/null 2>&1 || missing+=("$binary")
done
if ((${#missing[@]} == 0)); then
    echo "setup_slurm: SLURM and munge already installed ($(slurmd -V))"
    exit 0
fi
echo "setup_slurm: missing ${missing[*]}; installing"

if [[ $(id -u) -ne 0 ]]; then
    echo "setup_slurm: must run as root to apt-get install" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_slurm: apt-get not found (only Debian/Ubuntu are supported)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Not the slurm-wlm metapackage: its recommends pull some 30 optional plugin and -dev
# packages. These four (plus slurm-wlm-basic-plugins, a dependency) are what the test cluster
# uses: auth/munge, select/cons_tres, proctrack/linuxproc, task/none.
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge

for binary in "${binaries[@]}"; do
    command -v "$binary" >/dev/null 2>&1 || {
        echo "setup_slurm: $binary still missing after install" >&2
        exit 1
    }
done
echo "setup_slurm: installed $(slurmd -V)"
