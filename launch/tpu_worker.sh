#!/usr/bin/env bash
# Runs on every worker of a Cloud TPU VM slice; launch/tpu_vm.sh copies it there (as
# ~/sslocal_worker.sh) and calls it through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   tpu_worker.sh install REPO_URL REPO_REF PYTHON_VERSION LAUNCH_DIR
#       A Python that sslocal supports (>= 3.11, setup.py), a clone of sslocal at REPO_REF
#       (empty: the default branch) and a venv with sslocal[gcs] and jax[tpu]; then checks that
#       this worker (its service account, not the user who launched) can write to the bucket.
#       The TPU runtimes are Ubuntu 22.04 images (tpu-ubuntu2204-base, tpu_vm.sh's default),
#       whose python3 is 3.10: then python$PYTHON_VERSION comes from the deadsnakes PPA, the
#       usual source of newer CPython builds for Ubuntu LTS releases. A runtime whose python3
#       is already >= 3.11 is used as it is.
#   tpu_worker.sh start LAUNCH_DIR LOG_SYNC_SECONDS CONFIG WORKDIR [sslocal train flags]
#       Starts `run` detached from the ssh session (nohup + setsid, no terminal, no open
#       descriptors to ssh) and returns at once: a dropped connection does not stop training.
#   tpu_worker.sh run LAUNCH_DIR LOG_SYNC_SECONDS CONFIG WORKDIR [sslocal train flags]
#       `sslocal train`; its output goes to ~/sslocal-train.log, copied to
#       LAUNCH_DIR/worker-<id>.log (in the bucket) every LOG_SYNC_SECONDS and at the end. Then
#       it writes the empty object LAUNCH_DIR/worker-<id>.exit-<status>: tpu_vm.sh waits for
#       worker-0.exit-0 (0: finished; 143: SIGTERM, checkpoint saved, the same command resumes).
set -euo pipefail

SSLOCAL_DIR=${SSLOCAL_DIR:-$HOME/sslocal}

worker_id() {
  # The slice's worker index (process 0 is worker 0): TPU_WORKER_ID where it is set, else the
  # metadata server's agent-worker-number (what JAX reads), else the host name.
  if [[ -n ${TPU_WORKER_ID:-} ]]; then
    echo "$TPU_WORKER_ID"
  elif ! curl -sf -H 'Metadata-Flavor: Google' \
      http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number; then
    hostname
  fi
}

supported_python() {
  # Prints the first of python$1, python3 that is >= 3.11; fails if neither is.
  local candidate
  for candidate in "python$1" python3; do
    if command -v "$candidate" >/dev/null &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

install() {
  local repo=${1:?REPO_URL} ref=${2-} version=${3:-3.11} launch_dir=${4:?LAUNCH_DIR} python
  local probe id
  id=$(worker_id)
  if ! python=$(supported_python "$version"); then
    echo "worker $id: python3 is $(python3 -V 2>&1); installing python$version (deadsnakes)"
    # The lock timeout waits for the unattended upgrades that run when a TPU VM boots.
    local apt=(sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 -y -q)
    if ! command -v add-apt-repository >/dev/null; then
      "${apt[@]}" update
      "${apt[@]}" install software-properties-common
    fi
    sudo add-apt-repository -y -n ppa:deadsnakes/ppa
    "${apt[@]}" update
    "${apt[@]}" install "python$version" "python$version-venv" "python$version-dev"
    if ! python=$(supported_python "$version"); then
      echo "worker $id: no python >= 3.11 after installing python$version" >&2
      exit 1
    fi
  fi
  rm -rf "$SSLOCAL_DIR"
  git clone --quiet "$repo" "$SSLOCAL_DIR"
  if [[ -n $ref ]]; then
    git -C "$SSLOCAL_DIR" checkout --quiet "$ref"
  fi
  "$python" -m venv "$SSLOCAL_DIR/.venv"
  "$SSLOCAL_DIR/.venv/bin/pip" install --quiet --upgrade pip
  # [gcs]: workdir and data in a bucket; jax[tpu]: libtpu matching the jax that is installed.
  "$SSLOCAL_DIR/.venv/bin/pip" install --quiet -e "${SSLOCAL_DIR}[gcs]" "jax[tpu]"
  probe=$(mktemp)
  if ! gcloud storage cp "$probe" "$launch_dir/worker-$id.write-check" >/dev/null ||
      ! gcloud storage rm "$launch_dir/worker-$id.write-check" >/dev/null; then
    rm -f "$probe"
    echo "worker $id: cannot write to $launch_dir: give the slice's service account write" \
      "access to the bucket" >&2
    exit 1
  fi
  rm -f "$probe"
  echo "worker $id: sslocal installed with $("$SSLOCAL_DIR/.venv/bin/python" -V 2>&1)"
}

start() {
  local id
  id=$(worker_id)
  nohup setsid bash "${BASH_SOURCE[0]}" run "$@" >"$HOME/sslocal-worker.out" 2>&1 </dev/null &
  echo "worker $id: training started in the background (pid $!)"
}

run() {
  local launch_dir=${1:?LAUNCH_DIR} sync=${2:?LOG_SYNC_SECONDS} config=${3:?CONFIG}
  local workdir=${4:?WORKDIR} id log=$HOME/sslocal-train.log status=0 shipper marker
  shift 4
  id=$(worker_id)
  ship_log() { gcloud storage cp "$log" "$launch_dir/worker-$id.log" >/dev/null 2>&1 || true; }
  : >"$log"
  (while sleep "$sync"; do ship_log; done) &
  shipper=$!
  # shellcheck disable=SC1091  # the venv that install created
  . "$SSLOCAL_DIR/.venv/bin/activate"
  cd "$SSLOCAL_DIR"
  sslocal train --config "$config" --workdir "$workdir" "$@" >>"$log" 2>&1 || status=$?
  kill "$shipper" 2>/dev/null || true
  wait "$shipper" 2>/dev/null || true
  echo "worker $id: sslocal train exited with status $status at $(date -u +%FT%TZ)" >>"$log"
  ship_log
  marker=$(mktemp)
  gcloud storage cp "$marker" "$launch_dir/worker-$id.exit-$status" >/dev/null
  rm -f "$marker"
}

command=${1:?usage: tpu_worker.sh install|start|run ARGS...}
shift
case $command in
  install | start | run) "$command" "$@" ;;
  *) echo "tpu_worker.sh: unknown command $command" >&2; exit 2 ;;
esac
