#!/usr/bin/env bash
# Run `fourd-jax` on one GPU node (all its GPUs in one process, e.g. 8xH100 with mesh preset 8xh100).
#
#   launch/gpu_node.sh WORKDIR ARGS...
#   e.g. launch/gpu_node.sh runs/7b dift --config dift:qwen25vl_7b,8xh100 --data data/dift
#
# Expects: NVIDIA drivers and CUDA 12; installs this checkout with jax[cuda12] into .venv-gpu once.
set -euo pipefail
workdir=${1:?WORKDIR}; shift
cd "$(dirname "$0")/.."
if [ ! -x .venv-gpu/bin/fourd-jax ]; then
  python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q -e . "jax[cuda12]"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec .venv-gpu/bin/fourd-jax "$@" --workdir "$workdir"
