"""Launch-parameter sweeps for the Triton kernels, on a GPU, side by side with torch's own op.

    python benchmarks/tune.py --out tune.json [--budget 120]     (gpu.sh's opt-in 'tune' phase)
    TRITON_INTERPRET=1 python benchmarks/tune.py --dry           (plumbing check on a CPU)

attention: every (BLOCK_M, BLOCK_N, num_warps, num_stages) of a small grid at the SD1.5 shapes
with the CFG batch (fp16, (B, H, L, D) contiguous), each checked against SDPA (fp32 inputs)
before it is timed, and SDPA itself. group_norm_silu: NUM_WARPS x MAX_SPLIT at the SD1.5
shapes and one larger than the L2 (bandwidth). The kernels are compiled first in a pool of
processes (they fill Triton's cache; the timing process then only loads them). Times are
medians of triton.testing.do_bench; the table printed last gives, per case, the shipped
configuration, the best one and SDPA / eager. Nothing here changes the shipped configuration:
the numbers decide a commit that does.
"""
import argparse
import concurrent.futures as cf
import itertools
import json
import math
import multiprocessing as mp
import os
import sys
import time

import torch
import torch.nn.functional as F

B, H = 2, 8   # SD1.5 with classifier-free guidance: batch 2, 8 heads
ATTN_CASES = [("self D=40 L=4096", 4096, 4096, 40), ("self D=80 L=1024", 1024, 1024, 80),
              ("self D=160 L=256", 256, 256, 160), ("cross D=40 L=4096x77", 4096, 77, 40)]
ATTN_GRID = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)))
GN_CASES = [("sd15 2x320x64x64", (2, 320, 64, 64)), ("sd15 2x640x32x32", (2, 640, 32, 32)),
            ("sd15 2x1280x16x16", (2, 1280, 16, 16)), ("big 8x320x128x128", (8, 320, 128, 128))]
GN_GRID = list(itertools.product((4, 8), (8, 16, 32, 64, 128)))
DRY_ATTN = [("dry self D=40 L=70", 70, 70, 40)]
DRY_GN = [("dry 2x64x8x8", (2, 64, 8, 8))]


def _qkv(lq, lk, d, device, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, d, generator=g).to(device, dtype) for n in (lq, lk, lk)]


def _attn_launch(q, k, v, tile):
    """One attention launch with the shipped configuration but for ``tile`` (None: shipped)."""
    from fastdiff.kernels import attention
    [(cfg, grid, args)], out = attention.plan(q, k, v, None, None)
    ce = dict(cfg["constexprs"])
    warps, stages = cfg["num_warps"], cfg["num_stages"]
    if tile is not None:
        ce["BLOCK_M"], ce["BLOCK_N"], warps, stages = tile
        grid = (B * H * math.ceil(q.shape[2] / ce["BLOCK_M"]), 1, 1)

    def run():
        cfg["fn"][grid](*args, **ce, num_warps=warps, num_stages=stages)
        return out
    return run, (ce["BLOCK_M"], ce["BLOCK_N"], warps, stages)


def _gn_launch(x, w, b, warps, split):
    from fastdiff import kernels
    from fastdiff.kernels import group_norm_silu as gn
    args = (x, 32, w, b, 1e-5, None, None, None, True)

    def run():
        old = gn.NUM_WARPS, gn.MAX_SPLIT
        gn.NUM_WARPS, gn.MAX_SPLIT = warps, split
        try:
            return kernels.launch("group_norm_silu", *args)
        finally:
            gn.NUM_WARPS, gn.MAX_SPLIT = old
    return run


def _compile(job):
    """Pool worker: one launch per configuration of ``job`` (fills Triton's cache)."""
    kind, case, params = job
    try:
        if kind == "attention":
            _, lq, lk, d = case
            q, k, v = _qkv(min(lq, 256), min(lk, 256), d, "cuda")
            _attn_launch(q, k, v, params)[0]()
        else:
            x = torch.randn(*case[1], device="cuda", dtype=torch.float16)
            _gn_launch(x, torch.ones(x.shape[1], device="cuda"),
                       torch.zeros(x.shape[1], device="cuda"), *params)()
        torch.cuda.synchronize()
        return None
    except Exception as err:  # a configuration that does not compile (shared memory) is skipped
        return f"{kind} {case[0]} {params}: {type(err).__name__}: {str(err)[:200]}"


