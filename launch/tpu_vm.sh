#!/usr/bin/env bash
# sdjax on a Cloud TPU VM or pod slice: one command per stage, run from the repository root on your machine.
#
#   launch/tpu_vm.sh create          # on-demand TPU VM / pod slice
#   launch/tpu_vm.sh create-spot     # the same through a queued resource with spot capacity (waits for ACTIVE)
#   launch/tpu_vm.sh install         # copy this checkout to every worker, create .venv, pip install -e ".[tpu]"
#   launch/tpu_vm.sh clean           # on every worker: end stale trainers, remove libtpu's lock file
#   launch/tpu_vm.sh train [ARGS]    # start `sdjax train` on every worker (in the background; ARGS appended)
#   launch/tpu_vm.sh logs [--all | --worker=N] [--no-follow] [-n LINES]
#                                    # follow worker 0's log (the one that logs progress), every worker's, or one
#   launch/tpu_vm.sh stop            # SIGTERM to the trainer on every worker; returns once each has saved and exited
#   launch/tpu_vm.sh collect [DEST]  # copy worker 0's workdir (metrics, samples, config, tb/; no checkpoints) and
#                                    # its train.log to DEST [workdirs/TPU_NAME/basename of WORKDIR] here
#   launch/tpu_vm.sh delete          # delete the TPU VM (and its queued resource, if any); `collect` first
#
# Settings come from the environment (defaults in brackets):
#   TPU_NAME [sdjax]  ZONE [us-central2-b]  PROJECT [gcloud's default]
#   ACCELERATOR_TYPE [v4-16]  RUNTIME_VERSION [tpu-ubuntu2204-base]
#   SERVICE_ACCOUNT [the project's Compute Engine default]: the workers' service account (bucket access)
#   CONFIG [configs/demo.py]  WORKDIR [workdirs/run: metrics and config, inside ~/sdjax on every worker]
#   CHECKPOINT_DIR [unset]: a gs:// path every worker can write; required on a multi-host slice, whose
#                   processes each write their own shards of one checkpoint.
#   STOP_TIMEOUT [900]: seconds `stop` waits for each trainer to save its checkpoint and exit.
#   VENV_COMMAND [uv: Python 3.11, pip install -e '.[tpu]']: the command `install` runs in ~/sdjax on every
#                   worker to create ~/sdjax/.venv.
#   LIBTPU_LOCKFILE [/tmp/libtpu_lockfile]: libtpu's lock file on the workers (a path there).
# Run by tests/test_launch_scripts.py against a stand-in gcloud (workers as local folders); see launch/README.md.

set -euo pipefail

TPU_NAME="${TPU_NAME:-sdjax}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-}"
CONFIG="${CONFIG:-configs/demo.py}"
WORKDIR="${WORKDIR:-workdirs/run}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-}"
STOP_TIMEOUT="${STOP_TIMEOUT:-900}"
# The TPU images ship Python 3.10; uv fetches the 3.11 sdjax needs.
VENV_COMMAND="${VENV_COMMAND:-python3 -m pip install --user --quiet uv && ~/.local/bin/uv venv --python 3.11 .venv \
&& ~/.local/bin/uv pip install --python .venv/bin/python -e '.[tpu]'}"
LIBTPU_LOCKFILE="${LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}"
QUEUED_RESOURCE="${TPU_NAME}-qr"
REMOTE_DIR="sdjax"  # in each worker's home; the log and pid files below are inside it
LOG="train.log"
PID_FILE="train.pid"

# Shell functions for the commands run on the workers (their login shell: bash on the TPU images).
# trainer_running PID: PID is alive and is `sdjax train` (not a zombie, not a reused pid after a reboot).
# shellcheck disable=SC2016  # expanded there, not here
REMOTE_FUNCTIONS='trainer_running() { kill -0 "$1" 2>/dev/null && ps -o args= -p "$1" | grep -q "sdjax train"; }
wait_exit() {  # wait_exit PID SECONDS: 0 once PID has exited, 1 if it still runs after SECONDS
  waited=0
  while trainer_running "$1"; do
    if [ "$waited" -ge "$2" ]; then return 1; fi
    sleep 1; waited=$((waited + 1))
  done
}
host=$(hostname)'

