#!/usr/bin/env bash
# Launch a selfaug-jax experiment on a Cloud TPU VM or pod slice, then fetch the results from worker 0.
#
# Steps: (1) create the TPU VM unless it exists (gcloud compute tpus tpu-vm describe/create), wait for READY;
# (2) ship the code to every worker (tarball of this checkout via scp --worker=all, or git clone --git-url);
# (3) install Python 3.11 (uv), jax[tpu] at the version pinned in requirements.txt, then requirements.txt;
# (4) run `python experiments/run.py --config CONFIG --mesh ... --output-dir runs/NAME` on all workers at once
#     (multi-host: the runner calls jax.distributed.initialize(), which auto-detects TPU pod workers);
# (5) copy runs/NAME back from worker 0 into ./runs/NAME; optionally delete the VM.
#
# Examples:
#   experiments/tpu/launch.sh --project my-proj --zone us-central2-b --accelerator-type v4-32 \
#       --config experiments/configs/tpu-v4-32-7b.yaml --dry-run
#   TPU_PROJECT=my-proj TPU_ZONE=us-west4-a experiments/tpu/launch.sh --config experiments/configs/tpu-v5e-8.yaml
# Everything after `--` is passed to run.py unchanged.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: experiments/tpu/launch.sh --config PATH [options] [-- extra run.py args]

Options (environment variable in brackets):
  --config PATH            experiment preset YAML, relative to the repo root      [TPU_CONFIG]
  --project ID             GCP project                                           [TPU_PROJECT]
  --zone ZONE              GCP zone, e.g. us-central2-b (v4), us-west4-a (v5e)   [TPU_ZONE]
                           (default: launcher.zone in the config)
  --accelerator-type T     e.g. v5litepod-8, v4-32, v5p-8                        [TPU_ACCELERATOR_TYPE]
                           (default: launcher.accelerator_type in the config, else v5litepod-8)
  --name NAME              TPU VM name (default selfaug-<accelerator-type>)      [TPU_NAME]
  --version V              TPU software version (default: by accelerator type)   [TPU_VERSION]
  --mesh SPEC              mesh override passed to run.py, e.g. data=4,fsdp=4,tensor=1
                           (default: the config's mesh: block)                   [TPU_MESH]
  --run-name NAME          output folder name under runs/ (default: config stem)  [TPU_RUN_NAME]
  --git-url URL            clone this repository on the workers instead of copying this checkout
  --git-ref REF            branch / tag / commit to check out with --git-url (default main)
  --spot                   create a Spot TPU VM
  --skip-setup             code and environment are already on the workers (re-runs)
  --detach                 start run.py with nohup and return (then --fetch-only when it is done)
  --fetch-only             only copy runs/RUN_NAME back from worker 0
  --delete                 delete the TPU VM at the end
  --dry-run                print every command instead of running it (no gcloud calls)
  -h, --help               this help
EOF
}

CONFIG="${TPU_CONFIG:-}"
PROJECT="${TPU_PROJECT:-}"
ZONE="${TPU_ZONE:-}"
ACCEL="${TPU_ACCELERATOR_TYPE:-}"
NAME="${TPU_NAME:-}"
VERSION="${TPU_VERSION:-}"
MESH="${TPU_MESH:-}"
RUN_NAME="${TPU_RUN_NAME:-}"
GIT_URL=""
GIT_REF="main"
SPOT=0
SKIP_SETUP=0
DETACH=0
FETCH_ONLY=0
DELETE=0
DRY_RUN=0
EXTRA_ARGS=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "launch.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCEL="$2"; shift 2 ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --mesh) need_value "$@"; MESH="$2"; shift 2 ;;
    --run-name) need_value "$@"; RUN_NAME="$2"; shift 2 ;;
    --git-url) need_value "$@"; GIT_URL="$2"; shift 2 ;;
    --git-ref) need_value "$@"; GIT_REF="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --skip-setup) SKIP_SETUP=1; shift ;;
    --detach) DETACH=1; shift ;;
    --fetch-only) FETCH_ONLY=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) echo "launch.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[[ -n "$CONFIG" ]] || { echo "launch.sh: --config is required (or TPU_CONFIG)" >&2; exit 2; }
