#!/usr/bin/env bash
# The one GPU check (benchmarks/gpu_check.py: kernel oracle tests compiled for the GPU, both lens
# strategies and their candidate configurations checked and timed against the cuBLAS bf16 matmul
# at four model shapes, then end-to-end tokens/s and GPU busy time of `codelens run` on
# random-weight Qwen2.5-Coder-1.5B and 7B), run where the package is not installed: the source
# folders become the codelens package through links in a temporary site, and the wheels in .whl/
# (pydantic for the pipeline stage; see bench_gpu_pipeline.py's docstring) are installed there
# when present. Results go to $OUT when set (the lent machine), else benchmarks/results.
#
# Usage: bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --stages kernel --budget-s 200]
# PYTHON names the interpreter (default python3).
# On the lent H200 machine: one call, carry [".whl"], timeout_s 590 (default budget 450 s; about
# 460 s when no stage overruns). .whl/ is fetched here once by the pip download command in
# bench_gpu_pipeline.py's docstring (pydantic and what it needs, for Python 3.12: 2.8 MB).
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"

site="$(mktemp -d)"
mkdir -p "$site/codelens"
for part in engine kernels workers; do ln -s "$PWD/$part" "$site/codelens/$part"; done
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    .whl/*.whl || echo "gpu_check.sh: the wheels in .whl/ did not install; going on without them"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm \
  --format=csv,noheader
exec "$py" benchmarks/gpu_check.py "$@"
