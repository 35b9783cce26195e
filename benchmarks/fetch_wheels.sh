#!/usr/bin/env bash
# Downloads, here (with internet), the wheels the GPU machine lacks into .whl/ (ignored by git,
# carried by the device tool) for benchmarks/gpu.sh, which installs them into /tmp/site there.
# The machine (Python 3.12, x86-64, no internet) has torch, triton, numpy, pytest,
# pytest-benchmark, ninja, transformers 5.17, huggingface_hub 1.33, safetensors 0.8, pillow,
# regex, requests, filelock and zipp (/work/.library/device/KINDS.md), which covers what
# diffusers 0.42.1 requires (huggingface-hub>=1.32, safetensors>=0.8, ...) but for
# importlib_metadata and, under it, lazy-importer. So only those travel: 6.2 MB, leaving
# room under the 64 MiB a call may carry for kernels/cubins (sm_90, ~20 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
plat=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  plat="$plat --platform $p"
done
PKGS="diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0"
mkdir -p .whl
for p in $PKGS; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $plat -d .whl "$p"
done
du -sh .whl
