#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies (idempotent).
#
#   bash scripts/setup.sh            # CPU machine: torch 2.13.0 CPU build, no Transformer Engine
#   bash scripts/setup.sh --gpu      # GPU machine: also the 'gpu' extra (Transformer Engine)
#
# Extras installed: dev (tests, ruff) and eval (lm-evaluation-harness). llama.cpp is separate
# (scripts/setup_llamacpp.sh: a 14-minute source build).
#
# torch is installed first and pinned: a plain `pip install torch` (or a package asking for it)
# would pull a multi-GB CUDA build on a CPU machine. Transformer Engine is never installed on
# CPU: a partial install raises at import and breaks `import megatron.core`.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$python_bin" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
extras="dev,eval"
if [[ "${1:-}" == "--gpu" ]]; then
    extras="dev,eval,gpu"
fi
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
.venv/bin/python -c "import megatron.core, torch; print('soft: torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
