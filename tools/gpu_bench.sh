#!/usr/bin/env bash
# The GPU measurements of the speed issue, as one prepared script for a short lease on one GPU:
#
#   bash tools/gpu_bench.sh OUT_DIR [SECONDS]
#
# Runs, in priority order, each under its own time limit so that one slow compile cannot take the others with it,
# and stops starting new runs when the time budget (default 540 s) is spent:
#   1. ViT-B/16 384x128 batch 128, bf16, layers unrolled (the default), in one process: the full objective and
#      the align-only step (restoration off), each with XLA's attention and with cuDNN's fused attention; then the
#      full objective as one program (--split=0) beside the default two (gradient, update).
#   1b. The full objective with the residual-gradient barrier between blocks forced on (models/layers.py; on by
#      default on CPU only, where it made the ViT-B/16 step faster), and with the 'einsum' attention kernel (the
#      CPU default, faster than 'xla' there), against the default, in one process.
#   2. cuDNN's attention against XLA's, both bf16, against a float32 reference (tests/models/test_cudnn_attention.py,
#      run as a script: the accelerator image has no pytest).
#   4. ViT-L/14 at 378x126 (the vit-l14 variant's shapes), batch 128, scan + full remat.
#   5. The full ViT-B/16 step again in a new process: compile time with the persistent compilation cache warm.
#   6. ViT-B/16 with its layers rolled (--scan=1: one layer compiled, 1.6x faster compiles on CPU but slower CPU
#      steps, so not the default there), then rolled + full remat at batch 128 and 256.
#   7. Gradient caching (--micro_batch, config.micro_batch): ViT-B/16 batch 128 at once against chunks of 32 in one
#      process (the time cost: the extra forward pass, 1.3x expected), then batch 1024 in chunks of 64 (its
#      peak_device_mib against the one-shot step's at batch 128: docs/gradcache.md has the AOT estimates), and
#      ViT-L/14 batch 128 (scan + full remat) in chunks of 16, whose peak should fit a 24 GB card.
# GPU_BENCH_ONLY=REGEX runs only the steps whose name matches (e.g. GPU_BENCH_ONLY=^7 for the micro-batch rows).
# Each run writes one JSON line per variant to OUT_DIR/<n>_<name>.jsonl; everything printed goes to OUT_DIR/log.
# Needs no TensorFlow, ml_collections or clu (the accelerator images lack them).
set -u
out=${1:?usage: tools/gpu_bench.sh OUT_DIR [SECONDS]}
budget=${2:-540}
mkdir -p "$out"
log="$out/log"
start=$(date +%s)
export PYTHONUNBUFFERED=1
export UIT_JAX_CACHE=${UIT_JAX_CACHE:-/tmp/uit_jax_cache}
py=${PYTHON:-python3}

step() {  # step NAME CAP_SECONDS ARGS...: runs one command under min(CAP, what is left of the budget)
  local name=$1 cap=$2
  shift 2
  if [[ -n ${GPU_BENCH_ONLY:-} && ! $name =~ $GPU_BENCH_ONLY ]]; then
    return
  fi
  local left=$((budget - ($(date +%s) - start)))
  if ((left < 20)); then
    echo "== $name: skipped, $left s of the budget left" | tee -a "$log"
    return
  fi
  local limit=$((cap < left ? cap : left))
  echo "== $name (limit $limit s): $*" | tee -a "$log"
  local t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee -a "$log" | grep -E '^\{|^\||took|s +\{' >"$out/$name.jsonl"
  echo "== $name: rc ${PIPESTATUS[0]} after $(($(date +%s) - t0)) s" | tee -a "$log"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  $py -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} 2>&1 | tee -a "$log"

b16_batch=128
b16=(tools/benchmark.py --preset=vit-b16 --image_size=384,128 --batch=$b16_batch --dtype=bfloat16 --steps=20)
l14=(tools/benchmark.py --preset=vit-l14 --image_size=378,126 --batch=128 --dtype=bfloat16 --steps=10)
check=(-m tests.models.test_cudnn_attention)
if [[ -n ${GPU_BENCH_SMOKE:-} ]]; then  # the same flow at toy shapes, to check the script on a CPU first
  b16_batch=8
  b16=(tools/benchmark.py --preset=tiny --image_size=64,32 --batch=$b16_batch --dtype=float32 --steps=2)
  l14=("${b16[@]}")
fi
# Caps from two leases on one H200 (2026-11-28): the step compiles in 93-114 s (full) and 50 s (align-only); the
# parameter init, with the benchmark's hardware PRNG, in 10 s (78-88 s with threefry). cuDNN rows first: they
# are the new measurement, and the XLA rows give the ratio in the same process.
step 1_b16_attention 460 $py "${b16[@]}" --table='full,attention=cudnn;full;align,attention=cudnn;align;full,split=0'
step 1b_b16_cpu_defaults 300 $py "${b16[@]}" --table='full;full,grad_barrier=1;full,attention=einsum'
step 2_check_attention 150 $py "${check[@]}"
step 4_l14 240 $py "${l14[@]}" --scan=1 --remat=full
step 5_b16_cached 60 $py "${b16[@]}"
step 6_b16_scan 260 $py "${b16[@]}" --table='scan=1;scan=1,remat=full;scan=1,remat=full,batch=256'
step 7_b16_micro_batch 300 $py "${b16[@]}" --table="micro_batch=0;micro_batch=$((b16_batch / 4))"
step 7b_b16_batch1024 200 $py "${b16[@]}" --batch=$((b16_batch * 8)) --micro_batch=$((b16_batch / 2)) --steps=3
step 7c_l14_micro_batch 240 $py "${l14[@]}" --scan=1 --remat=full --micro_batch=$((b16_batch / 8)) --steps=3
echo "== total $(($(date +%s) - start)) s" | tee -a "$log"
