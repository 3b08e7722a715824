#!/usr/bin/env bash
# Launches `medjax train` on every worker of TPU_NAME, in the background, logging to a file.
#
#   scripts/tpu_train.sh [--dry-run] CONFIG[:ARG] RUN [--config.FIELD=VALUE ...]
#
# CONFIG  a config file here; it is copied to each worker (through the bucket). Without
#         :ARG the bucket root ($MOUNT/$PREFIX) is passed: configs/llama2_*.py read the model,
#         data and runs from it (medjax/training/recipes.py).
# RUN     a run name (workdir $MOUNT/$PREFIX/runs/RUN), a worker path, or gs://BUCKET/...
#         (the same place through the mount). Rerunning with the same RUN resumes it.
# Env: JAX_COMPILATION_CACHE_DIR (default $MOUNT/$PREFIX/jax_cache, shared and kept across
# VMs, so a relaunch skips most compilation); LIBTPU_INIT_ARGS and XLA_FLAGS are passed on
# when set. The log is ~/medjax-logs/RUN.log on each worker; RUN.exit gets the exit status.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then export DRY_RUN=1; shift; fi
# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"
[[ $# -ge 2 ]] ||
  die "usage: $(basename "$0") [--dry-run] CONFIG[:ARG] RUN [--config.FIELD=VALUE ...]"
config="$1"
run_name="$2"
shift 2
for o in "$@"; do
  [[ "${o}" == --config.* ]] || die "${o}: overrides are --config.FIELD=VALUE"
done

cfg_file="${config%%:*}"
cfg_arg="${ROOT}"
if [[ "${config}" == *:* ]]; then
  cfg_arg="${config#*:}"
fi
[[ -f "${cfg_file}" ]] || die "${cfg_file}: no such config file"
cfg_name="$(basename "${cfg_file}")"

case "${run_name}" in
  "gs://${BUCKET_NAME}/"*) workdir="${MOUNT}/${run_name#"gs://${BUCKET_NAME}/"}" ;;
  gs://*) die "${run_name}: not in gs://${BUCKET_NAME}; workdirs are read through its mount" ;;
  /*) workdir="${run_name}" ;;
  *) workdir="${ROOT}/runs/${run_name}" ;;
esac
log_name="$(basename "${workdir}")"

run gcloud storage cp "${cfg_file}" "${GS_ROOT}/code/configs/${cfg_name}"

q() { printf '%q' "$1"; }
squote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }  # one argument for the worker's shell, $ kept
env_vars=("JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${ROOT}/jax_cache}"
  "PYTHONUNBUFFERED=1")
for v in LIBTPU_INIT_ARGS XLA_FLAGS; do
  if [[ -n "${!v:-}" ]]; then
    env_vars+=("${v}=${!v}")
  fi
done
train=(env "${env_vars[@]}" "__VENV__/bin/medjax" train
  --config "\$HOME/medjax-configs/${cfg_name}:${cfg_arg}" --workdir "${workdir}" "$@")
train_line="$(printf '%q ' "${train[@]}")"
# %q escaped the $ of $HOME and __VENV__ stands for ${VENV}: both expand on the worker.
train_line="${train_line//\\\$HOME/\$HOME}"
train_line="${train_line//__VENV__/${VENV}}"
logs="\$HOME/medjax-logs"
log="${logs}/$(q "${log_name}")"
# The exit status for tpu_queued.sh; "preempted" when SIGTERM came first (medjax then
# checkpoints and exits 0, though the run is not finished).
job="trap 'touch ${log}.term' TERM; ${train_line}; s=\$?; [ -f ${log}.term ] && s=preempted"
job+="; echo \$s > ${log}.exit"

steps=(
  "set -e"
  "$(mount_cmd)"
  "mkdir -p ${logs} \$HOME/medjax-configs"
  "gcloud storage cp $(q "${GS_ROOT}/code/configs/${cfg_name}") \$HOME/medjax-configs/"
  "if [ -f ${log}.pid ] && kill -0 \"\$(cat ${log}.pid)\" 2> /dev/null; then
    echo \"\$(hostname): already running\"; exit 0; fi"
  "rm -f ${log}.exit ${log}.term"
  "nohup bash -c $(squote "${job}") > ${log}.log 2>&1 < /dev/null &"
  "echo \$! > ${log}.pid"
  "echo \"\$(hostname): started, log ${log}.log\""
)
printf -v remote '%s\n' "${steps[@]}"  # one line per step: `cmd &` cannot take a `;`
on_workers "${remote}"
echo "follow: gcloud compute tpus tpu-vm ssh ${TPU_NAME} ${GCLOUD_LOC[*]} --worker=0" \
  "--command='tail -f ~/medjax-logs/${log_name}.log'"
