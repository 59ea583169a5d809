#!/usr/bin/env bash
# Run `fourd-jax` on one GPU node (all its GPUs in one process, e.g. 8xH100 with mesh preset 8xh100).
#
#   launch/gpu_node.sh [--print-only] WORKDIR ARGS...
#   e.g. launch/gpu_node.sh runs/7b dift --config dift:qwen25vl_7b,8xh100 --data data/dift
#
# Expects: NVIDIA drivers and CUDA 12; installs this checkout with jax[cuda12] into .venv-gpu once.
# WORKDIR and --data may be local paths or gs://BUCKET/PATH (with Google credentials on the node;
# see docs/TRAINING.md, "Cloud storage"). --print-only prints the commands instead of running them.
set -euo pipefail
print_only=0
if [ "${1:-}" = "--print-only" ]; then print_only=1; shift; fi
workdir=${1:?WORKDIR}; shift
run() { if [ "$print_only" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
cd "$(dirname "$0")/.."
if [ ! -x .venv-gpu/bin/fourd-jax ]; then
  run python3 -m venv .venv-gpu
  run .venv-gpu/bin/pip install -q -e . "jax[cuda12]"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
if [ "$print_only" = 1 ]; then run .venv-gpu/bin/fourd-jax "$@" --workdir "$workdir"; exit 0; fi
exec .venv-gpu/bin/fourd-jax "$@" --workdir "$workdir"
