#!/usr/bin/env bash
# Cloud TPU VM life cycle for lostjax: create a slice, copy the code, install, launch training detached on every
# worker, read the log, stop (SIGTERM: the run saves a checkpoint and exits) and delete.
#
#   tpu_scripts/tpu.sh create --name my-v5e --zone us-west4-a --accelerator v5litepod-16 --version v2-alpha-tpuv5-lite
#   tpu_scripts/tpu.sh sync   --name my-v5e --zone us-west4-a          # this checkout -> ~/lostjax on all workers
#   tpu_scripts/tpu.sh setup  --name my-v5e --zone us-west4-a          # pip install -e ".[tfds,hf]" "jax[tpu]"
#   tpu_scripts/tpu.sh launch --name my-v5e --zone us-west4-a --config train/configs/llama.py:350m,lost \
#       --workdir gs://bucket/runs/350m_lost --extra "--config.mesh.fsdp=8"
#   tpu_scripts/tpu.sh logs   --name my-v5e --zone us-west4-a [--worker 0] [--follow]
#   tpu_scripts/tpu.sh stop   --name my-v5e --zone us-west4-a
#   tpu_scripts/tpu.sh delete --name my-v5e --zone us-west4-a
#
# Common options: --project P (else gcloud's default), --repo_dir (remote checkout, default ~/lostjax), --dry_run
# (print the gcloud commands, one per line, shell-quoted, and run nothing). create also takes --spot. launch runs
# `python3 -m train.main --distributed` with nohup on every worker (log ~/lostjax_train.log, pid
# ~/lostjax_train.pid); rerunning launch with the same --workdir resumes from its latest checkpoint. The workdir
# must be shared by all workers (a gs:// bucket or NFS). Check memory first with --summary_only.
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

[[ $# -ge 1 ]] || usage
SUB="$1"; shift
case "$SUB" in create|setup|sync|launch|logs|stop|delete) ;; -h|--help) usage 0 ;;
  *) echo "error: unknown subcommand '$SUB' (create, setup, sync, launch, logs, stop, delete)" >&2; exit 2 ;; esac

NAME="" ZONE="" ACCEL="" VERSION="" PROJECT="" REPO_DIR='~/lostjax' DRY=0 SPOT=0
CONFIG="" WORKDIR="" EXTRA="" WORKER=0 FOLLOW=0 LINES=100
LOCAL_DIR="$(cd "$(dirname "$0")/.." && pwd)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator) ACCEL="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --repo_dir) REPO_DIR="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --extra) EXTRA="$2"; shift 2 ;;
    --worker) WORKER="$2"; shift 2 ;;
    --lines) LINES="$2"; shift 2 ;;
    --follow) FOLLOW=1; shift ;;
    --spot) SPOT=1; shift ;;
    --dry_run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "error: unknown option '$1'" >&2; exit 2 ;;
  esac
done

need() { [[ -n "$2" ]] || { echo "error: $SUB needs --$1" >&2; exit 2; }; }
need name "$NAME"; need zone "$ZONE"
if [[ "$SUB" == create ]]; then need accelerator "$ACCEL"; need version "$VERSION"; fi
if [[ "$SUB" == launch ]]; then need config "$CONFIG"; need workdir "$WORKDIR"; fi

# One shell word: as is when it holds only safe characters, else single-quoted.
quote() { if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi; }
run() {
  if [[ $DRY == 1 ]]; then
    local out="" a
    for a in "$@"; do out+="${out:+ }$(quote "$a")"; done
    echo "$out"
  else
    "$@"
  fi
}

LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
ssh_all() { run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }
TARBALL="/tmp/lostjax-src-${NAME}.tar.gz"
LOG='~/lostjax_train.log'
PID='~/lostjax_train.pid'

case "$SUB" in
  create)
    args=(gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
    [[ $SPOT == 1 ]] && args+=(--spot)
    run "${args[@]}" ;;
  sync)
    run tar -czf "$TARBALL" --exclude=.git --exclude=runs --exclude=__pycache__ --exclude='*.egg-info' \
      -C "$LOCAL_DIR" .
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:/tmp/lostjax-src.tar.gz" "${LOC[@]}" --worker=all
    ssh_all "mkdir -p $REPO_DIR && tar -xzf /tmp/lostjax-src.tar.gz -C $REPO_DIR" ;;
  setup)
    ssh_all "cd $REPO_DIR && python3 -m pip install -U pip && python3 -m pip install -e '.[tfds,hf]' 'jax[tpu]'" ;;
  launch)
    ssh_all "cd $REPO_DIR && nohup python3 -m train.main --distributed --config=$CONFIG --workdir=$WORKDIR${EXTRA:+ $EXTRA} > $LOG 2>&1 < /dev/null & echo \$! > $PID" ;;
  logs)
    if [[ $FOLLOW == 1 ]]; then tail_cmd="tail -n $LINES -f $LOG"; else tail_cmd="tail -n $LINES $LOG"; fi
    run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$WORKER" --command="$tail_cmd" ;;
  stop)
    ssh_all "if [ -f $PID ]; then kill -TERM \$(cat $PID) 2>/dev/null || true; rm -f $PID; fi" ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet ;;
esac
