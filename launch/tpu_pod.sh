#!/usr/bin/env bash
# Run `fourd-jax dift` (or rl) on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh [--print-only] create  NAME ZONE ACCELERATOR [VERSION]  # e.g. my-run us-east5-a v5p-64
#   launch/tpu_pod.sh [--print-only] setup   NAME ZONE                        # copy this checkout, install it everywhere
#   launch/tpu_pod.sh [--print-only] run     NAME ZONE WORKDIR -- ARGS...     # e.g. -- dift --config dift:qwen25vl_7b,v5p-64
#   launch/tpu_pod.sh [--print-only] logs    NAME ZONE WORKDIR                # each worker's log into ./logs/NAME/
#   launch/tpu_pod.sh [--print-only] delete  NAME ZONE
#
# `run` first compiles the job's program for the slice on worker 0 (`fourd-jax compile`, seconds to
# minutes), so a program that does not fit the chips' HBM fails before every worker starts; then it
# starts the job on all workers. The slice's accelerator type is read with `gcloud ... describe`
# (or taken from $ACCELERATOR). --print-only prints the gcloud commands instead of running them.
#
# Expects: gcloud authenticated with a project set; WORKDIR on storage every worker sees, normally
# gs://BUCKET/PATH (checkpoints, metrics, the tokenizer and the manifest all go there; Orbax writes
# each checkpoint from all workers together). Records may be on gs:// too. JAX finds the other
# workers itself (jax.distributed.initialize() with no arguments on TPU).
set -euo pipefail
print_only=0
if [ "${1:-}" = "--print-only" ]; then print_only=1; shift; fi
cmd=${1:?usage: tpu_pod.sh [--print-only] create|setup|run|logs|delete NAME ZONE ...}; name=${2:?NAME}; zone=${3:?ZONE}
run() { if [ "$print_only" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
ssh_workers() { run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker="$1" --command "$2"; }
case "$cmd" in
  create)
    accel=${4:?ACCELERATOR e.g. v5p-64}
    case "$accel" in  # the TPU VM software version of each generation
      v5litepod-*|v5e-*) default_version=v2-alpha-tpuv5-lite ;;
      v6e-*) default_version=v2-alpha-tpuv6e ;;
      *) default_version=v2-alpha-tpuv5 ;;
    esac
    version=${5:-$default_version}
    run gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" --version "$version" ;;
  setup)
    run tar czf /tmp/fourd_jax_src.tgz --exclude .git --exclude .venv -C "$(dirname "$0")/.." .
    run gcloud compute tpus tpu-vm scp /tmp/fourd_jax_src.tgz "$name":~/ --zone "$zone" --worker=all
    ssh_workers all 'mkdir -p ~/fourd_jax && tar xzf ~/fourd_jax_src.tgz -C ~/fourd_jax && cd ~/fourd_jax &&
             python3 -m venv .venv && .venv/bin/pip install -q -e . "jax[tpu]"' ;;
  run)
    workdir=${4:?WORKDIR}; shift 4; [ "${1:-}" = "--" ] && shift
    stage=${1:?ARGS: dift|rl ...}
    case "$stage" in dift|rl) ;; *) echo "tpu_pod.sh: run takes dift or rl, not '$stage'" >&2; exit 2 ;; esac
    accel=${ACCELERATOR:-}
    if [ -z "$accel" ]; then
      if [ "$print_only" = 1 ]; then echo "tpu_pod.sh: --print-only run needs ACCELERATOR=TYPE" >&2; exit 2; fi
      accel=$(gcloud compute tpus tpu-vm describe "$name" --zone "$zone" --format 'value(acceleratorType)')
    fi
    job=("$@")
    # The config flags of the job (--config SPEC, --config=SPEC, --config.KEY=VALUE) are what the compile reads.
    compile_args=()
    for ((i = 1; i < ${#job[@]}; i++)); do
      case "${job[i]}" in
        --config) compile_args+=("${job[i]}" "${job[i + 1]:-}"); i=$((i + 1)) ;;
        --config=*|--config.*) compile_args+=("${job[i]}") ;;
      esac
    done
    ssh_workers 0 "cd ~/fourd_jax && .venv/bin/fourd-jax compile --stage $stage --topology $accel $(printf '%q ' "${compile_args[@]}")"
    ssh_workers all "cd ~/fourd_jax && nohup .venv/bin/fourd-jax $(printf '%q ' "${job[@]}")--workdir $workdir > ~/fourd_jax_run.log 2>&1 &" ;;
  logs)
    run mkdir -p "logs/$name"
    workers=$(gcloud compute tpus tpu-vm describe "$name" --zone "$zone" --format 'value(networkEndpoints.len())')
    for ((i = 0; i < workers; i++)); do
      run gcloud compute tpus tpu-vm scp "$name":~/fourd_jax_run.log "logs/$name/worker-$i.log" --zone "$zone" --worker=$i
    done ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet ;;
  *) echo "tpu_pod.sh: unknown command '$cmd' (create, setup, run, logs, delete)" >&2; exit 2 ;;
esac
