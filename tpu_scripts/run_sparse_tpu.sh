#!/usr/bin/env bash
# Times the LOST sparse paths on worker 0 of a TPU VM (bench/sparse_tpu.py: the Pallas TPU kernel `pallas_tpu`
# against the XLA gather `gather_xla` and the fused paths, per layer and in the 60M/350M train step) and copies
# the JSON back. `model.sparse_impl='auto'` picks gather_xla on TPU until this benchmark shows pallas_tpu faster
# in the train step (the JSON's "auto_tpu" key).
# Usage: TPU_NAME=<name> ZONE=<zone> [REPO_DIR=~/lostjax] [PROJECT=<gcp project>] [EXTRA="--model-tokens 16384"] \
#          ./tpu_scripts/run_sparse_tpu.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
REPO_DIR="${REPO_DIR:-~/lostjax}"
EXTRA="${EXTRA:-}"
OUT_JSON="${OUT_JSON:-sparse_tpu_$(date -u +%Y%m%dT%H%M%SZ).json}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "${PROJECT}"); fi

CMD="cd ${REPO_DIR} && python3 bench/sparse_tpu.py --out /tmp/sparse_tpu.json ${EXTRA} > /tmp/sparse_tpu.log 2>&1; \
  tail -c 400 /tmp/sparse_tpu.json"

gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" "${PROJECT_FLAG[@]}" --worker=0 --command "${CMD}"
gcloud compute tpus tpu-vm scp "${TPU_NAME}:/tmp/sparse_tpu.json" "${OUT_JSON}" --zone "${ZONE}" \
  "${PROJECT_FLAG[@]}" --worker=0
echo "wrote ${OUT_JSON}"
