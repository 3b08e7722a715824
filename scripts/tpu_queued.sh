#!/usr/bin/env bash
# Trains on a Spot TPU through a queued resource, re-requesting it after each preemption.
#
#   scripts/tpu_queued.sh [--dry-run] CONFIG[:ARG] RUN [--config.FIELD=VALUE ...]
#
# Loop: request QR_NAME (node TPU_NAME, --spot) -> wait for ACTIVE -> tpu_install.sh ->
# tpu_train.sh -> poll. When the queued resource is preempted (SUSPENDED, or FAILED) it is
# deleted and requested again, and training is relaunched with the same RUN: `medjax train`
# resumes from the newest checkpoint in the workdir, which lives in the bucket. The loop
# ends when training exits 0 while the VM is still up (DELETE_WHEN_DONE=1 then deletes it),
# or exits 1 if training fails on a live VM. Env: QR_NAME (default TPU_NAME-qr),
# POLL_SECONDS (60), and those of tpu_common.sh. --dry-run prints one round.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then export DRY_RUN=1; shift; fi
# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"
[[ $# -ge 2 ]] ||
  die "usage: $(basename "$0") [--dry-run] CONFIG[:ARG] RUN [--config.FIELD=VALUE ...]"
here="$(dirname "${BASH_SOURCE[0]}")"
QR_NAME="${QR_NAME:-${TPU_NAME}-qr}"
POLL_SECONDS="${POLL_SECONDS:-60}"
log_name="$(basename "$2")"

request() {
  run gcloud compute tpus queued-resources create "${QR_NAME}" "${GCLOUD_LOC[@]}" \
    --node-id="${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" \
    --runtime-version="${RUNTIME_VERSION}" --spot \
    --scopes=https://www.googleapis.com/auth/cloud-platform
}

describe=(gcloud compute tpus queued-resources describe "${QR_NAME}" "${GCLOUD_LOC[@]}"
  "--format=value(state.state)")
state() {  # ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...; NONE when there is none
  "${describe[@]}" 2> /dev/null || echo NONE
}

exit_status() {  # training's exit status on worker 0, empty while it runs or if unreachable
  on_workers "cat ~/medjax-logs/$(printf '%q' "${log_name}").exit 2> /dev/null || true" 0 \
    2> /dev/null || true
}

launch() {
  "${here}/tpu_install.sh" && "${here}/tpu_train.sh" "$@"
}

if [[ "${DRY_RUN}" != 0 ]]; then  # one round, printed
  request
  show "${describe[@]}"
  launch "$@"
  exit_status
  exit 0
fi

launched=0
while true; do
  s="$(state)"
  echo "$(date -u +%FT%TZ) queued resource ${QR_NAME}: ${s}" >&2
  case "${s}" in
    NONE)
      request || true  # e.g. quota: try again next round
      launched=0
      ;;
    SUSPENDED | FAILED)  # preempted, or could not be provisioned
      run gcloud compute tpus queued-resources delete "${QR_NAME}" "${GCLOUD_LOC[@]}" \
        --force --quiet || true
      launched=0
      ;;
    ACTIVE)
      if [[ "${launched}" == 0 ]]; then
        if launch "$@"; then
          launched=1
        fi
      else
        status="$(exit_status | tail -n 1)"
        if [[ "${status}" == preempted ]]; then  # SIGTERM, checkpoint written: relaunch
          launched=0
        elif [[ -n "${status}" ]]; then
          # An exit during a preemption is not the end: look again once the VM state settles.
          sleep "${POLL_SECONDS}"
          if [[ "$(state)" == ACTIVE ]]; then
            if [[ "${status}" == 0 ]]; then
              echo "training finished (exit 0)" >&2
              if [[ "${DELETE_WHEN_DONE:-0}" != 0 ]]; then
                run gcloud compute tpus queued-resources delete "${QR_NAME}" \
                  "${GCLOUD_LOC[@]}" --force --quiet
              fi
              exit 0
            fi
            die "training exited with status ${status}; see ~/medjax-logs/${log_name}.log"
          fi
        fi
      fi
      ;;
    *) ;;  # WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDING, DELETING, ...: wait
  esac
  sleep "${POLL_SECONDS}"
done
