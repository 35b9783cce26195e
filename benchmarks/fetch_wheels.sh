#!/usr/bin/env bash
# Downloads, here (with internet), the wheels the GPU machine lacks into .whl/ for
# benchmarks/gpu.sh: the GPU machine has torch, triton, numpy, pytest, pytest-benchmark and
# ninja, and no internet. Python 3.12, x86-64 (see /work/.library/device/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
plat=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  plat="$plat --platform $p"
done
PKGS="diffusers==0.42.1 transformers huggingface_hub tokenizers safetensors tqdm regex pillow
      filelock fsspec pyyaml packaging requests hf-xet typing_extensions importlib_metadata zipp
      py-cpuinfo charset_normalizer idna urllib3 certifi"
mkdir -p .whl
for p in $PKGS; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $plat -d .whl "$p"
done
du -sh .whl