def _time(fn, dry):
    if dry:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tune.json")
    p.add_argument("--budget", type=float, default=120.0, help="seconds; sweeps stop when spent")
    p.add_argument("--dry", action="store_true", help="tiny cases, a few tiles, on the CPU")
    a = p.parse_args(argv)
    if a.dry and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported
    start = time.time()
    dev = "cpu" if a.dry else "cuda"
    attn_cases, gn_cases = (DRY_ATTN, DRY_GN) if a.dry else (ATTN_CASES, GN_CASES)
    attn_grid = ATTN_GRID[:2] if a.dry else ATTN_GRID
    gn_grid = GN_GRID[:2] if a.dry else GN_GRID
    errors = []
    if not a.dry:
        jobs = [("attention", c, t) for c in attn_cases for t in attn_grid]
        jobs += [("group_norm_silu", c, (w, 32)) for c in gn_cases for w in (4, 8)]
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(min(8, os.cpu_count() or 1), mp_context=ctx) as pool:
            errors = [e for e in pool.map(_compile, jobs) if e]
        print(f"compiled {len(jobs)} configurations in {time.time() - start:.0f} s"
              f" ({len(errors)} failed)", flush=True)
    rows = []

    def over():
        return time.time() - start > a.budget

    try:
        _sweep(a, dev, attn_cases, attn_grid, gn_cases, gn_grid, rows, over)
    except KeyboardInterrupt:   # gpu.sh's limit: keep what was timed
        rows.append({"op": "-", "case": "interrupted", "configs": []})
    env = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "torch": torch.__version__, "git_commit": os.environ.get("FASTDIFF_GIT_COMMIT")}
    with open(a.out, "w") as f:
        json.dump({"environment": env, "rows": rows, "compile_errors": errors}, f, indent=1)
    print("\n| case | shipped ms | best ms (params) | torch ms | best vs torch |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if r["configs"]:
            s = _summary(r)
            print(f"| {r['op']} {r['case']} | {s['shipped_ms']} | {s['best_ms']} {s['best']} | "
                  f"{s['torch_ms']:.4f} | {s['best_vs_torch']} |")
    print(f"tune: {time.time() - start:.0f} s")
    return 0


def _sweep(a, dev, attn_cases, attn_grid, gn_cases, gn_grid, rows, over):
    for name, lq, lk, d in attn_cases:
        q, k, v = _qkv(lq, lk, d, dev)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v), a.dry)
        flops = 4 * B * H * lq * lk * d
        row = {"op": "attention", "case": name, "sdpa_ms": sdpa, "configs": []}
        shipped_fn, shipped = _attn_launch(q, k, v, None)
        row["shipped"] = list(shipped)
        for tile in [None] + attn_grid:
            if over():
                row["cut"] = True
                break
            fn, params = _attn_launch(q, k, v, tile)
            try:
                err = ((fn().float() - ref).norm() / ref.norm()).item()
            except Exception as e:
                row["configs"].append({"params": list(params), "error": str(e)[:200]})
                continue
            ms = _time(fn, a.dry) if err < 1e-2 else None
            row["configs"].append({"params": list(params), "ms": ms, "rel_err": err,
                                   "tflops": flops / ms / 1e9 if ms else None,
                                   "shipped": tile is None})
        rows.append(row)
        print(json.dumps(_summary(row)), flush=True)
    for name, shape in gn_cases:
        x = torch.randn(*shape, device=dev, dtype=torch.float16)
        w, b = torch.randn(shape[1], device=dev), torch.randn(shape[1], device=dev)
        ref = F.silu(F.group_norm(x.float(), 32, w, b))
        eager = _time(lambda: F.silu(F.group_norm(x, 32, w.half(), b.half())), a.dry)
        row = {"op": "group_norm_silu", "case": name, "eager_ms": eager, "configs": [],
               "shipped": [4, 32], "bytes": 2 * x.numel() * x.element_size()}
        for warps, split in gn_grid:
            if over():
                row["cut"] = True
                break
            fn = _gn_launch(x, w, b, warps, split)
            err = ((fn().float() - ref).norm() / ref.norm()).item()
            ms = _time(fn, a.dry) if err < 1e-2 else None
            row["configs"].append({"params": [warps, split], "ms": ms, "rel_err": err,
                                   "gbs": row["bytes"] / ms / 1e6 if ms else None,
                                   "shipped": [warps, split] == row["shipped"]})
        rows.append(row)
        print(json.dumps(_summary(row)), flush=True)


def _summary(row):
    timed = [c for c in row["configs"] if c.get("ms")]
    best = min(timed, key=lambda c: c["ms"]) if timed else None
    shipped = next((c for c in timed if c.get("shipped")), None)
    torch_ms = row.get("sdpa_ms", row.get("eager_ms"))
    return {"case": row["case"], "torch_ms": torch_ms,
            "shipped_ms": round(shipped["ms"], 4) if shipped else None,
            "best_ms": round(best["ms"], 4) if best else None,
            "best": best["params"] if best else None,
            "best_vs_torch": f"{torch_ms / best['ms']:.2f}x" if best else None}


if __name__ == "__main__":
    sys.exit(main())
