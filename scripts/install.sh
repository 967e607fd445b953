#!/usr/bin/env bash
# Install branchgrpo into the current Python environment (use a virtual environment).
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --test   # the package and the pinned test set (what CI runs)
# torch: an installed torch (e.g. your CUDA build) is kept. With none installed, a machine with an
# NVIDIA GPU gets pip's default build and a machine without one gets the small CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WITH_TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    *) echo "install.sh: unknown option $arg (known: --test)" >&2; exit 2 ;;
  esac
done
$PY -m pip install --quiet --upgrade pip
if $PY -c "import torch" 2>/dev/null; then
  echo "install.sh: keeping torch $($PY -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $PY -m pip install --quiet torch
else
  $PY -m pip install --quiet "torch==2.13.0"
fi
if [ "$WITH_TEST" = 1 ]; then
  # Pinned versions for reproducible CI; torch is not pinned here (see above).
  $PY -m pip install --quiet -c requirements/ci.txt -e ".[models,bench,test]"
else
  $PY -m pip install --quiet -e ".[models,bench]"
fi
