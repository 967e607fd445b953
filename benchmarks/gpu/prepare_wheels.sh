#!/usr/bin/env bash
# Wheels the GPU suite (benchmarks/gpu/run_suite.py) imports on a machine that has torch,
# transformers and peft but neither diffusers nor network access. Run it here, where pip reaches
# PyPI; the wheels land in benchmarks/gpu/wheels/ (git-ignored) and travel with the working tree.
#
#   bash benchmarks/gpu/prepare_wheels.sh
#
# Only diffusers, at the version CI pins (requirements/ci.txt), pure Python (py3-none-any).
# Its other requirements are assumed present on the GPU machine (its image lists them):
# huggingface-hub >= 1.32, safetensors >= 0.8, filelock, numpy, regex, requests, Pillow;
# importlib_metadata is needed only on Python < 3.8 (the stdlib's importlib.metadata otherwise).
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(sed -n 's/^diffusers==\([^ #]*\).*/\1/p' requirements/ci.txt)
if [ -z "$version" ]; then
  echo "prepare_wheels: requirements/ci.txt has no 'diffusers==VERSION' line" >&2
  exit 1
fi
folder=benchmarks/gpu/wheels
mkdir -p "$folder"
rm -f "$folder"/diffusers-*.whl  # one version only
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --dest "$folder" "diffusers==$version"
ls -l "$folder"
du -ch "$folder"/*.whl | tail -n 1
