#!/usr/bin/env bash
# Issue 14, section 6: the DIFT step and the sampler on one GPU, jitted JAX against eager torch on the
# same GPU, computing in bf16, on the benches' 1.3B model (`--size 1b`: Qwen2.5-0.5B's decoder and
# Qwen2.5-VL's vision tower). About 9 minutes on an H100 (an estimate: it has not run there yet), most
# of it model set-up and compiles.
# Run from the repository root; the rows land in $OUT/PERFORMANCE_gpu.md as `fourd-jax bench`
# records them (with MFU against the data sheet), the output in $OUT/gpu_bench.log.
#
# On a machine without network whose image has jax[cuda] and torch (this project's lent machines),
# make the wheels first, here: `bash docs/gpu_wheels.sh` (into .whl/), and carry .whl along (the device
# tool: `carry: [".whl"]`, command `OUT=$OUT bash docs/gpu_bench.sh`, timeout_s 600).
# SIZE and EXAMPLES change the model and the batch: `SIZE=tiny EXAMPLES=4 bash docs/gpu_bench.sh`
# runs the same steps in a minute or two on a CPU.
set -uo pipefail
OUT=${OUT:-/tmp/fourd_gpu_bench}
SIZE=${SIZE:-1b}
EXAMPLES=${EXAMPLES:-16}
mkdir -p "$OUT"
log="$OUT/gpu_bench.log"
if [ -d .whl ]; then  # only what the image's packages do not already satisfy is installed
  python3 -m pip install -q --no-index --find-links .whl transformers==5.25.0 ml_collections tensorboardX \
    array_record grain flax optax chex orbax-checkpoint 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 FOURD_JAX_PERF_FILE="$OUT/PERFORMANCE_gpu.md"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # jax and torch share the GPU in each bench's process
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$log"
python3 -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', '| transformers', transformers.__version__)" \
  2>&1 | tee -a "$log"
bench() {  # a time limit in s, then the bench's arguments; one bench failing does not stop the others
  echo "== fourd-jax bench ${*:2}" | tee -a "$log"
  timeout "$1" python3 -m fourd_jax.cli bench "${@:2}" 2>&1 | grep -v -E "TPU|libtpu|InitGoogle|Source Location|^learning/" \
    | tee -a "$log"
}
bench 300 train --size "$SIZE" --dtype bfloat16 --examples "$EXAMPLES" --repeats 5
bench 130 sample --size "$SIZE" --dtype bfloat16 --rows 32 --repeats 3
bench 110 sample --size "$SIZE" --dtype bfloat16 --rows 4 --repeats 3
