#!/usr/bin/env bash
# Train on several GPU hosts without a scheduler: run this script once on every host, with the
# same COORDINATOR (host:port of process 0), NUM_PROCESSES, and each host's own PROCESS_ID.
#
#   COORDINATOR=10.0.0.1:8476 NUM_PROCESSES=2 PROCESS_ID=0 \
#     launch/gpu_multihost.sh configs/vggsound144k.py /shared/runs/vggsound144k
#
# Every host reads the prepared datasets (a shared data_dir) and writes the same shared workdir;
# only process 0 writes logs and reports, Orbax coordinates the checkpoint writes.
set -euo pipefail

CONFIG=${1:?usage: gpu_multihost.sh CONFIG WORKDIR [extra sslocal train flags]}
WORKDIR=${2:?usage: gpu_multihost.sh CONFIG WORKDIR [extra sslocal train flags]}
shift 2
: "${COORDINATOR:?set COORDINATOR=host:port of process 0}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}" "${PROCESS_ID:?set PROCESS_ID}"

exec sslocal train --config "$CONFIG" --workdir "$WORKDIR" \
  --coordinator_address="$COORDINATOR" --num_processes="$NUM_PROCESSES" \
  --process_id="$PROCESS_ID" "$@"
