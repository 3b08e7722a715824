#!/usr/bin/env bash
# Creates the TPU VM (or pod slice) TPU_NAME; with CREATE_BUCKET=1 also the bucket.
#
#   BUCKET=gs://my-bucket ZONE=us-east5-a ACCELERATOR_TYPE=v5p-8 scripts/tpu_create.sh
#   SPOT=1 ...   a Spot VM (cheaper, preemptible; tpu_queued.sh re-requests it for you)
#   --dry-run    print the commands only (or DRY_RUN=1)
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then export DRY_RUN=1; shift; fi
# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

if [[ "${CREATE_BUCKET:-0}" != 0 ]]; then
  # Hierarchical namespace: gcsfuse renames folders atomically, as orbax's checkpoint
  # finalisation expects. The bucket's region is the zone's (us-east5-a -> us-east5).
  run gcloud storage buckets create "gs://${BUCKET_NAME}" --location="${ZONE%-*}" \
    --uniform-bucket-level-access --enable-hierarchical-namespace
fi

cmd=(gcloud compute tpus tpu-vm create "${TPU_NAME}" "${GCLOUD_LOC[@]}"
  --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}"
  --scopes=https://www.googleapis.com/auth/cloud-platform)
if [[ "${SPOT:-0}" != 0 ]]; then
  cmd+=(--spot)
fi
run "${cmd[@]}"
