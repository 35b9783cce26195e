"""``fastdiff info``: what this install has (extension, ops and their dispatch keys, versions,
devices, the prebuilt kernels and which of them a GPU here would run)."""
from __future__ import annotations

import os

import torch

def info_lines(cubin_dir: str | None = None) -> list[str]:
    """What this install has: the extension and its ops, versions, devices, prebuilt kernels."""
    import fastdiff
    from fastdiff import _C, prebuilt

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [f"fastdiff {fastdiff.__version__} at {os.path.dirname(fastdiff.__file__)}",
             f"extension: {_C.__file__}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}"]
    names = torch._C._dispatch_get_all_op_names()
    # The public ops; their helpers (_check_<op>, _jit_<op>, ...) are left out.
    for op in sorted(n.split("::")[1] for n in names
                     if n.startswith("fastdiff::") and not n.startswith("fastdiff::_")):
        keys = [k for k in ("CPU", "CUDA", "Meta")
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiff::{op}", k)]
        lines.append(f"op fastdiff.{op}: {', '.join(keys)}")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        lines.append(f"GPU: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append("GPU: none (the CPU kernels run)")
    cubin_dir = cubin_dir or prebuilt.cubin_dir()
    m = prebuilt.manifest(cubin_dir)
    if m is not None:
        archs = ", ".join(f"sm_{a}" for a in m["archs"])
        lines.append(f"{len(m['kernels'])} prebuilt kernels (triton {m['triton']}) for {archs} "
                     f"in {cubin_dir}")
        for arch in m["archs"]:
            ks = [k for k in m["kernels"] if k["arch"] == arch]
            size = sum(k["cubin_bytes"] for k in ks)
            lines.append(f"  sm_{arch}: {len(ks)} cubins, {size / 2**20:.1f} MiB "
                         f"({', '.join(sorted({k['kernel'] for k in ks}))})")
        lines.append(f"prebuilt mode: {prebuilt.mode()} (FASTDIFF_PREBUILT); registered now: "
                     f"{prebuilt.count()}")
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            arch = major * 10 + minor
            fit = [a for a in m["archs"] if a <= arch and a // 10 == major]
            lines.append(f"this GPU (sm_{arch}) runs " + (f"the sm_{max(fit)} cubins" if fit else
                                                          "the Triton JIT (no cubins for it)"))
    else:
        lines.append("prebuilt kernels: none (CUDA ops compile with the Triton JIT on first use;"
                     " `pip wheel .` or `make prebuilt` builds them)")
    return lines
