"""BENCHMARKS.md's table of what the compiler made of each kernel family (``make sass-table``).

Compiles every prebuilt configuration for sm_80 and sm_90 with kernels/prebuild.py's machine-code
summary (``--sass``; no GPU needed) and groups the configurations into families: attention by
dtype and head dim (its bias variants together), group_norm_silu by kernel, dtype, layout and
VEC (its fusion flags together), denoise_step by dtype and alignment variant, geglu by dtype and
VEC, add_layer_norm by dtype and row block, linear_geglu by dtype and alignment variant,
layer_norm_linear by dtype and epilogue (its shift variants together), group_norm_scale_shift
by dtype, layout and VEC, norm_conv2d by dtype, kernel size and prologue (its
bias/temb/cat/shortcut/residual variants together). Per
family and architecture: registers, shared memory, stack (local memory: spills), and the global
loads and stores in the code by width (instructions in the code, not executions), with MMA
instructions.
A range a-b spans the family's configurations. Printed, or written between the markers of
BENCHMARKS.md with ``--write BENCHMARKS.md``.

    env -u TRITON_INTERPRET python scripts/sass_table.py --write BENCHMARKS.md --jobs 2
"""
import argparse
import os
import re
import sys
from collections import defaultdict

from fastdiff.kernels import prebuild

BEGIN = "<!-- sass-table: begin (scripts/sass_table.py writes this) -->"
END = "<!-- sass-table: end -->"
_DT = {"*fp32": "fp32", "*fp16": "fp16", "*bf16": "bf16"}


def family(r):
    """(sort key, label) of a record's family."""
    sig, cx = r["signature"], r["constexprs"]
    if r["op"] == "attention":
        dt = _DT[sig["q_ptr"]]
        return (0, dt, cx["D"]), f"attention {dt} D={cx['D']}"
    if r["op"] == "group_norm_silu":
        dt = _DT[sig["x_ptr"]]
        # Y_CL (apply only): an NCHW x written as channels_last (channels_last_out)
        y_cl = cx.get("Y_CL", False)
        layout = "NCHW->channels_last" if y_cl else "channels_last" if cx["CL"] else "NCHW"
        k = r["kernel"].removeprefix("group_norm_silu_")
        return ((1, dt, cx["CL"], y_cl, -cx["VEC"], k),
                f"group_norm_silu {k} {dt} {layout} VEC={cx['VEC']}")
    if r["op"] == "geglu":
        dt = _DT[sig["x_ptr"]]
        return (3, dt, -cx["VEC"]), f"geglu {dt} VEC={cx['VEC']}"
    if r["op"] == "add_layer_norm":
        dt = _DT[sig["x_ptr"]]
        return (4, dt, cx["BLOCK_C"]), f"add_layer_norm {dt} BLOCK_C={cx['BLOCK_C']}"
    if r["op"] == "linear_geglu":
        dt = _DT[sig["x_ptr"]]
        names = [p["name"] for p in r["params"]]
        aligned = "K" in [names[i] for i in r["aligned"]]
        tile = f"{cx['BLOCK_M']}x{cx['BLOCK_N']}x{cx['BLOCK_K']}"
        return ((5, dt, not aligned),
                f"linear_geglu {dt} {tile} {'K, F % 16 == 0' if aligned else 'any K, F'}")
    if r["op"] == "layer_norm_linear":
        dt = _DT[sig["x_ptr"]]
        tile = f"{cx['BLOCK_M']}x{cx['BLOCK_N']}x{cx['BLOCK_K']}"
        return ((6, dt, cx["GEGLU"]),
                f"layer_norm_linear {dt} {tile} {'GEGLU' if cx['GEGLU'] else 'linear'}")
    if r["op"] == "group_norm_scale_shift":
        dt = _DT[sig["x_ptr"]]
        layout = "channels-last" if cx["CL1"] else "planar"
        return ((7, dt, cx["CL1"], -cx["VEC"]),
                f"group_norm_scale_shift {dt} {layout} VEC={cx['VEC']}")
    if r["op"] == "norm_conv2d":
        dt = _DT[sig["x_ptr"]]
        tile = f"{cx['BLOCK_M']}x{cx['BLOCK_N']}x{cx['BLOCK_K']}"
        prologue = "norm" if cx["PROLOGUE"] else "raw"
        return ((8, dt, cx["KS"], prologue),
                f"norm_conv2d {dt} {tile} {cx['KS']}x{cx['KS']} {prologue}")
    dt = _DT[sig["x_ptr"]]
    names = [p["name"] for p in r["params"]]
    aligned = "numel" in [names[i] for i in r["aligned"]]
    variant = "numel % 16 == 0" if aligned else "any numel"
    return (2, dt, not aligned), f"denoise_step {dt} {variant}"


def _span(values):
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _accesses(recs, kinds):
    cells = []
    for kind in kinds:
        widths = sorted({int(w) for r in recs for w in r["sass"][kind]}, reverse=True)
        for w in widths:
            counts = [r["sass"][kind].get(str(w), 0) for r in recs]
            cells.append(f"{kind.upper()}.{w} x{_span(counts)}")
    return ", ".join(cells) or "-"


def tile(recs):
    tiles = sorted({(r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"], r["num_warps"],
                     r["num_stages"]) for r in recs})
    return "; ".join(f"{m}x{n}, {w} warps, {s} st." for m, n, w, s in tiles)


def table(records, arch):
    fams = defaultdict(list)
    labels = {}
    for r in records:
        if r["arch"] != arch or not r.get("ok"):
            continue
        key, label = family(r)
        fams[key].append(r)
        labels[key] = label
    lines = [f"**sm_{arch}**", "",
             "| family | cubins | registers | shared KB | stack B | global loads | stores | "
             "HMMA/HGMMA | tile (attention) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(fams):
        recs = fams[key]
        mma = [r["sass"]["hmma"] + r["sass"]["hgmma"] for r in recs]
        lines.append(
            f"| {labels[key]} | {len(recs)} | {_span([r['sass']['regs'] for r in recs])} | "
            f"{_span([round(r['shared'] / 1024) for r in recs])} | "
            f"{_span([r['sass']['stack'] for r in recs])} | "
            f"{_accesses(recs, ('ldg', 'ldgsts'))} | {_accesses(recs, ('stg',))} | "
            f"{_span(mma)} | {tile(recs) if recs[0]['op'] == 'attention' else ''} |")
    return "\n".join(lines)


def render(records, archs):
    import triton

    head = (f"Compiled with Triton {triton.__version__} for "
            f"{', '.join(f'sm_{a}' for a in archs)} on a machine without a GPU: compiled, not "
            "measured on a GPU. Counts are instructions in the code.")
    return "\n\n".join([head] + [table(records, a) for a in archs])


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("sass_table.py: unset TRITON_INTERPRET to compile kernels")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--write", metavar="MARKDOWN", help="replace the table between the markers")
    args = p.parse_args(argv)
    archs = args.arch or [80, 90]
    records = list(prebuild.compile_all(archs, jobs=args.jobs, sass=True))
    failed = [r["key"] for r in records if not r["ok"]]
    if failed:
        sys.exit(f"sass_table.py: {len(failed)} configurations failed to compile: {failed[:3]}")
    text = render(records, archs)
    if not args.write:
        print(text)
        return 0
    with open(args.write) as f:
        doc = f.read()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        sys.exit(f"sass_table.py: {args.write} has no {BEGIN} ... {END} markers")
    with open(args.write, "w") as f:
        f.write(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
