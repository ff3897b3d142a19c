#!/usr/bin/env bash
# Runs the per-layer LOST benchmark (bench/layers.py) on worker 0 of a TPU VM and copies the JSON back.
# Usage: TPU_NAME=<name> ZONE=<zone> [REPO_DIR=~/lostjax] [PROJECT=<gcp project>] ./tpu_scripts/run_layers_tpu.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
REPO_DIR="${REPO_DIR:-~/lostjax}"
OUT_JSON="${OUT_JSON:-layers_tpu_$(date -u +%Y%m%dT%H%M%SZ).json}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "${PROJECT}"); fi

CMD="cd ${REPO_DIR} && python bench/layers.py --sizes 60m,130m,350m,1b --layers 'd->d,d->ff' \
  --tokens 16384 --dtype bfloat16 --reps 20 > /tmp/layers_tpu.json && tail -c 300 /tmp/layers_tpu.json"

gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" "${PROJECT_FLAG[@]}" --worker=0 --command "${CMD}"
gcloud compute tpus tpu-vm scp "${TPU_NAME}:/tmp/layers_tpu.json" "${OUT_JSON}" --zone "${ZONE}" \
  "${PROJECT_FLAG[@]}" --worker=0
echo "wrote ${OUT_JSON}"
