#!/usr/bin/env bash
# The prepared GPU run behind docs/benchmarks.md ("GPU"): fp32, bf16 and compiled figures for
# the mid-size and the full-size (LLaMA-7B base) deep-fusion recipes, one `vlablocks bench` each.
#
#   OUT=runs/bench-gpu PREFIX=h200_ bash benchmarks/gpu.sh [RUN ...]   # a CUDA device; ~8 minutes on an H200
#
# RUN: mid_fp32 mid_bf16 mid_bf16_compiled mid_bf16_compiled_b16 full_bf16 full_bf16_compiled (default: all).
#
# Each run writes OUT/PREFIXNAME.json; the printed tables go to OUT/PREFIXgpu.log. A run that fails or
# exceeds its time limit is reported and the next one starts.
set -u
OUT=${OUT:-runs/bench-gpu}
PREFIX=${PREFIX:-gpu_}
PY=${PY:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/${PREFIX}gpu.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

bench() {  # NAME SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name: vlablocks bench $*"
  local start=$SECONDS
  timeout "$limit" "$PY" -m vlablocks.cli bench "$@" --device cuda --json "$OUT/$PREFIX$name.json" \
    || echo "=== $name FAILED or timed out (exit $?)"
  echo "=== $name took $((SECONDS - start)) s"
}

run() {  # NAME: one of the runs below
  case $1 in
    # mid-size (32 M parameters; prefix 278 tokens, suffix 52): fp32 and bf16 with training and memory, then compiled
    mid_fp32) bench "$1" 120 mid_llava3d_deepfusion --train-batch 32 --repeats 20 ;;
    mid_bf16) bench "$1" 120 mid_llava3d_deepfusion --dtype bf16 --train-batch 32 --repeats 20 ;;
    mid_bf16_compiled) bench "$1" 120 mid_llava3d_deepfusion --dtype bf16 --compile --no-train --no-memory --repeats 20 ;;
    mid_bf16_compiled_b16) bench "$1" 120 mid_llava3d_deepfusion --dtype bf16 --compile --batch 16 --no-train --no-memory --repeats 20 ;;
    # full size (LLaMA-7B base, SigLIP-so400m, 2048-wide expert at every 4th layer; prefix 751, suffix 52): inference
    full_bf16) bench "$1" 150 llava3d_deepfusion policy.horizon=50 --dtype bf16 --no-train --repeats 10 ;;
    full_bf16_compiled) bench "$1" 200 llava3d_deepfusion policy.horizon=50 --dtype bf16 --compile --no-train --no-memory --repeats 10 ;;
    *) echo "unknown run $1" ;;
  esac
}

for name in "${@:-mid_fp32 mid_bf16 mid_bf16_compiled mid_bf16_compiled_b16 full_bf16 full_bf16_compiled}"; do
  for one in $name; do run "$one"; done
done
