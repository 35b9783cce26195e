"""Prebuilding: every launch configuration of fastdiff's Triton kernels compiled ahead of time.

triton.compile with a GPUTarget needs no GPU. Run as a program it prints one JSON line per
compiled kernel (used by the tests), and with ``--emit DIR`` writes the cubins and a
``manifest.json`` describing how to launch each (the basis for shipping prebuilt kernels):

    python -m fastdiff.kernels.prebuild --arch 80 --arch 90 [--emit DIR] [--jobs N] [--sass]

``--sass`` adds a summary of each kernel's machine code to its line (``sass``: registers, stack,
static shared memory, global loads, async copies (LDGSTS) and stores by width in bits, HMMA and
HGMMA counts, spill stores/loads): tests/test_prebuild.py checks load widths, tensor-core
instructions and spills from it, and scripts/sass_table.py writes BENCHMARKS.md's table.

setup.py runs it from the source tree (as ``python -m kernels.prebuild``) to build the wheel's
cubins (``make prebuilt`` into kernels/cubins/).

Launch ABI of a Triton 3.6 cubin (``launch_params``): the non-constexpr arguments in signature
order (pointers as 8-byte device addresses, scalars in their own width, floats as their bits),
then two 8-byte pointers, the global and the profile scratch buffers (null when their size is 0),
launched with num_warps * 32 threads and ``shared`` bytes of dynamic shared memory.

It must run without TRITON_INTERPRET=1: under the interpreter ``@triton.jit`` builds functions
that cannot be compiled.
"""
import argparse
import concurrent.futures
import hashlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import struct
import subprocess
import sys
import tempfile

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _op_modules():
    """kernels/<op>.py by op name: the modules of this package with prebuilt_configs()."""
    names = [m.name for m in pkgutil.iter_modules(importlib.import_module(__package__).__path__)]
    mods = {n: importlib.import_module(f"{__package__}.{n}") for n in names if n != "prebuild"}
    return {n: m for n, m in mods.items() if hasattr(m, "prebuilt_configs")}


MODULES = _op_modules()
# The architectures a wheel carries unless FASTDIFF_CUDA_ARCHS says otherwise.
DEFAULT_ARCHS = (80, 86, 89, 90)


def parse_archs(value: str | None) -> list[int]:
    """FASTDIFF_CUDA_ARCHS: SM versions such as "80,86" or "80;sm_90"; "none" (or empty) for
    none; unset (None) for DEFAULT_ARCHS."""
    if value is None:
        return list(DEFAULT_ARCHS)
    value = value.replace(";", ",").strip()
    if value.lower() in ("", "none", "0"):
        return []
    try:
        return [int(a.strip().removeprefix("sm_")) for a in value.split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"FASTDIFF_CUDA_ARCHS must list SM versions such as "
                         f"'80,86,89,90', or 'none'; got {value!r}") from None


# Triton scalar type -> (C type a launcher passes, bytes); pointers are 8-byte device addresses.
_SCALARS = {"i1": ("int8_t", 1), "i8": ("int8_t", 1), "i16": ("int16_t", 2),
            "i32": ("int32_t", 4), "i64": ("int64_t", 8), "u1": ("uint8_t", 1),
            "u8": ("uint8_t", 1), "u16": ("uint16_t", 2), "u32": ("uint32_t", 4),
            "u64": ("uint64_t", 8), "fp16": ("uint16_t", 2), "bf16": ("uint16_t", 2),
            "fp32": ("float", 4), "f32": ("float", 4), "fp64": ("double", 8)}
_PTX_BYTES = {"u64": 8, "b64": 8, "s64": 8, "f64": 8, "u32": 4, "b32": 4, "s32": 4, "f32": 4,
              "u16": 2, "b16": 2, "s16": 2, "f16": 2, "u8": 1, "b8": 1, "s8": 1}


