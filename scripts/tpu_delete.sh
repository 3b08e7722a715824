#!/usr/bin/env bash
# Deletes the TPU VM TPU_NAME, or with --queued the queued resource QR_NAME and its VM.
# The bucket (model, data, checkpoints) is kept.
#
#   scripts/tpu_delete.sh [--dry-run] [--queued]
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then export DRY_RUN=1; shift; fi
# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

if [[ "${1:-}" == --queued ]]; then
  run gcloud compute tpus queued-resources delete "${QR_NAME:-${TPU_NAME}-qr}" \
    "${GCLOUD_LOC[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${GCLOUD_LOC[@]}" --quiet
fi
