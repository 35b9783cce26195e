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

from fastdiff import _C  # noqa: F401 - its import registers torch.ops.fastdiff.*

_reg = torch.ops.fastdiff


# ---- the C++ launcher's registry (csrc/prebuilt.h), through its ops fastdiff::_prebuilt_* ----

def launch_line(launch: dict) -> str:
    """A planned launch ({key, grid, args: [(name, kind, bits)]}) as the launcher's text line."""
    return "\t".join([launch["key"], ",".join(str(int(g)) for g in launch["grid"]),
                      ";".join(f"{n}:{k}:{int(b) & (2**64 - 1)}" for n, k, b in launch["args"])])


def register(key: str, arch: int, path: str, name: str, param_names: list[str],
             param_bytes: list[int], aligned: list[int], num_warps: int, shared: int,
             global_scratch_size: int, profile_scratch_size: int) -> None:
    """Registers one compiled kernel (prebuilt.h register_kernel)."""
    _reg._prebuilt_register(key, arch, path, name, ",".join(param_names), list(param_bytes),
                            list(aligned), num_warps, shared, global_scratch_size,
                            profile_scratch_size)


def use_directory(directory: str, lazy: bool = False) -> int:
    """Registers the kernels of <directory>/index.tsv, replacing what was registered; lazy: at
    the first use. How many were registered, or -1 when lazy."""
    return _reg._prebuilt_use_directory(directory, lazy)


def clear() -> None:
    _reg._prebuilt_clear()


def count() -> int:
    """How many kernels are registered now."""
    return _reg._prebuilt_count()


def forget_loaded() -> None:
    """Forgets which cubins were loaded (first-call benchmarks: as in a new process)."""
    _reg._prebuilt_forget_loaded()


def mode() -> str:
    """The prebuilt mode: 'off', 'on' or 'require' (FASTDIFF_PREBUILT)."""
    return _reg._prebuilt_mode()


def set_mode(name: str) -> str:
    """Sets the prebuilt mode; returns the previous one."""
    return _reg._prebuilt_set_mode(name)


def select(launch: dict, arch: int) -> tuple[str, str]:
    """The registered cubin a planned launch would run on sm_<arch>, or why none: (path, why)."""
    return tuple(_reg._prebuilt_select(launch_line(launch), arch))


def hold_and_read(launch: dict, arch: int, reads: int, change_registry: bool) -> tuple:
    """Tests: the registry's ownership of what a launch resolved (prebuilt.h hold_and_read):
    (name, why, live, intact)."""
    return tuple(_reg._prebuilt_hold_and_read(launch_line(launch), arch, reads, change_registry))


def live_entries() -> int:
    return _reg._prebuilt_live_entries()


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
    return use_directory(directory or cubin_dir(), lazy=False)


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
    clear()
    if torch.cuda.is_available():
        use_directory(cubin_dir(), lazy=True)
