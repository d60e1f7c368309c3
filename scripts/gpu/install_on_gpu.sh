#!/usr/bin/env bash
# Run ON THE GPU MACHINE from the repo root, after gpu_wheels/carry1..N have all arrived
# (scripts/gpu/README.md). Installs megatron-core + Transformer Engine without internet,
# builds TE's torch extension against the local torch (no wheel for it on PyPI), checks the
# imports, and leaves the built wheel in $OUT so later sessions can carry it instead.
#
# Usage: bash scripts/gpu/install_on_gpu.sh [--check-parts | --reassemble]
#   --check-parts: only report which carry folders are present (run after each partial carry).
#   --reassemble:  also rebuild the TE core wheel from its parts and check its sha256; no install.
set -euo pipefail

WHEELS=gpu_wheels
PY="${PYTHON:-python3}"
STAGE=/tmp/gpu_wheels  # reassembled wheels: outside the repo, never travels back
export MAX_JOBS="${MAX_JOBS:-16}"

last_carry() { ls -d "$WHEELS"/carry* 2>/dev/null | sort -V | tail -1; }

check_parts() {
  local last n missing=0
  last="$(last_carry)"
  if [[ -z "$last" || ! -f "$last/NUM_CARRIES" ]]; then
    echo "no gpu_wheels/carryN with NUM_CARRIES yet: carry the last folder (it holds the manifest)"
    ls -d "$WHEELS"/carry* 2>/dev/null || true
    return 1
  fi
  n="$(cat "$last/NUM_CARRIES")"
  for ((i = 1; i <= n; i++)); do
    if compgen -G "$WHEELS/carry$i/*.part*" >/dev/null; then
      echo "carry$i: present"
    else
      echo "carry$i: MISSING (the machine was recycled or it was never carried): carry it again"
      missing=1
    fi
  done
  return "$missing"
}

reassemble() {
  local last name sums
  last="$(last_carry)"
  sums="$PWD/$last/SHA256SUMS"
  mkdir -p "$STAGE"
  name="$(awk '{print $2}' "$sums")"
  # Parts are numbered .part00, .part01, ... across the carry folders: order by that suffix.
  ls "$WHEELS"/carry*/"$name".part* | awk -F'[.]part' '{print $NF "\t" $0}' | sort -n | cut -f2 \
    | xargs cat >"$STAGE/$name"
  (cd "$STAGE" && sha256sum -c "$sums")
  shopt -s nullglob
  for f in "$last"/*.whl "$last"/*.tar.gz; do ln -sf "$PWD/$f" "$STAGE/"; done
  shopt -u nullglob
}

include_path() {
  # TE's headers need cudnn.h, cublasLt.h, nccl.h ...: the image has them in pip packages
  # (nvidia-*), which TE's build only searches when no toolkit is found. g++ reads this.
  "$PY" - <<'PY'
import glob, os, nvidia
roots = [p for base in nvidia.__path__ for p in glob.glob(os.path.join(base, "*", "include"))]
print(":".join(sorted(roots)))
PY
}

build_te_torch() {
  local torch_version built
  torch_version="$("$PY" -c 'import torch; print(torch.__version__)')"
  built="$(compgen -G "$STAGE/transformer_engine_torch-*.whl" || true)"
  if [[ -n "$built" && -f "$(last_carry)/BUILT_WITH_TORCH" ]] \
    && [[ "$(cat "$(last_carry)/BUILT_WITH_TORCH")" == "$torch_version" ]]; then
    echo "using prebuilt $(basename "$built") (torch $torch_version)"
    return
  fi
  rm -f "$STAGE"/transformer_engine_torch-*.whl  # a prebuilt one for another torch
  if ! "$PY" -c 'from wheel.bdist_wheel import bdist_wheel' 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/te_buildtools "$STAGE"/wheel-*.whl
    export PYTHONPATH="/tmp/te_buildtools${PYTHONPATH:+:$PYTHONPATH}"
  fi
  CPLUS_INCLUDE_PATH="$(include_path)${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
  export CPLUS_INCLUDE_PATH
  echo "building transformer_engine_torch against torch $torch_version (MAX_JOBS=$MAX_JOBS) ..."
  # FORCE_BUILD: skip setup.py's download of a prebuilt wheel (no internet: it would hang).
  # The extension is C++ only (CppExtension); NVTE_CUDA_ARCHS only trims what it passes on.
  NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_CUDA_ARCHS=90 NVTE_FRAMEWORK=pytorch \
    "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$STAGE" \
    "$STAGE"/transformer_engine_torch-*.tar.gz
  built="$(compgen -G "$STAGE/transformer_engine_torch-*.whl")"
  if [[ -n "${OUT:-}" ]]; then  # device tool: comes back to this session's files_at
    cp "$built" "$OUT/" && echo "$torch_version" >"$OUT/BUILT_WITH_TORCH"
    echo "built wheel copied to \$OUT ($(du -h "$built" | cut -f1); files over 16 MiB do not come back)"
  fi
}

install_all() {
  # --no-deps: the image already has torch, numpy, einops, onnx, packaging ... (KINDS.md);
  # letting pip resolve would try to reach an index.
  "$PY" -m pip install -q --no-index --no-deps --no-cache-dir \
    "$STAGE"/megatron_core-*.whl "$STAGE"/pydantic-*.whl "$STAGE"/pydantic_core-*.whl \
    "$STAGE"/annotated_types-*.whl "$STAGE"/typing_inspection-*.whl \
    "$STAGE"/transformer_engine-*-py3-none-any.whl "$STAGE"/transformer_engine_cu13-*.whl \
    "$STAGE"/transformer_engine_torch-*.whl
}

verify() {
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'PY'
import torch
import transformer_engine
import transformer_engine.pytorch as te
import megatron.core
from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.gpt.gpt_layer_specs import HAVE_TE as SPEC_HAS_TE
from soft.models.gpt import transformer_engine_available

try:
    fp8_ok, why = te.is_fp8_available(return_reason=True)
except TypeError:  # older signature
    fp8_ok, why = te.is_fp8_available(), ""
print(f"torch {torch.__version__} cuda {torch.version.cuda}; {torch.cuda.get_device_name()}")
print(f"transformer_engine {transformer_engine.__version__}; megatron-core {megatron.core.__version__}")
print(f"HAVE_TE={HAVE_TE} spec HAVE_TE={SPEC_HAS_TE} soft sees TE={transformer_engine_available()}")
print(f"FP8 available: {fp8_ok} {why or ''}")
assert HAVE_TE and SPEC_HAS_TE and transformer_engine_available(), "megatron-core does not see TE"
PY
}

case "${1:-}" in
  --check-parts) check_parts; exit $? ;;
  --reassemble) check_parts; reassemble; exit 0 ;;
  "") ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
esac
check_parts
reassemble
build_te_torch
install_all
verify
echo "OK: run tests with PYTHONPATH=\$PWD $PY -m pytest -m gpu tests/models/test_te_spec_gpu.py tests/training/test_packing_gpu.py tests/peft/test_lora_te_gpu.py"
