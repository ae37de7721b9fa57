#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (queued resource), install sslocal on every worker,
# run the same command on all workers (jax.distributed.initialize() detects the slice), delete.
#
#   PROJECT=my-project ZONE=us-central2-b TPU_TYPE=v4-32 BUCKET=gs://my-bucket \
#     launch/tpu_vm.sh configs/vggsound144k.py runs/vggsound144k
#
# The prepared TFDS datasets must be readable by every worker (data_dir on GCS or a shared disk).
set -euo pipefail

CONFIG=${1:?usage: tpu_vm.sh CONFIG WORKDIR [extra sslocal train flags]}
WORKDIR=${2:?usage: tpu_vm.sh CONFIG WORKDIR [extra sslocal train flags]}
shift 2
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
TPU_TYPE=${TPU_TYPE:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
NAME=${NAME:-sslocal-$(date +%Y%m%d-%H%M%S)}
REPO_URL=${REPO_URL:-https://example.org/sslocal.git}  # where the workers clone sslocal from

gcloud compute tpus queued-resources create "$NAME" --project="$PROJECT" --zone="$ZONE" \
  --node-id="$NAME" --accelerator-type="$TPU_TYPE" --runtime-version="$RUNTIME"
until gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" \
    --zone="$ZONE" --format='value(state.state)' | grep -q ACTIVE; do
  sleep 30
done
trap 'gcloud compute tpus queued-resources delete "$NAME" --project="$PROJECT" --zone="$ZONE" --force --quiet' EXIT

run_all() {
  gcloud compute tpus tpu-vm ssh "$NAME" --project="$PROJECT" --zone="$ZONE" --worker=all \
    --command="$1"
}
run_all "git clone $REPO_URL sslocal && cd sslocal && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . 'jax[tpu]'"
extra=$(printf ' %q' "$@")
run_all "cd sslocal && . .venv/bin/activate && sslocal train --config $CONFIG --workdir $BUCKET/$WORKDIR$extra"