gcloud_tpu() {
  local project_flag=()
  if [[ -n "${PROJECT}" ]]; then project_flag=(--project "${PROJECT}"); fi
  # ${a[@]+"${a[@]}"}: an empty array expands to nothing under `set -u` in every bash (3.2, macOS's, included).
  gcloud compute tpus "$@" --zone "${ZONE}" ${project_flag[@]+"${project_flag[@]}"}
}

on_workers() {  # on_workers WORKER COMMAND: run COMMAND on worker WORKER (a number or "all")
  gcloud_tpu tpu-vm ssh "${TPU_NAME}" --worker="$1" --command "$2"
}

create() {
  local sa=()
  if [[ -n "${SERVICE_ACCOUNT}" ]]; then sa=(--service-account "${SERVICE_ACCOUNT}"); fi
  gcloud_tpu tpu-vm create "${TPU_NAME}" --accelerator-type "${ACCELERATOR_TYPE}" --version "${RUNTIME_VERSION}" \
    ${sa[@]+"${sa[@]}"}
}

queued_state() {  # the queued resource's state, or nothing (and status 1) if there is none
  gcloud_tpu queued-resources describe "${QUEUED_RESOURCE}" --format 'value(state.state)' 2>/dev/null
}

create_spot() {
  local state sa=()
  if state="$(queued_state)"; then
    case "${state}" in
      SUSPENDED|SUSPENDING|FAILED)
        echo "${QUEUED_RESOURCE} already exists and is ${state}: a preempted or failed queued resource stays in" \
             "the queue until deleted. Run: $0 delete; $0 create-spot; $0 install; $0 train" >&2
        exit 1 ;;
      *) echo "${QUEUED_RESOURCE} already exists (${state}); waiting for it." ;;
    esac
  else
    if [[ -n "${SERVICE_ACCOUNT}" ]]; then sa=(--service-account "${SERVICE_ACCOUNT}"); fi
    gcloud_tpu queued-resources create "${QUEUED_RESOURCE}" --node-id "${TPU_NAME}" \
      --accelerator-type "${ACCELERATOR_TYPE}" --runtime-version "${RUNTIME_VERSION}" --spot ${sa[@]+"${sa[@]}"}
  fi
  echo "Waiting for ${QUEUED_RESOURCE} to become ACTIVE (spot capacity can take a while; Ctrl-C stops waiting)."
  state=""
  until [[ "${state}" == "ACTIVE" ]]; do
    state="$(queued_state || true)"
    echo "$(date +%H:%M:%S) ${state}"
    case "${state}" in
      FAILED|SUSPENDED) echo "${QUEUED_RESOURCE} is ${state}; see: gcloud compute tpus queued-resources describe" \
                             "${QUEUED_RESOURCE} --zone ${ZONE}. Then: $0 delete, and try again." >&2
                        exit 1 ;;
    esac
    if [[ "${state}" != "ACTIVE" ]]; then sleep 30; fi
  done
}

install() {
  local archive
  archive="$(mktemp -d)/sdjax.tar.gz"
  # The working tree as it is (uncommitted edits included), without environments, runs or caches.
  # COPYFILE_DISABLE: macOS's tar would add ._* metadata files.
  COPYFILE_DISABLE=1 tar czf "${archive}" --exclude=.git --exclude='.venv*' --exclude=workdirs \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude='*.egg-info' --exclude=.import_linter_cache .
  gcloud_tpu tpu-vm scp "${archive}" "${TPU_NAME}:~/sdjax.tar.gz" --worker=all
  # Replaces everything in ~/sdjax except workdirs/ (a run's local files) and the log; not under a running trainer.
  on_workers all "${REMOTE_FUNCTIONS}
set -e
if [ -f ~/${REMOTE_DIR}/${PID_FILE} ] && trainer_running \"\$(cat ~/${REMOTE_DIR}/${PID_FILE})\"; then
  echo \"\$host: a trainer is running; stop it first ($0 stop)\" >&2; exit 1
fi
mkdir -p ~/${REMOTE_DIR}
find ~/${REMOTE_DIR} -mindepth 1 -maxdepth 1 ! -name workdirs ! -name ${LOG} -exec rm -rf {} +
tar xzf ~/sdjax.tar.gz -C ~/${REMOTE_DIR} && rm ~/sdjax.tar.gz
cd ~/${REMOTE_DIR}
${VENV_COMMAND}
.venv/bin/python -c 'import jax; d = jax.local_devices(); print(jax.process_index(), len(d), d[0].platform, \"devices\")'"
}