[[ -f "$REPO_ROOT/$CONFIG" ]] || { echo "launch.sh: config '$CONFIG' not found under $REPO_ROOT" >&2; exit 2; }
RUN_NAME="${RUN_NAME:-$(basename "$CONFIG" .yaml)}"

# Defaults from the config: `mesh: {...}` and the launcher-only block `launcher: {accelerator_type, zone}`.
read_config() {
  python3 - "$REPO_ROOT/$CONFIG" <<'PY' 2>/dev/null || true
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1])) or {}
mesh = cfg.get("mesh") or {}
launcher = cfg.get("launcher") or {}
print(",".join(f"{k}={v}" for k, v in mesh.items()))
print(launcher.get("accelerator_type", ""))
print(launcher.get("zone", ""))
PY
}
{ read -r CFG_MESH; read -r CFG_ACCEL; read -r CFG_ZONE; } < <(read_config; printf '\n\n\n') || true
MESH="${MESH:-$CFG_MESH}"
ACCEL="${ACCEL:-${CFG_ACCEL:-v5litepod-8}}"
ZONE="${ZONE:-$CFG_ZONE}"
[[ -n "$ZONE" ]] || { echo "launch.sh: --zone is required (or TPU_ZONE, or launcher.zone in the config)" >&2; exit 2; }
NAME="${NAME:-selfaug-${ACCEL}}"

if [[ -z "$VERSION" ]]; then  # https://cloud.google.com/tpu/docs/runtimes (JAX / PyTorch images)
  case "$ACCEL" in
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    *) VERSION="tpu-ubuntu2204-base" ;;
  esac
fi

# Chips in the slice: v2/v3/v4/v5p names count TensorCores (2 per chip), v5e/v6e names count chips.
N_CORES="${ACCEL##*-}"
if [[ -n "$MESH" && "$N_CORES" =~ ^[0-9]+$ ]]; then
  case "$ACCEL" in v5litepod-*|v5e-*|v6e-*) N_CHIPS="$N_CORES" ;; *) N_CHIPS=$(( N_CORES / 2 )) ;; esac
  MESH_SIZE=1
  for kv in ${MESH//,/ }; do MESH_SIZE=$(( MESH_SIZE * ${kv#*=} )); done
  if [[ "$MESH_SIZE" -ne "$N_CHIPS" ]]; then
    echo "launch.sh: mesh $MESH has $MESH_SIZE devices but $ACCEL has $N_CHIPS chips" >&2; exit 2
  fi
fi

JAX_VERSION="$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' "$REPO_ROOT/requirements.txt" | head -n1)"
[[ -n "$JAX_VERSION" ]] || { echo "launch.sh: no 'jax==X' pin in requirements.txt" >&2; exit 2; }

GCLOUD_COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_COMMON+=(--project="$PROJECT")
REMOTE_DIR="selfaug-jax"  # relative to the remote home directory

q() {  # shell-quote for the remote command line, leaving plain words readable
  if [[ "$1" =~ ^[A-Za-z0-9_./=,:+@-]+$ ]]; then printf '%s' "$1"; else printf '%q' "$1"; fi
}

run() {  # print (dry run) or execute one command
  if [[ $DRY_RUN -eq 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
log() { echo "[launch.sh] $*" >&2; }

ssh_all() { run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_COMMON[@]}" --worker=all --command="$1"; }

create_or_reuse() {
  if [[ $DRY_RUN -eq 1 ]]; then
    log "dry run: would describe $NAME and create it when absent"
    run gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_COMMON[@]}" --format='value(state)'
  elif gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_COMMON[@]}" --format='value(state)' >/dev/null 2>&1; then
    log "reusing TPU VM $NAME"
    return 0
  fi
  local create=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_COMMON[@]}"
                --accelerator-type="$ACCEL" --version="$VERSION")
  [[ $SPOT -eq 1 ]] && create+=(--spot)
  run "${create[@]}"
  [[ $DRY_RUN -eq 1 ]] && return 0
  local state=""
  for _ in $(seq 1 60); do
    state="$(gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_COMMON[@]}" --format='value(state)')"
    [[ "$state" == "READY" ]] && return 0
    log "waiting for $NAME (state: ${state:-unknown})"; sleep 10
  done
  echo "launch.sh: $NAME not READY after 10 minutes (state: $state)" >&2; exit 1
}

