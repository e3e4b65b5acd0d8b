#!/usr/bin/env bash
# Every issue-16 acceptance figure, each configuration in a fresh process, on a quiet machine.
#
#   bash bench/acceptance.sh              # the full set (47 min on the 2-core VM, session 15: 3 rounds of each PyTorch comparison)
#   QUICK=1 bash bench/acceptance.sh      # every mode on small settings (2 layers, short sequences): a few minutes
#   SKIP="long-context abstract-7b" bash bench/acceptance.sh   # leave out the named configurations (logged as skipped)
#   VROUNDS=5 DROUNDS=3 bash bench/acceptance.sh  # more interleaved rounds of the PyTorch / dtype comparisons
#
# Records are appended to bench/results/{step_cpu,vs_torch_cpu,dtypes_cpu,abstract_7b}.jsonl, all tagged
# acceptance-<UTC time> (quick runs: quick-<UTC time>); the log goes to bench/results/acceptance_<tag>.log and the
# summary table (python bench/step.py --summary TAG) is printed at the end and saved as acceptance_<tag>.md.
# A failing configuration is reported and the script carries on with the next one.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
if [ "${QUICK:-0}" = 1 ]; then
  TAG="quick-$STAMP"; L="--num-layers 2"; SEQ=64; LONG=512; STEPS=2; DSTEPS=4; ABS="--num-layers 1 --seq 512"
  VROUNDS=${VROUNDS:-1}; DROUNDS=${DROUNDS:-1}
else
  TAG="acceptance-$STAMP"; L=""; SEQ=256; LONG=8192; STEPS=5; DSTEPS=19; ABS=""
  # interleaved rounds of the side-by-side speed ratios (their medians, with the range)
  VROUNDS=${VROUNDS:-3}; DROUNDS=${DROUNDS:-2}
fi
LOG=bench/results/acceptance_$TAG.log
FAILED=()
run() {  # run NAME CMD...: one configuration, its own process; the log keeps stderr and stdout
  local name=$1; shift
  if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "=== $name: skipped (SKIP)" | tee -a "$LOG"; return; fi
  echo "=== $(date -u +%H:%M:%S) $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  if "$@" --tag "$TAG" >>"$LOG" 2>&1; then
    echo "    ok in $((SECONDS - t0)) s" | tee -a "$LOG"
  else
    echo "    FAILED (exit $?) after $((SECONDS - t0)) s; see $LOG" | tee -a "$LOG"; FAILED+=("$name")
  fi
}
echo "acceptance run $TAG on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) ($(nproc) CPUs); load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$LOG"

# 1. this session's peak FLOP/s (MFU divides by it), fp32 and bf16
run peak-fp32 $PY bench/step.py --peak-only --dtype float32
run peak-bf16 $PY bench/step.py --peak-only --dtype bfloat16
# 2. selfaug / lora vs the PyTorch HF + PEFT released step, fp32, 4 x 256: tokens/s, step time, peak RSS, MFU,
#    and (jax side) the compile time of the full model's step; VROUNDS interleaved rounds (median and range)
run vs-torch-selfaug $PY bench/step.py --vs-torch --rounds $VROUNDS --method selfaug --batch 4 --seq $SEQ --steps $STEPS $L
run vs-torch-lora $PY bench/step.py --vs-torch --rounds $VROUNDS --method lora --batch 4 --seq $SEQ --steps $STEPS $L
# 3. compile in depth: the same step truncated to 2 layers, VROUNDS fresh processes (the 30-layer compile_s comes
#    from step 2's VROUNDS jax processes; the summary divides their medians)
for i in $(seq "$VROUNDS"); do
  run compile-2-layers $PY bench/step.py --method selfaug --batch 4 --seq $SEQ --steps 1 --num-layers 2
done
# 4. bf16 fast path vs fp32: tokens/s and losses over 20 steps (1 + DSTEPS)
run bf16-vs-fp32 $PY bench/step.py --compare-dtypes --rounds $DROUNDS --method selfaug --batch 4 --seq $SEQ \
  --steps $DSTEPS $L
# 5. long context: selfaug at 1 x 8192 (time and RSS; must stay within 24 GB)
avail_gb=$(awk '/MemAvailable/ {printf "%d", $2 / 1e6}' /proc/meminfo)
echo "    MemAvailable before the long run: ${avail_gb} GB" | tee -a "$LOG"
run long-context $PY bench/step.py --method selfaug --batch 1 --seq $LONG --steps 1 $L
# 6. the 7B-shaped abstract compile on 8 fake CPU devices, every shipped 7B preset's mesh
run abstract-7b $PY bench/step.py --abstract $ABS

echo "=== summary ($TAG)" | tee -a "$LOG"
$PY bench/step.py --summary "$TAG" | tee "bench/results/acceptance_$TAG.md" | tee -a "$LOG"
if [ ${#FAILED[@]} -gt 0 ]; then echo "FAILED configurations: ${FAILED[*]}" | tee -a "$LOG"; exit 1; fi
