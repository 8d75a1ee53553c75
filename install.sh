#!/usr/bin/env bash
# Set up code-llm-lens in a virtual environment: ./.venv, or the one already active.
#
# torch is chosen for the machine: without an NVIDIA GPU the CPU build (never the multi-GB CUDA
# wheels), with one a CUDA build (a CUDA torch already installed in the supported range is kept).
# Everything else is installed at the versions the test suite passed with (constraints.txt), then
# the package itself, editable, with the test tools, the Triton kernel and Ray. Safe to run again.
#
# Environment (used by the Makefile; a person needs none of them):
#   CODELENS_VENV       where to create the environment when none is active (default .venv)
#   CODELENS_LATEST=1   ignore constraints.txt and upgrade every dependency to its newest release
#   CODELENS_OVERRIDES  space-separated requirements that replace the lock's pins for those names
#                       (e.g. "triton==3.6.0 numpy<2.4")
#   PYTHON              the interpreter that creates the environment (default python3)
set -euo pipefail
cd "$(dirname "$0")"

# The torch release the suite is tested with (on a CPU machine it is also the local wheel).
TORCH_VERSION=2.13.0
TORCH_SUPPORTED='torch>=2.6'   # keep in step with pyproject.toml

if [ -z "${VIRTUAL_ENV:-}" ]; then
  venv="${CODELENS_VENV:-.venv}"
  [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
fi
echo "install.sh: environment $VIRTUAL_ENV"
python -m pip install --quiet --upgrade pip "setuptools>=70.1"

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=1; fi

if [ "$has_gpu" = 1 ]; then
  echo "install.sh: NVIDIA GPU found: CUDA build of torch"
  python - "$TORCH_SUPPORTED" <<'EOF' 2>/dev/null || python -m pip install --quiet "torch==$TORCH_VERSION"
import sys
import torch
from packaging.requirements import Requirement
sys.exit(0 if torch.cuda.is_available() and Requirement(sys.argv[1]).specifier.contains(
    torch.__version__.split("+")[0]) else 1)
EOF
else
  echo "install.sh: no GPU: CPU build of torch"
  if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    # A CPU wheel from pip's configured find-links when there is one (no CUDA packages), else
    # PyTorch's CPU wheel index. Plain 'pip install torch' would pull several GB of CUDA wheels.
    if ! python -m pip install --quiet --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
      python -m pip install --quiet "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
    fi
    python -m pip install --quiet "torch==$TORCH_VERSION"  # its dependencies, from the usual index
  fi
fi

# The lock, less the names the machine or the caller decides: torch always, and on a GPU machine
# triton (CUDA torch pins the Triton it was built with) and CUDA's own packages.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
read -r -a overrides <<<"${CODELENS_OVERRIDES:-}"
skip='torch'
[ "$has_gpu" = 1 ] && skip="$skip|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+"
for req in "${overrides[@]}"; do
  skip="$skip|$(printf '%s' "$req" | sed -E 's/[<>=!~ ;\[].*//')"
done
grep -v -i -E "^($skip)(==| @)" constraints.txt >"$constraints" || true

if [ "${CODELENS_LATEST:-0}" = 1 ]; then
  echo "install.sh: newest releases (constraints.txt ignored)"
  python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev,triton,ray]" \
    "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
else
  python -m pip install --quiet -c "$constraints" -e ".[dev,triton,ray]" ${overrides[@]+"${overrides[@]}"}
fi
python -c "import torch; print('install.sh: torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"
echo "install.sh: done. Activate with: . $VIRTUAL_ENV/bin/activate"
