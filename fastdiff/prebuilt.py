"""The prebuilt kernels: cubins compiled ahead of time into the wheel, registered with the C++
launcher (csrc/aot.cpp) when fastdiff is imported on a machine with a GPU.

A wheel built by ``pip wheel .`` carries ``fastdiff/kernels/cubins/``: one cubin per (kernel
configuration, alignment variant, architecture) and ``manifest.json`` (kernels/aot.py writes
both; FASTDIFF_CUDA_ARCHS picks the architectures, default 80,86,89,90). A source or editable
install has none until ``make cubins``; the CUDA ops then run the Triton JIT.
"""
from __future__ import annotations

import importlib.util
import json
import os

import torch

from fastdiff import _C


def cubin_dir() -> str:
    """Where the installed package keeps its cubins (fastdiff/kernels/cubins)."""
    spec = importlib.util.find_spec("fastdiff.kernels")
    return os.path.join(list(spec.submodule_search_locations)[0], "cubins")


def manifest(directory: str | None = None) -> dict | None:
    """The manifest of the prebuilt kernels, or None when there are none."""
    path = os.path.join(directory or cubin_dir(), "manifest.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load(directory: str | None = None) -> int:
    """Registers every prebuilt kernel of ``directory`` (default: the package's) with the C++
    launcher, replacing what was registered before. Returns how many were registered."""
    directory = directory or cubin_dir()
    m = manifest(directory)
    _C._aot_clear()
    if m is None:
        return 0
    n = 0
    for k in m["kernels"]:
        path = os.path.join(directory, k["file"])
        # cuLaunchKernel launches single-CTA kernels (all of fastdiff's); the file must exist.
        if k["num_ctas"] != 1 or not os.path.exists(path):
            continue
        names = [p["name"] for p in k["params"]][:-2]  # without the two scratch pointers
        _C._aot_register(k["key"], k["arch"], path, k["name"], names, k["ptx_param_bytes"],
                         k["aligned"], k["num_warps"], k["shared"], k["global_scratch_size"],
                         k["profile_scratch_size"])
        n += 1
    return n


def load_if_cuda() -> int:
    """At import: registers the prebuilt kernels where a GPU could run them."""
    return load() if torch.cuda.is_available() else 0