clean() {
  # The trainer in the pid file gets SIGTERM first (it saves a checkpoint if it can), then SIGKILL; so does any
  # other process holding the TPU (a trainer started by hand, a hung one). Then libtpu's lock file, which a
  # killed process leaves behind and which makes the next one fail with "TPU in use".
  on_workers all "${REMOTE_FUNCTIONS}
pids=''
if [ -f ~/${REMOTE_DIR}/${PID_FILE} ]; then
  pid=\$(cat ~/${REMOTE_DIR}/${PID_FILE})
  if trainer_running \"\$pid\"; then pids=\$pid; fi
  rm -f ~/${REMOTE_DIR}/${PID_FILE}
fi
devices=''
for d in /dev/accel* /dev/vfio/[0-9]*; do if [ -e \"\$d\" ]; then devices=\"\$devices \$d\"; fi; done
if [ -n \"\$devices\" ]; then
  pids=\"\$pids \$( (sudo -n lsof -t \$devices 2>/dev/null || lsof -t \$devices 2>/dev/null || true) | sort -u)\"
fi
for pid in \$pids; do
  echo \"\$host: ending pid \$pid: \$(ps -o args= -p \"\$pid\" | cut -c1-120)\"
  kill -TERM \"\$pid\" 2>/dev/null || sudo -n kill -TERM \"\$pid\" 2>/dev/null || true
done
for pid in \$pids; do
  if ! wait_exit \"\$pid\" 10 && kill -0 \"\$pid\" 2>/dev/null; then
    echo \"\$host: pid \$pid did not exit on SIGTERM; SIGKILL\"
    kill -KILL \"\$pid\" 2>/dev/null || sudo -n kill -KILL \"\$pid\" 2>/dev/null || true
  fi
done
rm -f \"${LIBTPU_LOCKFILE}\" 2>/dev/null || sudo -n rm -f \"${LIBTPU_LOCKFILE}\"
echo \"\$host: clean (no trainer, no ${LIBTPU_LOCKFILE})\""
}

train() {
  local args=(--config "${CONFIG}" --workdir "${WORKDIR}")
  if [[ -n "${CHECKPOINT_DIR}" ]]; then args+=("--config.train.checkpoint_dir=${CHECKPOINT_DIR}"); fi
  if [[ $# -gt 0 ]]; then args+=("$@"); fi
  local quoted
  quoted="$(printf '%q ' "${args[@]}")"
  # Every worker runs the same command at once; jax.distributed finds the others through the TPU metadata.
  # nohup: the run outlives this ssh session. `$!` is the trainer's own pid (nohup execs it); the log is
  # appended to, so a resumed run keeps the earlier runs' lines.
  on_workers all "${REMOTE_FUNCTIONS}
cd ~/${REMOTE_DIR} || exit 1
if [ -f ${PID_FILE} ] && trainer_running \"\$(cat ${PID_FILE})\"; then
  echo \"\$host: a trainer is already running (pid \$(cat ${PID_FILE})); stop it first: $0 stop\" >&2; exit 1
fi
echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) sdjax train ${quoted}\" >> ${LOG}
nohup .venv/bin/sdjax train ${quoted} < /dev/null >> ${LOG} 2>&1 &
echo \$! > ${PID_FILE}
echo \"\$host: started sdjax train (pid \$!), log ~/${REMOTE_DIR}/${LOG}\""
  echo "Started on every worker. Follow it with: $0 logs (worker 0) or $0 logs --all"
}

logs() {
  local worker=0 follow=-F lines=100
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --all) worker=all ;;
      --worker=*) worker="${1#--worker=}" ;;
      --no-follow) follow="" ;;
      -n) lines="${2:?-n needs a number}"; shift ;;
      *) echo "logs: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
  done
  local tail_command="tail -n ${lines} ${follow} ~/${REMOTE_DIR}/${LOG}"
  if [[ "${worker}" == "all" ]]; then
    # Every line prefixed with its worker's host name (a read loop: unbuffered, unlike sed into a pipe).
    on_workers all "host=\$(hostname); ${tail_command} 2>&1 | while IFS= read -r line; do printf '%s: %s\n' \"\$host\" \"\$line\"; done"
  else
    on_workers "${worker}" "${tail_command}"
  fi
}