def kernel_key(cfg) -> str:
    """The name the C++ plans look a launch up by (csrc/prebuilt.cpp, make_launch):
    ``<kernel>(<types of the non-constexpr parameters>)[<constexpr>=<int>,...]``."""
    types = [p["type"] for p in launch_params(cfg["signature"], cfg["constexprs"])[:-2]]
    cx = ",".join(f"{k}={int(v)}" for k, v in cfg["constexprs"].items())
    return f"{cfg['fn'].__name__}({','.join(types)})[{cx}]"


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
    # The aligned parameters become the divisibility hints Triton's JIT would give them.
    names = cfg["fn"].arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in cfg.get("aligned", ())}
    src = ASTSource(cfg["fn"], cfg["signature"], cfg["constexprs"], attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


def _compile_one(op: str, index: int, arch: int, emit: bool, sass: bool = False) -> dict:
    """Compiles configuration ``index`` of ``op`` for ``arch``: a summary dict (with the cubin
    when ``emit``; with its resource usage and machine code, ``_text``, when ``sass``); a
    failure is reported in it, not raised."""
    cfg = MODULES[op].prebuilt_configs()[index]
    params = launch_params(cfg["signature"], cfg["constexprs"])
    names = [p["name"] for p in params]
    rec = {"op": op, "kernel": cfg["fn"].__name__, "key": kernel_key(cfg), "arch": arch,
           "signature": cfg["signature"], "constexprs": cfg["constexprs"],
           "aligned": [names.index(a) for a in cfg.get("aligned", ())],
           "num_stages": cfg["num_stages"]}
    try:
        k = compile_config(cfg, arch)
        ptx = k.asm["ptx"]
        md = k.metadata
        # num_warps: what the cubin was compiled for (the launcher's block size), not the request.
        rec.update(ok=True, num_warps=md.num_warps, shared=md.shared,
                   cubin_bytes=len(k.asm["cubin"]),
                   mma=sorted(set(re.findall(r"\b(mma\.sync|wgmma\.mma_async)", ptx))),
                   name=md.name, num_ctas=md.num_ctas,
                   global_scratch_size=md.global_scratch_size,
                   profile_scratch_size=md.profile_scratch_size, params=params,
                   ptx_param_bytes=ptx_param_bytes(ptx, md.name))
        if emit:
            rec["cubin"] = k.asm["cubin"]
        if sass:
            rec["sass"] = resource_usage(k.asm["cubin"])
            rec["_text"] = text_section(k.asm["cubin"], md.name)
    except Exception as err:  # noqa: BLE001 - the report names the configuration
        rec.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000])
    return rec


def compile_all(archs, ops=None, emit=False, jobs=1, sass=False):
    """Yields a summary dict per (op, configuration, arch) in a fixed order (the manifest's:
    a configuration's most aligned variant first); ``jobs`` > 1 compiles in that many
    processes; ``sass`` adds each kernel's machine-code summary (all at the end: see
    add_sass)."""
    work = [(op, i, arch) for op, mod in MODULES.items() if not ops or op in ops
            for i in range(len(mod.prebuilt_configs())) for arch in archs]
    if jobs <= 1:
        records = (_compile_one(*w, emit, sass) for w in work)
    else:
        # spawn: a fresh interpreter per worker (Triton's compiler state is not fork-safe).
        ctx = multiprocessing.get_context("spawn")
        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx)
        records = pool.map(_compile_one, *zip(*work), [emit] * len(work), [sass] * len(work),
                           chunksize=4)
    try:
        if sass:
            records = add_sass(list(records))
        yield from records
    finally:
        if jobs > 1:
            pool.shutdown()


# ---- machine code (SASS) summaries ----

