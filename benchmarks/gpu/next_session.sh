#!/usr/bin/env bash
# The next GPU session's measurements as one device call (docs/flux.md, "What the next GPU run
# should measure"), in order of value, each cut off so the whole ends inside TOTAL_S seconds:
#   1. FLUX.1-dev at 720², branchgrpo and dancegrpo with LoRA, blocks compiled, no gradient
#      checkpointing (the update-MFU experiment; about 6 minutes);
#   2. SD3.5-medium, all its cases (about 3 minutes), with what is left.
# Wan2.1-1.3B (about 7 minutes) needs a call of its own: MODELS=wan bash benchmarks/gpu/next_session.sh
#
# Prepare here (pip reaches PyPI), then run on the device machine from the repository root:
#   bash benchmarks/gpu/prepare_wheels.sh          # carry benchmarks/gpu/wheels
#   OUT=/some/folder bash benchmarks/gpu/next_session.sh
# Settings (environment): TOTAL_S (default 560), TRAIN_MB (rows per training micro-batch without
# checkpointing; default 4 on a GPU with >= 100 GiB, else 2: `branchgrpo plan` puts four rows at
# 83.3 GiB at 720²), MODELS (default "flux sd3"; any of flux, sd3, wan), DRY_RUN=1 (print the
# commands, run nothing). Every step writes results.json/results.md under $OUT/<step> and its log.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:?set OUT to the folder the results go to}
total=${TOTAL_S:-560}
models=${MODELS:-flux sd3}
python=${PYTHON:-python3}
if [ -z "${TRAIN_MB:-}" ]; then
  if [ -n "${DRY_RUN:-}" ]; then
    TRAIN_MB=2
  else
    TRAIN_MB=$("$python" -c 'import torch; print(4 if torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= 100 * 2**30 else 2)')
  fi
fi

step() {  # step NAME SECONDS ARGS...: run the suite with ARGS, killed after SECONDS
  local name=$1 seconds=$2
  shift 2
  local command=("$python" benchmarks/gpu/run_suite.py --out "$out/$name" "$@")
  echo "next_session: $name (${seconds} s at most): PYTHONUNBUFFERED=1 ${command[*]}"
  [ -n "${DRY_RUN:-}" ] && return 0
  mkdir -p "$out/$name"
  PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=15 "$seconds" "${command[@]}" 2>&1 | tee "$out/$name.log"
  echo "next_session: $name exit ${PIPESTATUS[0]} after $SECONDS s in all"
}

left() { echo $((total - SECONDS)); }

if [ -z "${DRY_RUN:-}" ]; then
  mkdir -p "$out"
  { date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$python" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)'
  } > "$out/machine.txt" 2>&1
fi
for model in $models; do
  case $model in
    flux) step gpu "$(left)" --cases branchgrpo-720-lora,dancegrpo-720-lora --compile blocks --options none \
            --checkpointing off --train-micro-batch "$TRAIN_MB" --deadline-s $(( $(left) - 30 )) ;;
    sd3) budget=$(( $(left) - 60 ))
         if [ "$budget" -lt 120 ]; then echo "next_session: sd3 skipped, ${budget} s left for its cases"; continue; fi
         step sd3 "$(left)" --model sd3.5-medium --options none --budget-s "$budget" --deadline-s $(( $(left) - 30 )) ;;
    wan) step wan "$(left)" --model wan2.1-1.3b --options none --budget-s $(( $(left) - 60 )) --deadline-s $(( $(left) - 30 )) ;;
    *) echo "next_session: unknown model '$model' in MODELS (allowed: flux, sd3, wan)" >&2; exit 2 ;;
  esac
done
