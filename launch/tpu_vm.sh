#!/usr/bin/env bash
# Train on a Cloud TPU VM slice, with the workdir (checkpoints, logs) in a bucket:
#
#   PROJECT=my-project ZONE=us-central2-b TPU_TYPE=v4-32 BUCKET=gs://my-bucket \
#     REPO_URL=https://github.com/<you>/sslocal.git DATA_DIR=gs://my-bucket/tfds \
#     launch/tpu_vm.sh configs/vggsound144k.py runs/vggsound144k [extra sslocal train flags]
#
# 1. checks that the bucket is writable (and DATA_DIR listable) before anything is paid for;
# 2. creates a queued resource and waits until it is ACTIVE (FAILED / SUSPENDED / DELETING
#    states and QUEUE_TIMEOUT end the wait with an error);
# 3. installs sslocal on every worker (launch/tpu_worker.sh install, which also checks that the
#    workers can write to the bucket: their service account, not yours): the default runtime,
#    tpu-ubuntu2204-base, is Ubuntu 22.04 with Python 3.10 and sslocal needs >= 3.11, so the
#    workers get python$PYTHON_VERSION (3.11, the version the test suite runs on) from the
#    deadsnakes PPA and a venv with sslocal[gcs] and jax[tpu]. The runtime stays the generic
#    base image rather than one per TPU generation; one whose python3 is >= 3.11 is used as is;
# 4. starts `sslocal train` on every worker detached from the ssh session (nohup + setsid;
#    jax.distributed.initialize() finds the slice from the metadata server), its logs copied to
#    the bucket: $WORKDIR/launch/$NAME/worker-<id>.log;
# 5. waits for the run to finish: worker-0.exit-0 in that folder (each worker writes
#    worker-<id>.exit-<status> when `sslocal train` ends), then confirms the checkpoints in
#    $WORKDIR/checkpoints/ (and final_metrics.json, which sslocal writes at the end of a run
#    with test sets);
# 6. deletes the slice (DELETE_SLICE below).
#
# The exit trap is set before the queue wait: until training has started (queued, provisioning,
# installing, a FAILED resource, the timeout, Ctrl-C) the queued resource is deleted on exit.
# Once training runs on the workers, leaving this script (Ctrl-C, a lost connection, a failed
# or preempted run, RUN_TIMEOUT) keeps the slice unless DELETE_SLICE=always: training goes on
# without this script, and the script prints how to follow it and how to delete the slice.
# A preempted run (status 143) saved its checkpoint in the bucket: rerun the same command with
# the same WORKDIR to resume it on a new slice.
#
# Required: PROJECT, ZONE, REPO_URL (a clone of sslocal the workers can reach), BUCKET
#   (gs://...; or give WORKDIR as a full gs:// path).
# Optional: TPU_TYPE (v4-32), RUNTIME (tpu-ubuntu2204-base), NAME (sslocal-<time>), REPO_REF
#   (branch, tag or commit), DATA_DIR (gs://... prepared TFDS datasets: passed as
#   --config.data_dir), SPOT=1 (a Spot slice), PYTHON_VERSION (3.11),
#   DELETE_SLICE: finished (the default: once the finished run is confirmed in the bucket, or
#   when training never started) | always (on every exit) | never,
#   POLL_SECONDS (30) and QUEUE_TIMEOUT (21600 s) for the queue, RUN_POLL_SECONDS (120) and
#   RUN_TIMEOUT (0: none) for the run, LOG_SYNC_SECONDS (60) for the log copies.
# (Empty arrays are expanded as ${a[@]+"${a[@]}"}: set -u rejects "${a[@]}" in bash < 4.4.)
set -euo pipefail

