#!/usr/bin/env bash
# Run `fourd-jax dift` (or rl) on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh create  NAME ZONE ACCELERATOR [VERSION]   # e.g. my-run us-east5-a v5p-64
#   launch/tpu_pod.sh setup   NAME ZONE                         # copy this checkout, install it on all workers
#   launch/tpu_pod.sh run     NAME ZONE WORKDIR -- ARGS...      # e.g. -- dift --config dift:qwen25vl_7b,v5p-64
#   launch/tpu_pod.sh logs    NAME ZONE WORKDIR                 # collect each worker's log into ./logs/NAME/
#   launch/tpu_pod.sh delete  NAME ZONE
#
# Expects: gcloud authenticated with a project set; WORKDIR on storage every worker sees (a gs://
# path or a mounted filesystem) since Orbax checkpoints are written by all workers together.
# JAX finds the other workers itself (jax.distributed.initialize() with no arguments on TPU).
set -euo pipefail
cmd=${1:?usage: tpu_pod.sh create|setup|run|logs|delete NAME ZONE ...}; name=${2:?NAME}; zone=${3:?ZONE}
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }
case "$cmd" in
  create)
    accel=${4:?ACCELERATOR e.g. v5p-64}; version=${5:-v2-alpha-tpuv5}
    gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" --version "$version" ;;
  setup)
    tar czf /tmp/fourd_jax_src.tgz --exclude .git --exclude .venv -C "$(dirname "$0")/.." .
    gcloud compute tpus tpu-vm scp /tmp/fourd_jax_src.tgz "$name":~/ --zone "$zone" --worker=all
    ssh_all 'mkdir -p ~/fourd_jax && tar xzf ~/fourd_jax_src.tgz -C ~/fourd_jax && cd ~/fourd_jax &&
             python3 -m venv .venv && .venv/bin/pip install -q -e . "jax[tpu]"' ;;
  run)
    workdir=${4:?WORKDIR}; shift 4; [ "${1:-}" = "--" ] && shift
    ssh_all "cd ~/fourd_jax && nohup .venv/bin/fourd-jax $* --workdir $workdir > ~/fourd_jax_run.log 2>&1 &" ;;
  logs)
    mkdir -p "logs/$name"
    workers=$(gcloud compute tpus tpu-vm describe "$name" --zone "$zone" --format 'value(networkEndpoints.len())')
    for ((i = 0; i < workers; i++)); do
      gcloud compute tpus tpu-vm scp "$name":~/fourd_jax_run.log "logs/$name/worker-$i.log" --zone "$zone" --worker=$i
    done ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet ;;
  *) echo "tpu_pod.sh: unknown command '$cmd' (create, setup, run, logs, delete)" >&2; exit 2 ;;
esac
