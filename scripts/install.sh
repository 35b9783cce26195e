#!/usr/bin/env bash
# Installs fastdiff and what it needs into the current Python, then builds the C++ extension.
#   scripts/install.sh          the library and the digits application (scikit-learn, pillow)
#   scripts/install.sh test     plus the test and benchmark extras (pytest, diffusers, numpy<2.4)
# torch: the one already installed is kept (a GPU machine's own CUDA build); where none is,
# the CPU wheel torch==2.13.0 is installed, never a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Nothing to do (a rerun of make sample / make test): fastdiff is installed from this tree, its
# extension is newer than every C++ source and build file, and the mode's extras import.
needs="import torch, triton, fastdiff, os, sys; import sklearn, PIL"
[ "${1:-}" = "test" ] && needs="$needs; import pytest, xdist, pytest_benchmark, diffusers, transformers"
so=$(ls fastdiff/_C*.so 2>/dev/null | head -n 1 || true)
if [ -n "$so" ] && [ -z "$(find csrc setup.py pyproject.toml -newer "$so" 2>/dev/null)" ] \
   && "$PY" -c "$needs; sys.exit(os.path.realpath(os.path.dirname(fastdiff.__file__))
                                 != os.path.realpath('fastdiff'))" 2>/dev/null; then
  exit 0
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
# A constraint keeps pip from swapping the installed torch while resolving the rest.
torch_pin=$(mktemp)
trap 'rm -f "$torch_pin"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$torch_pin"
"$PY" -m pip install -q -c "$torch_pin" "setuptools>=64" wheel ninja numpy
# A triton already there (the one a CUDA torch brings) is kept; else the version tested here.
if ! "$PY" -c "import triton" 2>/dev/null; then
  "$PY" -m pip install -q -c "$torch_pin" triton==3.6.0
fi
extra="[digits]"
if [ "${1:-}" = "test" ]; then
  extra="[test]"
fi
"$PY" -m pip install -q -c "$torch_pin" --no-build-isolation -e ".${extra}"