usage='usage: tpu_vm.sh CONFIG WORKDIR [extra sslocal train flags]'
CONFIG=${1:?$usage}
WORKDIR=${2:?$usage}
shift 2
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}"
: "${REPO_URL:?set REPO_URL to a clone of sslocal that the workers can reach (git URL)}"
TPU_TYPE=${TPU_TYPE:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
NAME=${NAME:-sslocal-$(date +%Y%m%d-%H%M%S)}
REPO_REF=${REPO_REF:-}
DATA_DIR=${DATA_DIR:-}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
DELETE_SLICE=${DELETE_SLICE:-finished}
POLL_SECONDS=${POLL_SECONDS:-30}
QUEUE_TIMEOUT=${QUEUE_TIMEOUT:-21600}
RUN_POLL_SECONDS=${RUN_POLL_SECONDS:-120}
RUN_TIMEOUT=${RUN_TIMEOUT:-0}
LOG_SYNC_SECONDS=${LOG_SYNC_SECONDS:-60}
case $DELETE_SLICE in
  finished | always | never) ;;
  *) echo "tpu_vm.sh: DELETE_SLICE must be finished, always or never (got $DELETE_SLICE)" >&2; exit 2 ;;
esac

if [[ $WORKDIR == gs://* ]]; then
  RUN=$WORKDIR
else
  : "${BUCKET:?set BUCKET (gs://...) or give WORKDIR as a gs:// path}"
  RUN=${BUCKET%/}/$WORKDIR
fi
if [[ $RUN != gs://* ]]; then
  echo "tpu_vm.sh: the workdir must be in a bucket (gs://...), not $RUN: a worker's disk" \
    "goes with the slice" >&2
  exit 2
fi
LAUNCH_DIR=$RUN/launch/$NAME
train_flags=("$@")
if [[ -n $DATA_DIR ]]; then
  train_flags=("--config.data_dir=$DATA_DIR" ${train_flags[@]+"${train_flags[@]}"})
fi
where=(--project="$PROJECT" --zone="$ZONE")
log() { echo "tpu_vm.sh: $*" >&2; }

# 1. The bucket, before the slice is paid for.
probe=$(mktemp)
echo "sslocal $NAME write check" >"$probe"
if ! gcloud storage cp "$probe" "$LAUNCH_DIR/write-check" >/dev/null; then
  rm -f "$probe"
  log "cannot write to $LAUNCH_DIR (gcloud storage cp failed): fix the bucket or its permissions"
  exit 1
fi
rm -f "$probe"
gcloud storage rm "$LAUNCH_DIR/write-check" >/dev/null
if [[ -n $DATA_DIR ]] && ! gcloud storage ls "$DATA_DIR" >/dev/null; then
  log "cannot list DATA_DIR $DATA_DIR (prepare the datasets there first: sslocal prepare)"
  exit 1
fi

# Set before the slice exists, so that every later exit goes through it.
created=0
phase=queued  # queued -> installing -> training -> finished
delete_slice() {
  log "deleting $NAME"
  gcloud compute tpus queued-resources delete "$NAME" "${where[@]}" --force --quiet
}
on_exit() {
  local status=$?
  set +e
  trap - EXIT INT TERM
  if ((created)); then
    if [[ $DELETE_SLICE == always ]] ||
        { [[ $DELETE_SLICE == finished ]] && [[ $phase != training ]]; }; then
      if ! delete_slice; then
        log "could not delete $NAME: gcloud compute tpus queued-resources delete $NAME" \
          "${where[*]} --force --quiet"
        ((status)) || status=1
      fi
    else
      log "the slice $NAME is kept (phase: $phase, DELETE_SLICE=$DELETE_SLICE)."
      log "  logs:   gcloud storage cat '$LAUNCH_DIR/worker-0.log'"
      log "  status: gcloud storage ls '$LAUNCH_DIR/'"
      log "  delete: gcloud compute tpus queued-resources delete $NAME ${where[*]} --force --quiet"
    fi
  fi
  exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 2. The queued resource, until ACTIVE.
spot=()
if [[ ${SPOT:-0} == 1 ]]; then
  spot=(--spot)
fi
created=1  # already: Ctrl-C during the request (the INT trap runs after it returns) deletes it
if ! gcloud compute tpus queued-resources create "$NAME" "${where[@]}" --node-id="$NAME" \
    --accelerator-type="$TPU_TYPE" --runtime-version="$RUNTIME" ${spot[@]+"${spot[@]}"}; then
  created=0  # refused (a name in use, no quota): nothing of this script's to delete
  log "could not create the queued resource $NAME"
  exit 1
fi
state() {
  gcloud compute tpus queued-resources describe "$NAME" "${where[@]}" \
    --format='value(state.state)' 2>/dev/null || echo UNKNOWN  # a failed poll: poll again
}
deadline=$((SECONDS + QUEUE_TIMEOUT))
while :; do
  current=$(state)
  case $current in
    ACTIVE) break ;;
    FAILED | SUSPENDING | SUSPENDED | DELETING)
      log "queued resource $NAME is $current:"
      gcloud compute tpus queued-resources describe "$NAME" "${where[@]}" >&2 || true
      exit 1 ;;
  esac
  if ((SECONDS >= deadline)); then
    log "queued resource $NAME still $current after QUEUE_TIMEOUT=${QUEUE_TIMEOUT}s"
    exit 1
  fi
  log "queued resource $NAME: $current"
  sleep "$POLL_SECONDS"
done
log "queued resource $NAME is ACTIVE"

# 3. sslocal on every worker.
phase=installing
on_workers() {
  gcloud compute tpus tpu-vm ssh "$NAME" "${where[@]}" --worker=all --command="$1"
}
worker_script=$(base64 <"$(dirname "${BASH_SOURCE[0]}")/tpu_worker.sh" | tr -d '\n')
on_workers "echo $worker_script | base64 -d > ~/sslocal_worker.sh && bash ~/sslocal_worker.sh install $(printf '%q ' "$REPO_URL" "$REPO_REF" "$PYTHON_VERSION" "$LAUNCH_DIR")"

# 4. Training, detached from this ssh session.
phase=training
on_workers "bash ~/sslocal_worker.sh start $(printf '%q ' "$LAUNCH_DIR" "$LOG_SYNC_SECONDS" "$CONFIG" "$RUN" ${train_flags[@]+"${train_flags[@]}"})"
log "training on $NAME; logs: gcloud storage cat '$LAUNCH_DIR/worker-0.log'"

# 5. Until worker 0 reports the run finished (or a worker failed, or the slice went away).
deadline=$((SECONDS + RUN_TIMEOUT))
while :; do
  markers=$(gcloud storage ls "$LAUNCH_DIR/" 2>/dev/null || true)
  if grep -q '/worker-0\.exit-0$' <<<"$markers"; then
    break
  fi
  if failed=$(grep -E '/worker-[^/]+\.exit-[0-9]+$' <<<"$markers" | grep -v '\.exit-0$'); then
    if grep -q '\.exit-143$' <<<"$failed"; then
      log "preempted (SIGTERM): the checkpoint is saved in $RUN; the same command resumes it"
      exit 143
    fi
    log "training failed: ${failed//$'\n'/ }; see $LAUNCH_DIR/worker-*.log"
    exit 1
  fi
  current=$(state)
  if [[ $current != ACTIVE && $current != UNKNOWN ]]; then
    log "the slice is $current while training (preempted?); rerun the same command to resume"
    exit 1
  fi
  if ((RUN_TIMEOUT > 0 && SECONDS >= deadline)); then
    log "the run has not finished after RUN_TIMEOUT=${RUN_TIMEOUT}s"
    exit 1
  fi
  sleep "$RUN_POLL_SECONDS"
done
if ! gcloud storage ls "$RUN/checkpoints/" >/dev/null; then
  log "worker 0 finished but $RUN/checkpoints/ is empty"
  exit 1
fi
if gcloud storage ls "$RUN/final_metrics.json" >/dev/null 2>&1; then
  log "finished: $RUN/final_metrics.json"
else
  log "finished (no final_metrics.json: the config has no test sets)"
fi
phase=finished  # 6. on_exit deletes the slice