ship_code() {
  if [[ -n "$GIT_URL" ]]; then
    ssh_all "set -e; if [ -d $REMOTE_DIR/.git ]; then cd $REMOTE_DIR && git fetch -q origin; \
else git clone -q $(q "$GIT_URL") $REMOTE_DIR && cd $REMOTE_DIR; fi; \
git checkout -q --detach origin/$(q "$GIT_REF") 2>/dev/null || git checkout -q --detach $(q "$GIT_REF")"
    return 0
  fi
  local tarball="/tmp/selfaug-jax-${NAME}.tar.gz"
  run tar -C "$REPO_ROOT" -czf "$tarball" --exclude=.git --exclude=runs --exclude=outputs \
      --exclude=__pycache__ --exclude=.pytest_cache --exclude='*.pyc' --exclude=.venv .
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:selfaug-jax.tar.gz" "${GCLOUD_COMMON[@]}" --worker=all
  ssh_all "set -e; mkdir -p $REMOTE_DIR && tar -xzf selfaug-jax.tar.gz -C $REMOTE_DIR && rm selfaug-jax.tar.gz"
}

setup_env() {
  # TPU images ship Python 3.10; the pins need 3.11, so uv provides it in ~/venv on every worker.
  ssh_all "set -e; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
export PATH=\$HOME/.local/bin:\$PATH; [ -x \$HOME/venv/bin/python ] || uv venv --python 3.11 \$HOME/venv; \
cd $REMOTE_DIR && VIRTUAL_ENV=\$HOME/venv uv pip install -q 'jax[tpu]==$JAX_VERSION' && \
VIRTUAL_ENV=\$HOME/venv uv pip install -q -r requirements.txt && \
\$HOME/venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
}

run_experiment() {
  local cmd="\$HOME/venv/bin/python experiments/run.py --config $(q "$CONFIG")"
  [[ -n "$MESH" ]] && cmd+=" --mesh $(q "$MESH")"
  cmd+=" --output-dir runs/$(q "$RUN_NAME")"
  cmd+=" --distributed"  # jax.distributed.initialize(): auto-detects the TPU workers (one process per host)
  local arg
  for arg in "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"; do cmd+=" $(q "$arg")"; done
  local logfile="\$HOME/run-$(q "$RUN_NAME").log"
  if [[ $DETACH -eq 1 ]]; then  # survives a dropped SSH session; fetch later with --fetch-only
    ssh_all "cd $REMOTE_DIR && nohup $cmd > $logfile 2>&1 < /dev/null & echo started, log: $logfile"
  else
    ssh_all "set -o pipefail; cd $REMOTE_DIR && $cmd 2>&1 | tee -a $logfile"
  fi
}

fetch_results() {
  run mkdir -p "$REPO_ROOT/runs"
  run gcloud compute tpus tpu-vm scp "$NAME:$REMOTE_DIR/runs/$RUN_NAME" "$REPO_ROOT/runs/" \
      "${GCLOUD_COMMON[@]}" --worker=0 --recurse
  log "results in runs/$RUN_NAME (report.md, summary.json, *.png)"
}

log "TPU $NAME ($ACCEL, $VERSION) zone $ZONE; config $CONFIG; mesh ${MESH:-<from config>}; jax[tpu]==$JAX_VERSION"
if [[ $FETCH_ONLY -eq 0 ]]; then
  create_or_reuse
  if [[ $SKIP_SETUP -eq 0 ]]; then ship_code; setup_env; fi
  run_experiment
fi
if [[ $DETACH -eq 1 && $FETCH_ONLY -eq 0 ]]; then
  log "detached; when it finishes: $0 --config $CONFIG --zone $ZONE --name $NAME --run-name $RUN_NAME --fetch-only"
  exit 0
fi
fetch_results
if [[ $DELETE -eq 1 ]]; then run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_COMMON[@]}" --quiet; fi