stop() {
  on_workers all "${REMOTE_FUNCTIONS}
cd ~/${REMOTE_DIR} 2>/dev/null || { echo \"\$host: no ~/${REMOTE_DIR}\"; exit 0; }
if [ ! -f ${PID_FILE} ]; then echo \"\$host: no trainer started here (no ~/${REMOTE_DIR}/${PID_FILE})\"; exit 0; fi
pid=\$(cat ${PID_FILE})
if ! trainer_running \"\$pid\"; then echo \"\$host: the trainer (pid \$pid) is not running\"; rm -f ${PID_FILE}; exit 0; fi
kill -TERM \"\$pid\"
echo \"\$host: sent SIGTERM to the trainer (pid \$pid); waiting up to ${STOP_TIMEOUT} s for its checkpoint and exit\"
if ! wait_exit \"\$pid\" ${STOP_TIMEOUT}; then
  echo \"\$host: the trainer (pid \$pid) still runs after ${STOP_TIMEOUT} s (its log: ~/${REMOTE_DIR}/${LOG}). Wait with a\" \
       \"larger STOP_TIMEOUT, or end it with '$0 clean' (a checkpoint still being written is then lost).\" >&2
  exit 1
fi
rm -f ${PID_FILE}
echo \"\$host: the trainer exited after \$waited s. The end of its log:\"
tail -n 3 ${LOG}"
}

collect() {
  local dest="${1:-workdirs/${TPU_NAME}/$(basename "${WORKDIR}")}"
  local tmp
  tmp="$(mktemp -d)"
  # Worker 0 (process 0) writes metrics.jsonl, samples/, config.json, speed.json, tb/; checkpoints stay out.
  on_workers 0 "set -e
cd ~/${REMOTE_DIR} && cd $(printf '%q' "${WORKDIR}")
log=''; if [ -f ~/${REMOTE_DIR}/${LOG} ]; then log=\"-C \$HOME/${REMOTE_DIR} ${LOG}\"; fi
tar czf ~/sdjax-collect.tar.gz --exclude=checkpoints --exclude='*.orbax-checkpoint-tmp*' . \$log"
  gcloud_tpu tpu-vm scp "${TPU_NAME}:~/sdjax-collect.tar.gz" "${tmp}/collect.tar.gz" --worker=0
  mkdir -p "${dest}"
  tar xzf "${tmp}/collect.tar.gz" -C "${dest}"
  rm -rf "${tmp}"
  echo "Worker 0's ${WORKDIR} (without checkpoints) and ${LOG} are in ${dest}"
}

delete() {
  echo "Deleting ${TPU_NAME}: the workers' disks go with it (metrics, samples, logs: '$0 collect' saves them)."
  if gcloud_tpu queued-resources describe "${QUEUED_RESOURCE}" > /dev/null 2>&1; then
    gcloud_tpu queued-resources delete "${QUEUED_RESOURCE}" --force --quiet
  else
    gcloud_tpu tpu-vm delete "${TPU_NAME}" --quiet
  fi
}

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

command="${1:-}"
if [[ $# -gt 0 ]]; then shift; fi
case "${command}" in
  create) create ;;
  create-spot) create_spot ;;
  install) install ;;
  clean) clean ;;
  train) train "$@" ;;
  logs) logs "$@" ;;
  stop) stop ;;
  collect) collect "$@" ;;
  delete) delete ;;
  *) usage; exit 2 ;;
esac
