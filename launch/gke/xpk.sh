#!/usr/bin/env bash
# `sdjax train` on a GKE TPU cluster through xpk (https://github.com/AI-Hypercomputer/xpk), which writes the
# JobSet (compare jobset.yaml) for you. Create the cluster once with `xpk cluster create`, build and push the
# image from launch/gke/Dockerfile, then:
#   CLUSTER=my-cluster IMAGE=REGION-docker.pkg.dev/PROJECT/REPO/sdjax:latest BUCKET=my-bucket launch/gke/xpk.sh
#   CLUSTER=my-cluster launch/gke/xpk.sh delete
# Optional: WORKLOAD [sdjax-demo], TPU_TYPE [v5litepod-16], NUM_SLICES [1], ZONE, PROJECT (xpk's defaults:
# gcloud's), CONFIG [configs/demo.py], extra `sdjax train` flags as arguments.
# Untested here (no Google Cloud access from where it was written); see launch/README.md.

set -euo pipefail

WORKLOAD="${WORKLOAD:-sdjax-demo}"
TPU_TYPE="${TPU_TYPE:-v5litepod-16}"
NUM_SLICES="${NUM_SLICES:-1}"
CONFIG="${CONFIG:-configs/demo.py}"

location=()
if [[ -n "${ZONE:-}" ]]; then location+=(--zone "${ZONE}"); fi
if [[ -n "${PROJECT:-}" ]]; then location+=(--project "${PROJECT}"); fi

if [[ "${1:-}" == "delete" ]]; then
  xpk workload delete --cluster "${CLUSTER:?set CLUSTER}" --workload "${WORKLOAD}" "${location[@]}"
  exit 0
fi

train=(sdjax train --config "${CONFIG}" --workdir /tmp/sdjax-run
       "--config.train.checkpoint_dir=gs://${BUCKET:?set BUCKET}/sdjax/${WORKLOAD}/checkpoints" "$@")
xpk workload create --cluster "${CLUSTER:?set CLUSTER}" --workload "${WORKLOAD}" --tpu-type "${TPU_TYPE}" \
  --num-slices "${NUM_SLICES}" --docker-image "${IMAGE:?set IMAGE}" --command "$(printf '%q ' "${train[@]}")" \
  "${location[@]}"
echo "Logs of process 0: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=${WORKLOAD},batch.kubernetes.io/job-completion-index=0"
