"""The benchmark suite's report: rows from pytest-benchmark's JSON, a markdown table, a chart,
and the compact results.json committed under benchmarks/results.

Times become GB/s (memory-bound ops: each input read once, each output written once), TFLOP/s
(attention: 4 B H Lq Lk D) and fractions of the device's ceilings (measured copy bandwidth and
fp16/bf16 matmul rate, ROOFLINES), and speed-ups against the baseline timed in the same run
(torch eager, diffusers, or for first calls the Triton JIT). Committed results are compact: per
case the median, its spread (IQR) and the rounds; the environment once; no host names.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

from cases import E2E_SYSTEMS, KERNEL_SYSTEMS

ROOFLINES = {
    "H100": {"copy_gbs": 3000.0, "matmul_tflops": 798.0},
    "H200": {"copy_gbs": 4300.0, "matmul_tflops": 788.0},
}


def roofline(device_name: str) -> dict | None:
    for key, value in ROOFLINES.items():
        if key in device_name:
            return value
    return None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        import cpuinfo                                  # py-cpuinfo, a pytest-benchmark dependency

        return cpuinfo.get_cpu_info().get("brand_raw") or platform.machine()
    except Exception:                                   # pragma: no cover
        return platform.processor() or platform.machine()


def environment() -> dict:
    """Device, versions and git commit, for the results JSON."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:                                   # pragma: no cover
        triton_version = None
    here = os.path.dirname(os.path.abspath(__file__))
    commit = os.environ.get("FASTDIFF_GIT_COMMIT")      # a copy without .git (the GPU machine)
    try:
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,  # noqa: E731
                                        cwd=here, timeout=10).stdout.strip()
        commit = commit or git("rev-parse", "HEAD") or None
        if (commit and "FASTDIFF_GIT_COMMIT" not in os.environ
                and git("status", "--porcelain", "--untracked-files=no")):
            commit += "-dirty"
    except Exception:                                   # pragma: no cover
        commit = None
    cuda = torch.cuda.is_available()
    return {"device": device_name("cuda" if cuda else "cpu"),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "python": sys.version.split()[0], "git_commit": commit}


# ---------------------------------------------------------------- report

@dataclass
class Row:
    kind: str
    case: str
    system: str
    seconds: float                  # median per call (per op call for kernels)
    spread: float | None = None     # interquartile range of the same, s
    gbs: float | None = None
    tflops: float | None = None
    of_roofline: float | None = None
    speedup: float | None = None    # eager (or diffusers) median / this median
    its: float | None = None        # end-to-end: steps / s
    images_s: float | None = None
    ttfi: float | None = None       # end-to-end: time to first image, s
    rounds: int | None = None
    partial: bool = False           # its test was cut off (benchmarks/gpu.sh): fewer rounds


def rows_from_benchmarks(raw: dict) -> list[Row]:
    """Rows from a pytest-benchmark JSON whose entries carry extra_info (see benchmarks/)."""
    env = raw.get("fastdiff_env") or {}
    roof = roofline(env.get("device", ""))
    rows: list[Row] = []
    for b in raw["benchmarks"]:
        info = b.get("extra_info", {})
        kind = info.get("kind")
        if kind not in ("kernel", "e2e", "first_call", "step"):
            continue
        inner = info.get("inner", 1)
        t = b["stats"]["median"] / inner
        iqr = b["stats"].get("iqr")
        row = Row(kind, info["case"], info["system"], t, None if iqr is None else iqr / inner,
                  rounds=b["stats"].get("rounds"), partial=bool(info.get("partial")))
        if kind == "kernel":
            row.gbs = info["bytes"] / t / 1e9
            if info.get("flops"):
                row.tflops = info["flops"] / t / 1e12
            if roof:
                row.of_roofline = (row.tflops / roof["matmul_tflops"] if row.tflops
                                   else row.gbs / roof["copy_gbs"])
        elif kind == "e2e":
            row.its = info["steps"] / t
            row.images_s = info["batch"] / t
            row.ttfi = info.get("ttfi")
        rows.append(row)
    # speed-up against the baseline: torch eager, diffusers, or (first call) the Triton JIT
    base = {(r.kind, r.case): r.seconds for r in rows
            if r.system in ("eager", "diffusers", "jit")}
    for r in rows:
        if (r.kind, r.case) in base:
            r.speedup = base[(r.kind, r.case)] / r.seconds
    return rows


def _fmt(v, spec, unit=""):
    return "-" if v is None else format(v, spec) + unit


def _system(r: Row) -> str:
    return f"{r.system} (cut: {r.rounds} rounds)" if r.partial else r.system


