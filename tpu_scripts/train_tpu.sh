#!/usr/bin/env bash
# Launch lostjax training on every host of a Cloud TPU VM slice (v4/v5e/v5p/v6e).
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a CONFIG=train/configs/llama.py:350m,lost WORKDIR=/mnt/nfs/runs/350m_lost \
#     EXTRA="--config.mesh.fsdp=8 --config.data.tokenizer_path=/mnt/nfs/t5/spiece.model" ./tpu_scripts/train_tpu.sh
#
# Each host runs the same command; `--distributed` calls jax.distributed.initialize(), the mesh spans all chips
# (data = chips / (fsdp x tensor)) and each host feeds its rows of the global batch. WORKDIR must be a directory
# every host can write (NFS/Filestore); rerunning the script resumes from the latest checkpoint there.
# Setup once per slice: `pip install -e ".[tfds]" "jax[tpu]"` in ~/lostjax on all workers (use --command below).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR}"
EXTRA="${EXTRA:-}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/lostjax && python3 -m train.main --distributed --config=$CONFIG --workdir=$WORKDIR $EXTRA"
