"""Ahead-of-time compilation of every launch configuration of fastdiff's Triton kernels.

triton.compile with a GPUTarget needs no GPU. Run as a program it prints one JSON line per
compiled kernel (used by the tests, and the basis for shipping prebuilt kernels):

    python -m fastdiff.kernels.aot --arch 80 --arch 90

It must run without TRITON_INTERPRET=1: under the interpreter ``@triton.jit`` builds functions
that cannot be compiled.
"""
import argparse
import json
import os
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastdiff.kernels import attention, denoise_step, group_norm_silu

MODULES = {"group_norm_silu": group_norm_silu, "attention": attention,
           "denoise_step": denoise_step}


def compile_config(cfg, arch: int):
    # attrs (alignment hints, where a config gives them) make the build match what the JIT runs.
    src = ASTSource(cfg["fn"], cfg["signature"], cfg["constexprs"], cfg.get("attrs"))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


def compile_all(archs, ops=None):
    """Yields a summary dict per (op, configuration, arch); errors are reported, not raised."""
    for name, mod in MODULES.items():
        if ops and name not in ops:
            continue
        for cfg in mod.aot_configs():
            for arch in archs:
                rec = {"op": name, "kernel": cfg["fn"].__name__, "arch": arch,
                       "signature": cfg["signature"], "constexprs": cfg["constexprs"],
                       "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
                try:
                    k = compile_config(cfg, arch)
                    ptx = k.asm["ptx"]
                    rec.update(ok=True, shared=k.metadata.shared, cubin_bytes=len(k.asm["cubin"]),
                               mma=sorted(set(re.findall(r"\b(mma\.sync|wgmma\.mma_async)", ptx))))
                except Exception as err:  # noqa: BLE001 - the report names the configuration
                    rec.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000])
                yield rec


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("fastdiff.kernels.aot: unset TRITON_INTERPRET to compile kernels")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="SM version, e.g. 80, 90")
    p.add_argument("--op", action="append", choices=sorted(MODULES))
    args = p.parse_args(argv)
    failed = 0
    for rec in compile_all(args.arch or [80, 90], args.op):
        failed += not rec["ok"]
        print(json.dumps(rec), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
