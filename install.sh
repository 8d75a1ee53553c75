#!/usr/bin/env bash
# Set up code-llm-lens in ./.venv (or in the virtualenv that is already active).
#
# Without an NVIDIA GPU it installs the CPU build of torch (never the multi-GB CUDA wheels); with
# one it installs a CUDA torch and the Triton kernel. Then the package itself, editable, with the
# test tools and Ray. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install --quiet --upgrade pip "setuptools>=70.1"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install.sh: NVIDIA GPU found: CUDA build of torch"
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
    || python -m pip install --quiet torch
else
  echo "install.sh: no GPU: CPU build of torch"
  if ! python -c "import torch" 2>/dev/null; then
    # A CPU wheel from pip's configured find-links when there is one (no CUDA packages), else
    # PyTorch's CPU wheel index. Plain 'pip install torch' would pull several GB of CUDA wheels.
    if ! python -m pip install --quiet --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
      python -m pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
    fi
    python -m pip install --quiet "torch==2.13.0"  # its dependencies, from the usual index
  fi
fi

python -m pip install --quiet -e ".[dev,triton,ray]"
python -c "import torch; print('install.sh: torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"
echo "install.sh: done. Activate with: . .venv/bin/activate"
