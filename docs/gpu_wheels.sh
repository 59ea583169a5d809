#!/usr/bin/env bash
# The wheels docs/gpu_bench.sh installs on a GPU machine without network whose image already holds
# jax[cuda], torch, numpy and the common libraries (as this project's lent machines do): what such an
# image lacks or holds too old (transformers >= 5.23 and its hub, the data and config libraries), with
# their dependencies, for CPython 3.12 on x86-64 Linux, minus the large wheels the image has. pip picks
# from these on the machine only what its installed packages do not already satisfy.
#
#   bash docs/gpu_wheels.sh            # -> .whl/ (about 45 MB; .gitignore keeps it out of git)
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$dest" transformers==5.25.0 ml_collections==1.1.0 tensorboardX==2.6.5 array_record==0.8.6 grain==0.2.18 \
  flax==0.12.8 optax==0.2.8 chex==0.1.92 orbax-checkpoint==0.12.8
# The image's own (newer) builds of these serve: jax and jaxlib with their CUDA plugins above all.
for big in numpy jax jaxlib scipy ml_dtypes tensorstore opt_einsum; do
  rm -f "$dest/$big"-[0-9]*.whl
done
du -sh "$dest"
