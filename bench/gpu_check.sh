#!/usr/bin/env bash
# Issue 16 item 8: the GPU check, one prepared script for a lent accelerator (about 5-8 minutes on one H200).
#
#   bash bench/gpu_check.sh            # writes bench/results/gpu/ (or $OUT when set, as on the device machine)
#
# 1. the machine: GPU, driver, jax / flax / optax versions (gpu_env.txt);
# 2. attention kernels on the GPU -- cuDNN flash attention (what model.attention_impl=auto picks there), jax's XLA
#    dot_product and this project's xla_chunked -- values and gradients against a float32 reference, and their
#    forward + backward time at Qwen2.5-0.5B's attention shape, 4 x 2048 (bench/gpu_attention.py;
#    gpu_attention.jsonl);
# 3. the bf16 matmul peak of this device (8192^3, best of 5), the divisor of MFU (gpu_peak.json);
# 4. bf16 LoRA and SelfAug train steps of a Qwen2.5-0.5B-shaped model with random weights (bench/step.py --shape;
#    no checkpoint can be downloaded there) at seq 2048: step time, tokens/s, MFU, compile time, device peak memory
#    (step_gpu.jsonl), auto (cuDNN) attention first, then xla_chunked and a larger batch.
# 5. levers on the same step (remat none, scan unroll 1), memory at remat full and at 1 x 8192 (section "memory",
#    not in the default list), and a kernel profile of the selfaug step
#    (bench/profile_step.py: device time per category, gpu_profile.txt; the trace's .xplane.pb is copied to $OUT).
# SECTIONS picks parts (default "env attention peak steps levers profile"), e.g. SECTIONS="env levers profile".
# Each run has its own timeout, and every result is appended as it lands, so a cut-short call still returns what
# finished. The machine's own jax / flax / optax are used (on 2026-12-04: jax 0.11.2, flax 0.12.10, optax 0.2.8;
# this project's pin flax 0.12.8 does not import on jax 0.11.2: jax.experimental.hijax has no HiPrimitive there).
# Wheels in .whl/ (a package the machine lacks, carried as the device README says) are installed first if present.
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 SELFAUG_JAX_CACHE=${SELFAUG_JAX_CACHE:-/tmp/selfaug_jax_cache}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
STEP_TIMEOUT=${STEP_TIMEOUT:-110}
SEQ=${SEQ:-2048}
SECTIONS=${SECTIONS:-env attention peak steps levers profile}
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
has env && {
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  $PY -c 'import sys, jax, flax, optax; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())' 2>&1
} | tee "$OUT/gpu_env.txt"
has attention && timeout 120 $PY bench/gpu_attention.py --seq "$SEQ" --out "$OUT/gpu_attention.jsonl" 2>&1 | tail -n 40
has peak && timeout 60 $PY bench/step.py --peak-only --dtype bfloat16 --peak-n 8192 2>&1 | tail -n 1 \
  | tee "$OUT/gpu_peak.json"
run() {  # method batch attention_impl [more bench/step.py options]
  echo "== $*"
  timeout "$STEP_TIMEOUT" $PY bench/step.py --method "$1" --shape qwen2.5-0.5b --dtype bfloat16 --batch "$2" \
    --seq "$SEQ" --steps 10 --attention-impl "$3" "${@:4}" --tag gpu-check --out "$OUT/step_gpu.jsonl" 2>&1 \
    | grep -v '^{' | tail -n 4
}
if has steps; then
  run lora 8 auto
  run selfaug 8 auto
  run selfaug 8 xla_chunked
  run selfaug 16 auto
fi
if has levers; then
  run selfaug 8 auto --remat none
  run lora 8 auto --remat none
  run selfaug 8 auto --scan-unroll 1
fi
if has memory; then  # the TPU / GPU presets' remat=full, set against docs/SCALING.md's arithmetic (bench/abstract.py)
  run selfaug 8 auto --remat full
  SEQ=8192 run selfaug 1 auto --remat full
  SEQ=8192 run selfaug 1 auto
fi
if has profile; then
  # kernels traced one by one, not as CUDA-graph command buffers (which the profile cannot attribute)
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" timeout "$STEP_TIMEOUT" $PY bench/profile_step.py \
    --shape qwen2.5-0.5b --num-layers 24 --dtype bfloat16 --batch 8 --seq "$SEQ" --steps 2 --top 60 \
    --trace-out "$OUT" > "$OUT/gpu_profile.txt" 2>&1
  head -n 40 "$OUT/gpu_profile.txt"
fi
[ -f "$OUT/step_gpu.jsonl" ] && $PY bench/step.py --table "$OUT/step_gpu.jsonl" 2>&1 | tee "$OUT/step_gpu_table.md"
