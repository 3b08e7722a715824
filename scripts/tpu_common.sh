# shellcheck shell=bash
# Shared settings for the scripts/tpu_*.sh launchers; sourced, never run.
#
# Environment (export, or put in a file and `source` it first):
#   BUCKET            required: gs://NAME or NAME; holds the model, data, runs and code
#   ZONE              required, e.g. us-east5-a (a zone that has ACCELERATOR_TYPE)
#   PROJECT           default: gcloud's configured project
#   TPU_NAME          default: medjax
#   ACCELERATOR_TYPE  default: v5p-8 (4 chips, one host); v5p-32 etc. for pod slices
#   RUNTIME_VERSION   default: from ACCELERATOR_TYPE (v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite,
#                     v6e: v2-alpha-tpuv6e, v4: tpu-ubuntu2204-base)
#   PREFIX            folder inside the bucket, default: medjax
#   MOUNT             where the bucket is mounted (gcsfuse) on each worker, default: /gcs/NAME
#   DRY_RUN=1         print every gcloud command instead of running it
#
# medjax reads and writes plain files, so on the workers the bucket is a gcsfuse mount and
# ROOT=$MOUNT/$PREFIX is the folder the configs/llama2_*.py recipes take as their argument.

set -euo pipefail

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 1
}

: "${BUCKET:?set BUCKET=gs://your-bucket (holds model, data, checkpoints)}"
: "${ZONE:?set ZONE, e.g. ZONE=us-east5-a}"
BUCKET_NAME="${BUCKET#gs://}"
BUCKET_NAME="${BUCKET_NAME%%/*}"
PROJECT="${PROJECT:-}"
TPU_NAME="${TPU_NAME:-medjax}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-8}"
PREFIX="${PREFIX:-medjax}"
MOUNT="${MOUNT:-/gcs/${BUCKET_NAME}}"
# shellcheck disable=SC2034  # ROOT and GS_ROOT are for the scripts that source this file
{
  ROOT="${MOUNT}/${PREFIX}"               # the bucket's PREFIX folder, as the workers see it
  GS_ROOT="gs://${BUCKET_NAME}/${PREFIX}" # the same folder, as gcloud storage sees it
}
VENV="${VENV:-\$HOME/medjax-venv}"      # on the workers; expanded there
export DRY_RUN="${DRY_RUN:-0}"  # exported: tpu_queued.sh runs the other scripts

if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  case "${ACCELERATOR_TYPE}" in
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v4-* | v3-* | v2-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=${ACCELERATOR_TYPE}; set it" ;;
  esac
fi

# Flags every gcloud tpus command takes.
GCLOUD_LOC=(--zone="${ZONE}")
if [[ -n "${PROJECT}" ]]; then
  GCLOUD_LOC+=(--project="${PROJECT}")
fi

# Prints a command the way a shell would read it back (for DRY_RUN and logs).
show() {
  local out="+" a
  for a in "$@"; do
    if [[ "${a}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=" ${a}"
    else
      out+=" '${a//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "${out}"
}

# Runs a command, or only prints it when DRY_RUN=1.
run() {
  if [[ "${DRY_RUN}" != 0 ]]; then
    show "$@"
  else
    show "$@" >&2
    "$@"
  fi
}

# Runs a bash command line on TPU workers (default: all of them, concurrently).
on_workers() {
  local cmd="$1" worker="${2:-all}"
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_LOC[@]}" \
    --worker="${worker}" --command="${cmd}"
}

# A remote command line that mounts the bucket at $MOUNT (idempotent). --implicit-dirs sees
# folders written by `gcloud storage`; --rename-dir-limit lets orbax rename a finished
# checkpoint's temporary folder (atomic on a hierarchical-namespace bucket, see README).
mount_cmd() {
  local m b
  m="$(printf '%q' "${MOUNT}")"
  b="$(printf '%q' "${BUCKET_NAME}")"
  printf '%s' "mountpoint -q ${m} || { sudo mkdir -p ${m} && sudo chown \"\$USER\" ${m}"
  printf '%s' " && gcsfuse --implicit-dirs --rename-dir-limit=200000 ${b} ${m}; }"
}
