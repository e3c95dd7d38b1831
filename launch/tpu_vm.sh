#!/usr/bin/env bash
# sdjax on a Cloud TPU VM or pod slice: one command per stage, run from the repository root on your machine.
#
#   launch/tpu_vm.sh create          # on-demand TPU VM / pod slice
#   launch/tpu_vm.sh create-spot     # the same through a queued resource with spot capacity (waits for ACTIVE)
#   launch/tpu_vm.sh install         # copy this checkout to every worker, create .venv, pip install -e ".[tpu]"
#   launch/tpu_vm.sh train [ARGS]    # start `sdjax train` on every worker (in the background; ARGS appended)
#   launch/tpu_vm.sh logs            # stream process 0's log (the only process that logs)
#   launch/tpu_vm.sh stop            # SIGTERM on every worker: the run saves a checkpoint and exits
#   launch/tpu_vm.sh delete          # delete the TPU VM (and its queued resource, if any)
#
# Settings come from the environment (defaults in brackets):
#   TPU_NAME [sdjax]  ZONE [us-central2-b]  PROJECT [gcloud's default]
#   ACCELERATOR_TYPE [v4-16]  RUNTIME_VERSION [tpu-ubuntu2204-base]
#   CONFIG [configs/demo.py]  WORKDIR [workdirs/run: metrics and config, inside ~/sdjax on every worker]
#   CHECKPOINT_DIR [unset]: a gs:// path every worker can write; required on a multi-host slice, whose
#                   processes each write their own shards of one checkpoint.
# Untested here (no Google Cloud access from where it was written); see launch/README.md.

set -euo pipefail

TPU_NAME="${TPU_NAME:-sdjax}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/demo.py}"
WORKDIR="${WORKDIR:-workdirs/run}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-}"
QUEUED_RESOURCE="${TPU_NAME}-qr"
REMOTE_DIR="sdjax"  # in each worker's home; the log and pid files below are inside it
LOG="train.log"
PID_FILE="train.pid"

gcloud_tpu() {
  local project_flag=()
  if [[ -n "${PROJECT}" ]]; then project_flag=(--project "${PROJECT}"); fi
  gcloud compute tpus "$@" --zone "${ZONE}" "${project_flag[@]}"
}

on_workers() {  # on_workers WORKER COMMAND: run COMMAND on worker WORKER (a number or "all")
  gcloud_tpu tpu-vm ssh "${TPU_NAME}" --worker="$1" --command "$2"
}

create() {
  gcloud_tpu tpu-vm create "${TPU_NAME}" --accelerator-type "${ACCELERATOR_TYPE}" --version "${RUNTIME_VERSION}"
}

create_spot() {
  gcloud_tpu queued-resources create "${QUEUED_RESOURCE}" --node-id "${TPU_NAME}" \
    --accelerator-type "${ACCELERATOR_TYPE}" --runtime-version "${RUNTIME_VERSION}" --spot
  echo "Waiting for ${QUEUED_RESOURCE} to become ACTIVE (spot capacity can take a while; Ctrl-C stops waiting)."
  local state=""
  until [[ "${state}" == "ACTIVE" ]]; do
    state="$(gcloud_tpu queued-resources describe "${QUEUED_RESOURCE}" --format 'value(state.state)')"
    echo "$(date +%H:%M:%S) ${state}"
    case "${state}" in
      FAILED|SUSPENDED) echo "${QUEUED_RESOURCE} is ${state}; see: gcloud compute tpus queued-resources describe" >&2
                        exit 1 ;;
    esac
    if [[ "${state}" != "ACTIVE" ]]; then sleep 30; fi
  done
}

install() {
  local archive
  archive="$(mktemp -d)/sdjax.tar.gz"
  # The working tree as it is (uncommitted edits included), without environments, runs or caches.
  tar czf "${archive}" --exclude=.git --exclude=.venv --exclude=workdirs --exclude=__pycache__ .
  gcloud_tpu tpu-vm scp "${archive}" "${TPU_NAME}:~/sdjax.tar.gz" --worker=all
  # The TPU images ship Python 3.10; uv fetches the 3.11 sdjax needs.
  on_workers all "set -e; rm -rf ~/${REMOTE_DIR} && mkdir ~/${REMOTE_DIR} && tar xzf ~/sdjax.tar.gz -C ~/${REMOTE_DIR} \
    && cd ~/${REMOTE_DIR} && python3 -m pip install --user --quiet uv && ~/.local/bin/uv venv --python 3.11 .venv \
    && ~/.local/bin/uv pip install --python .venv/bin/python -e '.[tpu]' \
    && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), \"local TPU devices\")'"
}

train() {
  local args=(--config "${CONFIG}" --workdir "${WORKDIR}")
  if [[ -n "${CHECKPOINT_DIR}" ]]; then args+=("--config.train.checkpoint_dir=${CHECKPOINT_DIR}"); fi
  args+=("$@")
  local quoted
  quoted="$(printf '%q ' "${args[@]}")"
  # Every worker runs the same command at once; jax.distributed finds the others through the TPU metadata.
  # nohup: the run outlives this ssh session.
  on_workers all "cd ~/${REMOTE_DIR} && nohup .venv/bin/sdjax train ${quoted} < /dev/null > ${LOG} 2>&1 & echo \$! > ${PID_FILE}"
  echo "Started on every worker. Follow it with: $0 logs"
}

logs() {
  on_workers 0 "tail -n 100 -F ${REMOTE_DIR}/${LOG}"
}

stop() {
  on_workers all "cd ${REMOTE_DIR} && if [ -f ${PID_FILE} ]; then kill -TERM \$(cat ${PID_FILE}) 2>/dev/null || true; fi"
}

delete() {
  if gcloud_tpu queued-resources describe "${QUEUED_RESOURCE}" > /dev/null 2>&1; then
    gcloud_tpu queued-resources delete "${QUEUED_RESOURCE}" --force --quiet
  else
    gcloud_tpu tpu-vm delete "${TPU_NAME}" --quiet
  fi
}

usage() {
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
}

command="${1:-}"
if [[ $# -gt 0 ]]; then shift; fi
case "${command}" in
  create) create ;;
  create-spot) create_spot ;;
  install) install ;;
  train) train "$@" ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  *) usage; exit 2 ;;
esac
