"""The prebuilt kernels: cubins compiled ahead of time into the wheel, named to the C++
launcher (csrc/prebuilt.cpp) when fastdiff is imported on a machine with a GPU.

A wheel built by ``pip wheel .`` carries ``fastdiff/kernels/cubins/``: one cubin per (kernel
configuration, alignment variant, architecture), ``manifest.json`` (everything about each) and
``index.tsv`` (what the launcher reads at the first CUDA call). kernels/prebuild.py writes all
three; FASTDIFF_CUDA_ARCHS picks the architectures (default 80,86,89,90). A source or editable
install has none until ``make prebuilt``; the CUDA ops then run the Triton JIT.
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
    return _C._prebuilt_use_directory(directory or cubin_dir(), lazy=False)


def cpp_plan(op: str, *args) -> tuple:
    """Tests: the C++ plan of a CUDA call of op ``op`` (csrc/<op>.cpp ``plan``; its schema's
    positional arguments, checked): (launches, outputs, buffers, why no prebuilt kernel can run
    it or ""), each launch a dict of ``key``, ``grid`` (x, y, z) and ``args`` [(name, kind,
    bits)] as the launcher packs them. tests/test_prebuilt.py compares it with the Python plan."""
    text, outs, keep, why = getattr(torch.ops.fastdiff, f"_prebuilt_plan_{op}")(*args)
    launches = []
    for line in text.splitlines():  # key TAB gx,gy,gz TAB name:kind:bits;...
        key, grid, params = line.split("\t")
        launches.append({"key": key, "grid": tuple(int(g) for g in grid.split(",")),
                         "args": [(n, k, int(b)) for n, k, b in
                                  (p.split(":") for p in params.split(";") if p)]})
    return launches, outs[0] if len(outs) == 1 else tuple(outs), keep, why


def load_if_cuda() -> None:
    """At import: where a GPU could run them, names the package's cubins to the C++ launcher,
    which reads their index (index.tsv) at the first CUDA call, so importing costs nothing."""
    _C._prebuilt_clear()
    if torch.cuda.is_available():
        _C._prebuilt_use_directory(cubin_dir(), lazy=True)
