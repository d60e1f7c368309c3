#!/usr/bin/env bash
# Optional: llama.cpp for the GGUF export test and benchmarks/bench_llamacpp.py (not run by CI).
#
#   bash scripts/setup.sh && bash scripts/setup_llamacpp.sh
#
# llama-cpp-python has no CPU wheels on PyPI: pip builds it (and llama.cpp) from source, which
# took 14 minutes on 2 CPU cores here, too long for CI. Its source distribution also carries
# llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and the
# gguf-py it is written against: the gguf wheel on PyPI lags behind it); those are copied to
# .venv/share/llama.cpp, where the test and the benchmark look for them.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(grep -oP '"llama-cpp-python==\K[0-9.]+' pyproject.toml)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==${version}" -d "$tmp"
sdist="$tmp/llama_cpp_python-${version}.tar.gz"
src="llama_cpp_python-${version}/vendor/llama.cpp"
tar xzf "$sdist" -C "$tmp" "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py"
rm -rf .venv/share/llama.cpp
mkdir -p .venv/share/llama.cpp
cp -r "$tmp/$src/convert_hf_to_gguf.py" "$tmp/$src/conversion" "$tmp/$src/gguf-py" .venv/share/llama.cpp/
# The same sdist, built here (no second download); the extra pins it and its runtime deps.
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/python -m pip install --quiet "$sdist"
.venv/bin/python -m pip install --quiet -e ".[llamacpp]"
.venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, '| converter: .venv/share/llama.cpp/convert_hf_to_gguf.py')"
