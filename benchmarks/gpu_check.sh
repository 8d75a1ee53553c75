#!/usr/bin/env bash
# One GPU check of the lens kernels, sized for under 8 minutes on an H100/H200:
#   1. the kernel oracle tests (tests/kernels/test_lens_triton.py, test_final_mixture.py), compiled
#      for the GPU instead of the CPU interpreter, every strategy;
#   2. bench_kernel.py --check for both strategies (and their candidate configurations:
#      triton-fused-n256, triton-fused-n64, triton-fused-m64n256 and triton-fused-slot-kl (KL in the
#      kernel instead of from the final layer's mixture), bench_kernel.FUSED_VARIANTS;
#      triton-chunked-v2048,
#      CHUNKED_VARIANTS) at a Qwen2.5-Coder-7B production shape (vs the torch path: fp32 mode,
#      bf16 arithmetic, ranks, top-k ids, bitwise determinism);
#   3. the same seven and the cuBLAS bf16 matmul bound timed at the GPT-2, Qwen2.5-Coder-1.5B,
#      CodeLlama-7B and Qwen2.5-Coder-7B shapes (16k rows each), on the residual rows of a real
#      forward of a random-weight model (near worst case for the top-k), with the default strategy
#      per width that kernels/dispatch.py's STRATEGY_BY_WIDTH should then say.
# Everything lands in benchmarks/results/ (or $OUT when set, as on the lent device machine):
# gpu_check-tests.log, kernel-<device>-<time>.json/.md. Nothing here installs code-llm-lens: the
# source folders are put on PYTHONPATH as the codelens package, and wheels in .whl/ (pydantic for
# the test suite's conftest is not needed: the kernel tests run with --confcutdir tests/kernels,
# whose conftest moves their CPU-built inputs to the GPU) are installed into a temporary site when
# present.
#
# Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"

site="$(mktemp -d)"
mkdir -p "$site/codelens"
for part in engine kernels workers; do ln -s "$PWD/$part" "$site/codelens/$part"; done
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu_check-device.txt"

status=0
echo "== 1. kernel oracle tests on the GPU"
timeout 200 python3 -m pytest -q -p no:cacheprovider --confcutdir tests/kernels tests/kernels/test_lens_triton.py \
  tests/kernels/test_final_mixture.py -k "not codelens_run" 2>&1 | tee "$out/gpu_check-tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2 + 3. production-shape checks, then timings of both strategies against cuBLAS"
timeout 330 python3 benchmarks/bench_kernel.py --check --check-tokens 64 \
  --strategies triton-fused triton-fused-n256 triton-fused-n64 triton-fused-m64n256 triton-fused-slot-kl \
  triton-chunked triton-chunked-v2048 \
  --source forward --rows 16384 \
  --warmup 10 --rep 25 --out-dir "$out" || status=1
exit "$status"
