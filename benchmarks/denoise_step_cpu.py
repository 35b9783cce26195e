"""The CPU denoise_step op alone, one build against another (BENCHMARKS.md, "The CPU
denoise_step kernel: only the row's non-zero terms"):

    python benchmarks/denoise_step_cpu.py NEW.so OLD.so [--threads 1] [--rounds 6]
        [--shape 1,4,64,64] [--dtype float32]

Each .so is a built fastdiff/_C.abi3.so (copy main's build aside before rebuilding). The two
run in alternating processes (one extension per process: both register the same ops), each
timing 400 warm calls per case (after 50) with perf_counter around each call and
process_time around all of them (every thread's CPU time: OpenMP workers waiting count).
Printed per case: the smallest median over the rounds, and the smallest CPU time per call.

The rows are real ones: row 10 of fastdiff's table for diffusers' DDIM (no slot),
DPMSolverMultistep (2 slots), UniPC (3) and PNDM (4), SD1.5 config, 30 steps; guided
(model_output twice the batch, guidance 7.5), no noise, no clipping, x0 not written.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CASES = [("k0-ddim", "DDIMScheduler", {}), ("k2-dpm2m", "DPMSolverMultistepScheduler", {}),
         ("k3-unipc", "UniPCMultistepScheduler", {}),
         ("k4-pndm", "PNDMScheduler", {"skip_prk_steps": True})]
ROW = 10


def make_rows(path):
    """The CASES' tables (needs diffusers), saved to path as {case: (coeffs, slots)}."""
    import diffusers
    import torch

    from fastdiff.integrations.diffusers import tables
    rows = {}
    for name, cls, kw in CASES:
        s = getattr(diffusers, cls)(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, **kw)
        s.set_timesteps(30)
        coeffs, _ = tables.table_for(s)
        rows[name] = (coeffs, int(name[1]))
    torch.save(rows, path)


def time_one(so, rows_path, threads, shape, dtype):
    """Times every case with the extension `so` in this process; prints one JSON line."""
    import torch
    torch.ops.load_library(so)
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    mo = torch.randn((2 * shape[0],) + shape[1:], generator=g).to(dtype)
    idx = torch.tensor(ROW)
    op = torch.ops.fastdiff.denoise_step
    res = {}
    for name, (coeffs, k) in torch.load(rows_path).items():
        state = torch.randn((k,) + shape, generator=g).to(dtype) if k else None
        call = lambda: op(mo, x, coeffs, idx, None, state, 7.5, False, 1.0, False)  # noqa: E731
        for _ in range(50):
            call()
        ts = []
        cpu0 = time.process_time()
        for _ in range(400):
            t0 = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t0)
        cpu = (time.process_time() - cpu0) / 400
        ts.sort()
        res[name] = {"median_us": ts[len(ts) // 2] * 1e6, "cpu_us": cpu * 1e6}
    print(json.dumps(res))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("new")
    p.add_argument("old")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--shape", default="1,4,64,64")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    a = p.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    if a.worker:
        return time_one(a.new, a.rows, a.threads, shape, a.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        rows = os.path.join(tmp, "rows.pt")
        make_rows(rows)
        best = {}
        for _ in range(a.rounds):
            for who, so in (("new", a.new), ("old", a.old)):
                out = subprocess.run([sys.executable, __file__, os.path.abspath(so), "-",
                                      "--worker", "--rows", rows, "--threads", str(a.threads),
                                      "--shape", a.shape, "--dtype", a.dtype],
                                     capture_output=True, text=True, check=True).stdout
                for case, v in json.loads(out).items():
                    for key in ("median_us", "cpu_us"):
                        k = (case, who, key)
                        best[k] = min(best.get(k, float("inf")), v[key])
    print(f"{a.shape} {a.dtype}, {a.threads} thread(s), best of {a.rounds} alternating rounds")
    print("| case | old median | new median | new / old | old CPU | new CPU |")
    print("|---|---:|---:|---:|---:|---:|")
    for case, _, _ in CASES:
        o, n = best[(case, "old", "median_us")], best[(case, "new", "median_us")]
        print(f"| {case} | {o:.2f} us | {n:.2f} us | {n / o:.2f}x | "
              f"{best[(case, 'old', 'cpu_us')]:.2f} us | {best[(case, 'new', 'cpu_us')]:.2f} us |")


if __name__ == "__main__":
    main()