def text_section(cubin: bytes, name: str) -> bytes:
    """The machine code of kernel ``name``: section ``.text.<name>`` of the cubin (ELF64)."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize)
               for i in range(shnum)]
    names = headers[shstrndx][4]
    want = f".text.{name}".encode()
    for h in headers:
        start = names + h[0]
        if cubin[start:cubin.index(b"\0", start)] == want:
            return cubin[h[4]:h[4] + h[5]]
    raise ValueError(f"no section .text.{name} in the cubin")


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack (bytes of local memory per thread: spills) and static shared memory, as
    cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return {"regs": int(m[1]), "stack": int(m[2]), "static_shared": int(m[3]),
            "local": int(m[4])}


_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}
_OPCODE = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_.]*)")


def summarize(sass: str) -> dict:
    """Counts the instructions the tests check in a kernel's disassembly: global loads,
    LDGSTS (async global -> shared copies) and global stores by width in bits; HMMA, HGMMA;
    STL/LDL (local memory: spills)."""
    out = {"ldg": {}, "ldgsts": {}, "stg": {}, "hmma": 0, "hgmma": 0, "stl": 0, "ldl": 0}
    for _, op in _OPCODE.findall(sass):
        parts = op.split(".")
        head = parts[0]
        if head in ("LDG", "LDGSTS", "STG"):
            bits = next((_WIDTHS[p] for p in parts[1:] if p in _WIDTHS), 32)
            counts = out[head.lower()]
            counts[str(bits)] = counts.get(str(bits), 0) + 1
        elif head in ("HMMA", "HGMMA", "STL", "LDL"):
            out[head.lower()] += 1
    return out


def add_sass(records: list[dict]) -> list[dict]:
    """Fills in each compiled record's ``sass`` summary from its machine code (``_text``).
    nvdisasm takes ~0.3 s of set-up per call whatever the size, so each architecture's kernels
    are disassembled together, as one raw instruction stream, and split again by offset."""
    by_arch: dict[int, list[dict]] = {}
    for rec in records:
        if rec.get("ok") and "_text" in rec:
            by_arch.setdefault(rec["arch"], []).append(rec)
    for arch, recs in by_arch.items():
        starts, blob = [], bytearray()
        for rec in recs:
            starts.append(len(blob))
            blob += rec.pop("_text")
        with tempfile.NamedTemporaryFile(suffix=".bin") as f:
            f.write(blob)
            f.flush()
            # sm_90 code is compiled as sm_90a (wgmma); the raw decoder needs to know.
            isa = f"SM{arch}" + ("a" if arch >= 90 else "")
            out = subprocess.run([knobs.nvidia.nvdisasm.path, "-b", isa, f.name],
                                 capture_output=True, text=True, check=True).stdout
        lines = [[] for _ in recs]
        ends = starts[1:] + [len(blob)]
        i = 0
        for line in out.splitlines():
            m = _OPCODE.search(line)
            if not m:
                continue
            addr = int(m[1], 16)
            while addr >= ends[i]:
                i += 1
            lines[i].append(line)
        for rec, text in zip(recs, lines):
            rec["sass"].update(summarize("\n".join(text)))
    return records


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
        entries.append({**{k: v for k, v in rec.items() if k not in ("ok", "mma", "sass")},
                        "file": fname, "sha256": digest})
    manifest = {"triton": triton.__version__, "archs": sorted({e["arch"] for e in entries}),
                "kernels": entries}
    # index.tsv: what the C++ launcher reads at the first CUDA call (csrc/prebuilt.cpp,
    # load_index), one line per single-CTA kernel, tab-separated:
    #   key arch file name param_names ptx_param_bytes aligned num_warps shared
    #   global_scratch_size profile_scratch_size        (lists comma-separated, possibly empty)
    # num_warps and shared are the compiled kernel's (metadata): the block the launch needs.
    lines = []
    for e in entries:
        if e["num_ctas"] != 1:
            continue
        cells = [e["key"], e["arch"], e["file"], e["name"],
                 ",".join(p["name"] for p in e["params"][:-2]),
                 ",".join(map(str, e["ptx_param_bytes"])), ",".join(map(str, e["aligned"])),
                 e["num_warps"], e["shared"], e["global_scratch_size"],
                 e["profile_scratch_size"]]
        lines.append("\t".join(map(str, cells)))
    # Written last and atomically: the index and manifest name only cubins that are complete.
    for name, text in (("index.tsv", "\n".join(lines) + "\n"), ("manifest.json",
                                                                json.dumps(manifest))):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))
    return manifest


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("fastdiff.kernels.prebuild: unset TRITON_INTERPRET to compile kernels")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="SM version, e.g. 80, 90")
    p.add_argument("--op", action="append", choices=sorted(MODULES))
    p.add_argument("--emit", metavar="DIR", help="write the cubins and manifest.json into DIR")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    p.add_argument("--sass", action="store_true",
                   help="add a summary of each kernel's machine code (load widths, MMA, spills)")
    p.add_argument("--archs-from-env", action="store_true",
                   help="the architectures of FASTDIFF_CUDA_ARCHS (default "
                        f"{','.join(map(str, DEFAULT_ARCHS))}) instead of --arch")
    args = p.parse_args(argv)
    if args.archs_from_env:
        try:
            archs = parse_archs(os.environ.get("FASTDIFF_CUDA_ARCHS"))
        except ValueError as err:
            sys.exit(str(err))
        if not archs:
            print("FASTDIFF_CUDA_ARCHS=none: no kernels compiled", file=sys.stderr)
            return 0
    else:
        archs = args.arch or [80, 90]
    failed, done = 0, []
    for rec in compile_all(archs, args.op, emit=bool(args.emit), jobs=args.jobs, sass=args.sass):
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
