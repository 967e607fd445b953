#!/usr/bin/env bash
# Install branchgrpo into the current Python environment (use a virtual environment).
#   bash scripts/install.sh          # the package (+ diffusers/transformers/peft, bench plots)
#   bash scripts/install.sh --test   # also the pinned test set CI uses, incl. open_clip (HPS), ImageReward, RapidOCR
# torch: an installed torch (e.g. your CUDA build) is kept. With none installed, a machine with an
# NVIDIA GPU gets pip's default build; a machine without one gets torch 2.13.0 (CPU), or for
# --test the torch 2.14.1 + torchvision 0.29.1 pair (open_clip needs torchvision, which does not
# import beside the 2.13.0 CPU build).
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
  $PY -m pip install --quiet torch torchvision
elif [ "$WITH_TEST" = 1 ]; then
  $PY -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
else
  $PY -m pip install --quiet "torch==2.13.0"
fi
if [ "$WITH_TEST" = 1 ]; then
  # Pinned versions for reproducible CI; torch is chosen above.
  $PY -m pip install --quiet -c requirements/ci.txt -e ".[models,bench,rewards,ocr,test]"
  # ImageReward's own package is only the reference in its equivalence test; its pins (timm 0.6,
  # transformers 4) do not fit ours, so it goes in without its dependencies.
  $PY -m pip install --quiet --no-deps -c requirements/ci.txt image-reward fairscale
else
  $PY -m pip install --quiet -e ".[models,bench]"
fi
