#!/usr/bin/env bash
# Installs medjax (+ jax[tpu]) and gcsfuse on every worker of TPU_NAME.
#
#   scripts/tpu_install.sh [--dry-run]
#
# The code comes from this checkout: a wheel is built here and copied through the bucket
# (GS_ROOT/code/). MEDJAX_SRC=SPEC installs a pip requirement instead, e.g.
# MEDJAX_SRC="medjax @ git+https://github.com/you/medjax.git@main". JAX_SPEC pins jax
# (default "jax[tpu]"; it pulls the matching libtpu). Recent jax needs Python >= 3.11:
# on an image whose python3 is older, python3.11 is installed from apt.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then export DRY_RUN=1; shift; fi
# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"

if [[ -n "${MEDJAX_SRC:-}" ]]; then
  fetch=":"
  spec="${MEDJAX_SRC}"
else
  version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "${repo}/pyproject.toml")"
  [[ -n "${version}" ]] || die "no version in ${repo}/pyproject.toml"
  wheel="medjax-${version}-py3-none-any.whl"
  dist="$(mktemp -d)"
  trap 'rm -rf "${dist}"' EXIT
  run python3 -m pip wheel --quiet --no-deps --wheel-dir "${dist}" "${repo}"
  run gcloud storage cp "${dist}/${wheel}" "${GS_ROOT}/code/${wheel}"
  fetch="gcloud storage cp $(printf '%q' "${GS_ROOT}/code/${wheel}") /tmp/"
  spec="/tmp/${wheel}"
fi

# One line per step; under `set -e` the first failure stops that worker's install.
apt_repo="https://packages.cloud.google.com/apt"
keyring=/usr/share/keyrings/cloud.google.asc
steps=(
  "set -e"
  "sudo apt-get update -q"
  "sudo apt-get install -y -q curl lsb-release python3-venv"
  "echo \"deb [signed-by=${keyring}] ${apt_repo} gcsfuse-\$(lsb_release -cs) main\" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list"
  "curl -fsSL ${apt_repo}/doc/apt-key.gpg | sudo tee ${keyring} > /dev/null"
  "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse"
  "if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY=python3
    else sudo apt-get install -y -q python3.11 python3.11-venv; PY=python3.11; fi"
  "[ -x ${VENV}/bin/python ] || \"\$PY\" -m venv ${VENV}"
  "${fetch}"
  "${VENV}/bin/pip install -q -U pip"
  "${VENV}/bin/pip install -q -U $(printf '%q' "${JAX_SPEC}") $(printf '%q' "${spec}")"
  "$(mount_cmd)"
  "${VENV}/bin/medjax --help > /dev/null && echo \"medjax installed on \$(hostname)\""
)
printf -v remote '%s\n' "${steps[@]}"
on_workers "${remote}"
