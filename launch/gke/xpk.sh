#!/usr/bin/env bash
# `sdjax train` on a GKE TPU cluster through xpk (https://github.com/AI-Hypercomputer/xpk), which writes the
# JobSet (compare jobset.yaml) for you. Create the cluster once with `xpk cluster create`, build and push the
# image from launch/gke/Dockerfile (for linux/amd64), then:
#   CLUSTER=my-cluster IMAGE=REGION-docker.pkg.dev/PROJECT/REPO/sdjax:latest BUCKET=my-bucket launch/gke/xpk.sh
#   CLUSTER=my-cluster launch/gke/xpk.sh delete
# Optional: WORKLOAD [sdjax-demo], TPU_TYPE [v5litepod-16], NUM_SLICES [1], ZONE, PROJECT (xpk's defaults:
# gcloud's), CONFIG [configs/demo.py], extra `sdjax train` flags as arguments, and
#   MAX_RESTARTS [3]: how often the JobSet is restarted after a failure (a preemption, a node's maintenance);
#                     each restart resumes from the newest checkpoint in the bucket. xpk's own default is 0.
#   GRACE_PERIOD [300]: seconds between SIGTERM and SIGKILL for a pod, long enough to save a checkpoint:
#                     ~ state bytes per host / the host's write bandwidth to the bucket, plus a margin for
#                     the step in flight (launch/README.md, "Termination grace period"). Kubernetes' default is 30.
# Run by tests/test_launch_scripts.py against a stand-in xpk (it checks the command line); see launch/README.md.

set -euo pipefail

WORKLOAD="${WORKLOAD:-sdjax-demo}"
TPU_TYPE="${TPU_TYPE:-v5litepod-16}"
NUM_SLICES="${NUM_SLICES:-1}"
CONFIG="${CONFIG:-configs/demo.py}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
GRACE_PERIOD="${GRACE_PERIOD:-300}"

location=()
if [[ -n "${ZONE:-}" ]]; then location+=(--zone "${ZONE}"); fi
if [[ -n "${PROJECT:-}" ]]; then location+=(--project "${PROJECT}"); fi

if [[ "${1:-}" == "delete" ]]; then
  # ${a[@]+"${a[@]}"}: an empty array expands to nothing under `set -u` in every bash (3.2, macOS's, included).
  xpk workload delete --cluster "${CLUSTER:?set CLUSTER}" --workload "${WORKLOAD}" ${location[@]+"${location[@]}"}
  exit 0
fi

# `exec`: xpk runs the command as `( COMMAND ) & PID=$!` and forwards SIGTERM to PID; with exec, PID is
# sdjax itself, which then saves a checkpoint and exits.
train=(exec sdjax train --config "${CONFIG}" --workdir /tmp/sdjax-run
       "--config.train.checkpoint_dir=gs://${BUCKET:?set BUCKET}/sdjax/${WORKLOAD}/checkpoints")
if [[ $# -gt 0 ]]; then train+=("$@"); fi
xpk workload create --cluster "${CLUSTER:?set CLUSTER}" --workload "${WORKLOAD}" --tpu-type "${TPU_TYPE}" \
  --num-slices "${NUM_SLICES}" --docker-image "${IMAGE:?set IMAGE}" --command "$(printf '%q ' "${train[@]}")" \
  --max-restarts "${MAX_RESTARTS}" --termination-grace-period-seconds "${GRACE_PERIOD}" \
  ${location[@]+"${location[@]}"}
echo "Logs of process 0: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=${WORKLOAD},batch.kubernetes.io/job-completion-index=0"
echo "Logs of every pod: kubectl logs -f --prefix --max-log-requests 64 -l jobset.sigs.k8s.io/jobset-name=${WORKLOAD}"
