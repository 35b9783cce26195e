"""Ahead-of-time compilation of every launch configuration of fastdiff's Triton kernels.

triton.compile with a GPUTarget needs no GPU. Run as a program it prints one JSON line per
compiled kernel (used by the tests), and with ``--emit DIR`` writes the cubins and a
``manifest.json`` describing how to launch each (the basis for shipping prebuilt kernels):

    python -m fastdiff.kernels.aot --arch 80 --arch 90 [--emit DIR]

Launch ABI of a Triton 3.6 cubin (``launch_params``): the non-constexpr arguments in signature
order (pointers as 8-byte device addresses, scalars in their own width, floats as their bits),
then two 8-byte pointers, the global and the profile scratch buffers (null when their size is 0),
launched with num_warps * 32 threads and ``shared`` bytes of dynamic shared memory.

It must run without TRITON_INTERPRET=1: under the interpreter ``@triton.jit`` builds functions
that cannot be compiled.
"""
import argparse
import hashlib
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


# Triton scalar type -> (C type a launcher passes, bytes); pointers are 8-byte device addresses.
_SCALARS = {"i1": ("int8_t", 1), "i8": ("int8_t", 1), "i16": ("int16_t", 2),
            "i32": ("int32_t", 4), "i64": ("int64_t", 8), "u1": ("uint8_t", 1),
            "u8": ("uint8_t", 1), "u16": ("uint16_t", 2), "u32": ("uint32_t", 4),
            "u64": ("uint64_t", 8), "fp16": ("uint16_t", 2), "bf16": ("uint16_t", 2),
            "fp32": ("float", 4), "f32": ("float", 4), "fp64": ("double", 8)}
_PTX_BYTES = {"u64": 8, "b64": 8, "s64": 8, "f64": 8, "u32": 4, "b32": 4, "s32": 4, "f32": 4,
              "u16": 2, "b16": 2, "s16": 2, "f16": 2, "u8": 1, "b8": 1, "s8": 1}


def launch_params(signature: dict, constexprs: dict) -> list[dict]:
    """The kernel parameters a launcher packs, in order: [{name, type, ctype, bytes}]."""
    params = []
    for name, ty in signature.items():
        if name in constexprs or ty == "constexpr":
            continue
        ctype, size = ("CUdeviceptr", 8) if ty.startswith("*") else _SCALARS[ty]
        params.append({"name": name, "type": ty, "ctype": ctype, "bytes": size})
    for name in ("global_scratch", "profile_scratch"):
        params.append({"name": name, "type": "*i8", "ctype": "CUdeviceptr", "bytes": 8})
    return params


def ptx_param_bytes(ptx: str, kernel: str) -> list[int]:
    """The byte widths of a kernel's parameters as the PTX entry declares them."""
    m = re.search(r"\.entry\s+" + re.escape(kernel) + r"\s*\(([^)]*)\)", ptx, re.S)
    if m is None:
        raise ValueError(f"no .entry {kernel} in the PTX")
    return [_PTX_BYTES[t] for t in re.findall(r"\.param\s+\.(\w+)", m.group(1))]


def compile_config(cfg, arch: int):
    # attrs (alignment hints, where a config gives them) make the build match what the JIT runs.
    src = ASTSource(cfg["fn"], cfg["signature"], cfg["constexprs"], cfg.get("attrs"))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


def compile_all(archs, ops=None, emit=False):
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
                    md = k.metadata
                    rec.update(ok=True, shared=md.shared, cubin_bytes=len(k.asm["cubin"]),
                               mma=sorted(set(re.findall(r"\b(mma\.sync|wgmma\.mma_async)", ptx))),
                               name=md.name, num_ctas=md.num_ctas,
                               global_scratch_size=md.global_scratch_size,
                               profile_scratch_size=md.profile_scratch_size,
                               params=launch_params(cfg["signature"], cfg["constexprs"]),
                               ptx_param_bytes=ptx_param_bytes(ptx, md.name))
                    if emit:
                        rec["cubin"] = k.asm["cubin"]
                except Exception as err:  # noqa: BLE001 - the report names the configuration
                    rec.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000])
                yield rec


def emit(records, out_dir: str) -> dict:
    """Writes each record's cubin to out_dir and returns the manifest (also written there)."""
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for rec in records:
        cubin = rec.pop("cubin")
        digest = hashlib.sha256(cubin).hexdigest()
        fname = f"{rec['kernel']}-{digest[:16]}-sm{rec['arch']}.cubin"
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(cubin)
        entries.append({**{k: v for k, v in rec.items() if k not in ("ok", "mma")},
                        "file": fname, "sha256": digest})
    manifest = {"triton": triton.__version__, "archs": sorted({e["arch"] for e in entries}),
                "kernels": entries}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("fastdiff.kernels.aot: unset TRITON_INTERPRET to compile kernels")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="SM version, e.g. 80, 90")
    p.add_argument("--op", action="append", choices=sorted(MODULES))
    p.add_argument("--emit", metavar="DIR", help="write the cubins and manifest.json into DIR")
    args = p.parse_args(argv)
    failed, done = 0, []
    for rec in compile_all(args.arch or [80, 90], args.op, emit=bool(args.emit)):
        failed += not rec["ok"]
        print(json.dumps({k: v for k, v in rec.items() if k != "cubin"}), flush=True)
        if rec["ok"]:
            done.append(rec)
    if args.emit and not failed:
        m = emit(done, args.emit)
        print(f"wrote {len(m['kernels'])} cubins for sm_{m['archs']} and manifest.json to "
              f"{args.emit}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
