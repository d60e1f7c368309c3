#!/usr/bin/env bash
# Run HERE (a machine with internet), from anywhere in the checkout. Downloads what the GPU
# machine (Python 3.12, torch 2.11 CUDA 13, no internet) lacks for megatron-core + Transformer
# Engine into gpu_wheels/cache/ (git-ignored), then stages it into gpu_wheels/carry1..N, each
# small enough to travel in one device call (64 MiB per call, working tree included).
# Idempotent: files already in the cache are not downloaded again (the TE core wheel is 171 MiB).
#
# Env: CARRY_MIB (default 60) = most MiB one carry folder may hold.
set -euo pipefail

ROOT="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
WHEELS="$ROOT/gpu_wheels"
CACHE="$WHEELS/cache"
CARRY_MIB="${CARRY_MIB:-60}"
LIMIT_MIB=64  # device README: tracked + untracked-not-ignored files + carried paths, per call

TE_VERSION=2.11.0  # megatron-core 0.16.1's dev extra pins transformer-engine >=2.9,<2.12
# Pure-python or cp312 wheels missing from the GPU image (see .library/device/KINDS.md).
# pydantic*: imported by transformer_engine.common.recipe; versions = this checkout's venv.
WHEEL_SPECS=(
  "megatron-core==0.16.1"
  "transformer-engine==$TE_VERSION"
  "transformer-engine-cu13==$TE_VERSION"
  "pydantic==2.14.3"
  "pydantic-core==2.50.4"
  "annotated-types==0.8.0"
  "typing-inspection==0.4.5"
  "wheel==0.45.1"  # build-only: TE's setup.py imports wheel.bdist_wheel (gone in newer wheel)
)
SDIST=transformer-engine-torch  # source only on PyPI: built on the GPU machine against its torch

mkdir -p "$CACHE"

cached() {  # NAME==VERSION -> 0 if a file for it is already in the cache
  local name="${1%%==*}" version="${1##*==}"
  compgen -G "$CACHE/${name//-/_}-${version}[-.]*" >/dev/null
}

fetch_wheel() {
  if cached "$1"; then
    echo "cached: $1"
    return
  fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CACHE" "$1"
}

fetch_sdist() {
  # `pip download` would run the sdist's setup.py (needs CUDA) and delete the file when it
  # fails, so read the index's JSON (PEP 691) and check the sha256 ourselves.
  local name="$1" version="$2"
  if cached "$name==$version"; then
    echo "cached: $name==$version (sdist)"
    return
  fi
  python3 - "$name" "$version" "$CACHE" <<'PY'
import hashlib, json, sys, urllib.request
name, version, dest = sys.argv[1:]
req = urllib.request.Request(
    f"https://pypi.org/simple/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
)
files = json.load(urllib.request.urlopen(req, timeout=60))["files"]
want = f"{name.replace('-', '_')}-{version}.tar.gz"
entry = next(f for f in files if f["filename"] == want)
data = urllib.request.urlopen(entry["url"], timeout=300).read()
if hashlib.sha256(data).hexdigest() != entry["hashes"]["sha256"]:
    sys.exit(f"sha256 mismatch for {want}")
open(f"{dest}/{want}", "wb").write(data)
print(f"downloaded {want} ({len(data)} bytes)")
PY
}

for spec in "${WHEEL_SPECS[@]}"; do fetch_wheel "$spec"; done
fetch_sdist "$SDIST" "$TE_VERSION"

# ---- stage: split the TE core wheel; everything else goes with its last part ----------------
core="$(compgen -G "$CACHE/transformer_engine_cu13-$TE_VERSION-*.whl")"
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
core_bytes=$(stat -c %s "$core")
small=()
for f in "$CACHE"/*; do [[ "$f" != "$core" ]] && small+=("$f"); done
# A torch extension wheel built on a GPU machine earlier (install_on_gpu.sh puts it in $OUT).
if compgen -G "$WHEELS/prebuilt/*" >/dev/null; then small+=("$WHEELS"/prebuilt/*); fi
small_bytes=$(cat "${small[@]}" | wc -c)
total=$((core_bytes + small_bytes))
limit=$((CARRY_MIB * 1048576))
n=$(( (total + limit - 1) / limit ))
chunk=$(( (total + n - 1) / n ))

rm -rf "$WHEELS"/carry*
split -b "$chunk" -d -a 2 "$core" "$WHEELS/part."
for ((i = 1; i <= n; i++)); do
  mkdir -p "$WHEELS/carry$i"
  mv "$WHEELS/part.$(printf %02d $((i - 1)))" "$WHEELS/carry$i/$(basename "$core").part$(printf %02d $((i - 1)))"
done
cp -l "${small[@]}" "$WHEELS/carry$n/" 2>/dev/null || cp "${small[@]}" "$WHEELS/carry$n/"
(cd "$CACHE" && sha256sum "$(basename "$core")") >"$WHEELS/carry$n/SHA256SUMS"
echo "$n" >"$WHEELS/carry$n/NUM_CARRIES"

# ---- report: each call carries one folder on top of the working tree ------------------------
tree_bytes=$(cd "$ROOT" && { git ls-files -z; git ls-files -z --others --exclude-standard; } \
  | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
echo
echo "working tree that travels with every call: $(mib "$tree_bytes") MiB"
status=0
for ((i = 1; i <= n; i++)); do
  bytes=$(du -sb "$WHEELS/carry$i" | cut -f1)
  per_call=$((bytes + tree_bytes))
  flag=ok
  if ((per_call > LIMIT_MIB * 1048576)); then flag="OVER ${LIMIT_MIB} MiB: rerun with a smaller CARRY_MIB"; status=1; fi
  echo "gpu_wheels/carry$i: $(mib "$bytes") MiB (+ tree = $(mib "$per_call") MiB) $flag"
  ls -1 "$WHEELS/carry$i" | sed 's/^/    /'
done
exit "$status"