def table(rows: list[Row]) -> str:
    """A markdown table per kind."""
    out = []
    kernels = [r for r in rows if r.kind == "kernel"]
    if kernels:
        out += ["| op case | system | median | GB/s | TFLOP/s | of roofline | vs eager |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for r in kernels:
            out.append(f"| {r.case} | {_system(r)} | {r.seconds * 1e3:.4f} ms | "
                       f"{_fmt(r.gbs, '.1f')} | {_fmt(r.tflops, '.2f')} | "
                       f"{'-' if r.of_roofline is None else f'{100 * r.of_roofline:.0f}%'} | "
                       f"{_fmt(r.speedup, '.2f', 'x')} |")
    e2e = [r for r in rows if r.kind == "e2e"]
    if e2e:
        out += ["", "| sampling case | system | per image set | it/s | images/s | first image |"
                " vs diffusers |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in e2e:
            out.append(f"| {r.case} | {_system(r)} | {r.seconds:.3f} s | {r.its:.2f} | "
                       f"{r.images_s:.3f} | {_fmt(r.ttfi, '.2f', ' s')} | "
                       f"{_fmt(r.speedup, '.2f', 'x')} |")
    first = [r for r in rows if r.kind == "first_call"]
    if first:
        out += ["", "| first call (cold process) | path | median | vs JIT |", "|---|---|---:|---:|"]
        for r in first:
            out.append(f"| {r.case} | {_system(r)} | {r.seconds * 1e3:.2f} ms | "
                       f"{_fmt(r.speedup, '.1f', 'x')} |")
    steps = [r for r in rows if r.kind == "step"]
    if steps:
        out += ["", "| scheduler step + CFG | system | per step | vs diffusers |",
                "|---|---|---:|---:|"]
        for r in steps:
            out.append(f"| {r.case} | {_system(r)} | {r.seconds * 1e6:.1f} us | "
                       f"{_fmt(r.speedup, '.2f', 'x')} |")
    return "\n".join(out)


def chart(rows: list[Row], path: str, title: str = "") -> None:
    """A PNG bar chart: per case one bar per system. Kernels: fraction of the roofline when the
    device has one (a line marks 100%), else speed-up over eager (a line marks 1x); end to end:
    speed-up over diffusers eager."""
    from PIL import Image, ImageDraw

    colors = {"fastdiff": (220, 80, 40), "engine": (220, 80, 40), "accelerate": (240, 150, 60),
              "accelerate-cublas": (200, 170, 90),
              "eager": (90, 90, 90), "diffusers": (90, 90, 90), "compile": (60, 110, 200),
              "unfused": (150, 120, 60),
              "prebuilt": (220, 80, 40), "jit": (90, 90, 90)}
    cases = list(dict.fromkeys((r.kind, r.case) for r in rows))
    by = {(r.kind, r.case, r.system): r for r in rows}
    use_roof = any(r.of_roofline is not None for r in rows if r.kind == "kernel")

    def value(r):
        if r.kind == "kernel" and use_roof:
            return r.of_roofline
        return r.speedup

    vals = [value(r) for r in rows if value(r) is not None]
    vmax = max(vals + [1.0]) * 1.1
    bar_h, gap, left, width = 12, 10, 330, 900
    listed = {"kernel": KERNEL_SYSTEMS, "e2e": E2E_SYSTEMS, "first_call": ("prebuilt", "jit"),
              "step": ("fastdiff", "diffusers")}
    systems = {k: [s for s in order if any(r.system == s and r.kind == k for r in rows)]
               for k, order in listed.items()}
    height = 60 + sum(len(systems[k]) * bar_h + gap for k, _ in cases) + 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title or "fastdiff bench", fill="black")
    d.text((10, 26), ("kernels: fraction of roofline; " if use_roof else "kernels: speed-up vs "
                      "torch eager; ") + "sampling: speed-up vs diffusers eager; first call: vs "
           "the Triton JIT", fill=(60, 60, 60))
    scale = (width - left - 80) / vmax
    y = 50
    for kind, case in cases:
        d.text((10, y), case[:48], fill="black")
        for s in systems[kind]:
            r = by.get((kind, case, s))
            v = value(r) if r else None
            if v is not None:
                d.rectangle([left, y, left + max(1, int(v * scale)), y + bar_h - 2],
                            fill=colors.get(s, (0, 0, 0)))
                d.text((left + int(v * scale) + 4, y), f"{s} {v:.2f}", fill=(40, 40, 40))
            y += bar_h
        y += gap
    x1 = left + int(1.0 * scale)
    d.line([x1, 45, x1, y], fill=(0, 0, 0), width=1)
    d.text((x1 + 3, y + 2), "roofline (100%)" if use_roof else "1x", fill="black")
    img.save(path)


def write_results(raw: dict, out_dir: str, title: str = "", *, extra: dict | None = None,
                  notes: str = "") -> tuple[str, list[Row]]:
    """results.json (compact: environment, ``extra``'s keys, the rows), results.md (``notes``
    above the tables) and, when there are rows, chart.png in out_dir."""
    from fastdiff.checkpoint import atomic_write_json

    os.makedirs(out_dir, exist_ok=True)
    rows = rows_from_benchmarks(raw)
    md = table(rows)
    atomic_write_json({"environment": raw.get("fastdiff_env"), **(extra or {}),
                       "rows": [asdict(r) for r in rows]},
                      os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        env = raw.get("fastdiff_env") or {}
        f.write(f"Device: {env.get('device')}; torch {env.get('torch')}, triton "
                f"{env.get('triton')}, CUDA {env.get('cuda')}; commit {env.get('git_commit')}\n\n")
        if notes:
            f.write(notes + "\n\n")
        f.write(md + "\n")
    if rows:
        chart(rows, os.path.join(out_dir, "chart.png"), title)
    return md, rows


def load_raw(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
