#!/usr/bin/env bash
# Runs one command on TPU worker 0 (WORKER=all|N to change) with the bucket mounted and the
# medjax venv first on PATH; for import, data preparation, eval and export.
#
#   scripts/tpu_run.sh [--dry-run] 'medjax eval --checkpoint /gcs/BUCKET/medjax/runs/... ...'
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then export DRY_RUN=1; shift; fi
# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"
[[ $# -ge 1 ]] || die "usage: $(basename "$0") [--dry-run] 'COMMAND ...'"
printf -v remote '%s\n' "set -e" "$(mount_cmd)" "export PATH=${VENV}/bin:\$PATH" \
  "cd $(printf '%q' "${ROOT}")" "$*"
on_workers "${remote}" "${WORKER:-0}"
