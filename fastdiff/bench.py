"""The benchmark suite's cases, systems and report (``fastdiff bench``, benchmarks/).

Kernel cases are the op shapes of real U-Nets, derived from their public configurations
(``fastdiff.zoo``): SD1.5 at 512x512, SDXL at 1024x1024, DDPM-CIFAR10 at 32x32 and the shipped
digits model at 8x8, each with the CFG batch (2 x images). Every case is timed for three systems
in the same run: ``fastdiff`` (the fused op), ``eager`` (the torch code it replaces) and
``compile`` (``torch.compile`` of that same eager code). End-to-end cases time the denoising loop
of a diffusers pipeline (SD1.5 architecture, random weights) for: stock diffusers eager,
diffusers with ``torch.compile(unet, mode="max-autotune")``, ``fastdiff.accelerate(pipe)`` and
the fastdiff engine (``engine.sample_pipeline``, whole steps in CUDA graphs).

Timing is pytest-benchmark's (benchmarks/test_*.py); on CUDA every timed call ends with a
synchronize and runs the op ``inner`` times, so a kernel's time is the round's time / inner.
The report turns times into GB/s (memory-bound ops: each input read once, each output written
once), TFLOP/s (attention: 4 B H Lq Lk D) and fractions of the device's ceilings (measured copy
bandwidth and fp16/bf16 matmul rate, table below), and speed-ups against eager in the same run.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

# Ceilings measured on the lent machines (../shared/GPU.md): device-to-device copy (bytes read +
# written) and dense bf16 matmul 8192^3.
ROOFLINES = {
    "H100": {"copy_gbs": 3000.0, "matmul_tflops": 798.0},
    "H200": {"copy_gbs": 4300.0, "matmul_tflops": 788.0},
}
KERNEL_SYSTEMS = ("fastdiff", "eager", "compile")
E2E_SYSTEMS = ("engine", "accelerate", "diffusers", "compile")


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


# ---------------------------------------------------------------- kernel cases

@dataclass
class KernelCase:
    op: str                      # group_norm_silu | attention | denoise_step
    model: str                   # sd15@512 ...
    shape: tuple
    groups: int = 32
    quick: bool = False
    label: str = field(default="", compare=False)

    @property
    def id(self) -> str:
        return f"{self.op}[{self.model} {self.label or 'x'.join(map(str, self.shape))}]"

    def bytes(self, itemsize: int) -> int:
        n = math.prod(self.shape)
        if self.op == "group_norm_silu":
            return 2 * n * itemsize                              # x read, y written
        if self.op == "attention":
            b, h, lq, lk, d = self.shape
            return (2 * b * h * lq * d + 2 * b * h * lk * d) * itemsize
        return (2 * n + n + n) * itemsize                        # [u; c] read, x read, out

    def flops(self) -> int:
        if self.op == "attention":
            b, h, lq, lk, d = self.shape
            return 4 * b * h * lq * lk * d
        return 0


def _unet_shapes(name: str, image: int, latent_scale: int):
    """(channels, resolution, heads or head dim, has_attention, cross_dim) per U-Net level."""
    from fastdiff.integrations.diffusers import zoo

    c = zoo.config(name)["unet"]
    res = image // latent_scale
    levels = []
    heads = c.get("attention_head_dim")
    for i, (ch, kind) in enumerate(zip(c["block_out_channels"], c["down_block_types"])):
        h = heads[i] if isinstance(heads, list) else heads
        if name == "sd15":
            head_dim = ch // h                                   # SD1.5: the entry is heads
        elif name == "sdxl":
            head_dim = 64
        else:
            head_dim = ch                                        # DDPM: one head
        levels.append((ch, res, head_dim, "Attn" in kind, c.get("cross_attention_dim")))
        res //= 2
    return levels


def kernel_cases(quick: bool = False) -> list[KernelCase]:
    """The op shapes of the four models at batch 1 with CFG (model batch 2)."""
    B = 2
    cases: list[KernelCase] = []
    models = [("sd15", 512, 8), ("sdxl", 1024, 8), ("ddpm_cifar10", 32, 1)]
    for name, image, scale in models:
        tag = f"{name}@{image}"
        levels = _unet_shapes(name, image, scale)
        # GroupNorm: the first and the last level (largest and smallest spatial size)
        for ch, res, *_ in (levels[0], levels[-1]):
            cases.append(KernelCase("group_norm_silu", tag, (B, ch, res, res)))
        for ch, res, hd, attn, cross in levels:
            if not attn:
                continue
            heads = ch // hd
            cases.append(KernelCase("attention", tag, (B, heads, res * res, res * res, hd),
                                    label=f"self D={hd} L={res * res}"))
            if cross and name != "ddpm_cifar10":
                cases.append(KernelCase("attention", tag, (B, heads, res * res, 77, hd),
                                        label=f"cross D={hd} L={res * res}x77"))
        c = 3 if name == "ddpm_cifar10" else 4
        cases.append(KernelCase("denoise_step", tag, (B // 2, c, image // scale, image // scale)))
    # the shipped digits model: 8x8, groups 8, attention at 4x4 (head dim 32), batch 2 x 10
    cases += [KernelCase("group_norm_silu", "digits@8", (20, 32, 8, 8), groups=8, quick=True),
              KernelCase("attention", "digits@8", (20, 2, 16, 16, 32), quick=True,
                         label="self D=32 L=16"),
              KernelCase("denoise_step", "digits@8", (10, 1, 8, 8), quick=True)]
    if quick:
        cases = [c for c in cases if c.quick]
        cases.append(KernelCase("group_norm_silu", "cifar-block", (2, 128, 32, 32), quick=True))
    return cases


L2_BYTES = 50e6


def kernel_fn(case: KernelCase, system: str, device: str, dtype: torch.dtype):
    """A zero-argument callable running ``case`` once on ``system`` (inputs made here).

    On CUDA the callable cycles through enough copies of the inputs to total 3x the L2 cache
    (50 MB on H100/H200), so bandwidth figures are not L2 hits.
    """
    from fastdiff import ops

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    if case.op == "group_norm_silu":
        G = case.groups

        def make():
            return rnd(*case.shape), rnd(case.shape[1]), rnd(case.shape[1])
        fused = lambda x, w, b: ops.group_norm_silu(x, G, w, b)  # noqa: E731
        fn = lambda x, w, b: F.silu(F.group_norm(x, G, w, b))  # noqa: E731
    elif case.op == "attention":
        bsz, h, lq, lk, d = case.shape

        def make():
            return rnd(bsz, h, lq, d), rnd(bsz, h, lk, d), rnd(bsz, h, lk, d)
        fused, fn = ops.attention, F.scaled_dot_product_attention
    else:
        n = case.shape[0]
        # one DDIM-like row: x0 = P_x x + P_m e; out = K_x x + K_0 x0 + K_m e
        row = [0.0, 1.2, -0.3, 0.0, 0.9, 0.4, 0.0, 0.0]
        coeffs = torch.tensor([row], dtype=torch.float32, device=device)
        idx = torch.zeros(1, dtype=torch.int64, device=device)

        def make():
            return rnd(2 * n, *case.shape[1:]), rnd(*case.shape)
        fused = lambda m, x: ops.denoise_step(m, x, coeffs, idx, guidance_scale=7.5)  # noqa: E731

        def fn(m, x):
            u, c = m.chunk(2)
            e = u + 7.5 * (c - u)
            x0 = row[1] * x + row[2] * e
            return row[3] * x + row[4] * x0 + row[5] * e
    if system == "fastdiff":
        fn = fused
    elif system == "compile":
        fn = torch.compile(fn, dynamic=False)
    elif system != "eager":
        raise ValueError(f"'system' must be one of {KERNEL_SYSTEMS}, got {system!r}")
    copies = 1
    if device == "cuda":
        copies = max(1, min(32, math.ceil(3 * L2_BYTES / case.bytes(dtype.itemsize))))
    sets = [make() for _ in range(copies)]
    if copies == 1:
        args = sets[0]
        return lambda: fn(*args)
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % copies
        return fn(*sets[state["i"]])
    return call


# ---------------------------------------------------------------- end-to-end cases

@dataclass
class E2ECase:
    model: str = "sd15"
    image: int = 512
    batch: int = 1
    steps: int = 50
    width: float = 1.0
    layers_per_block: int | None = None
    quick: bool = False

    @property
    def id(self) -> str:
        w = "" if self.width == 1 else f" width {self.width}"
        return f"{self.model}@{self.image}{w} batch {self.batch}, DDIM {self.steps}, CFG"


def e2e_cases(quick: bool, device: str) -> list[E2ECase]:
    if quick:
        return [E2ECase(image=64, steps=2, width=0.25, layers_per_block=1, quick=True)]
    if device == "cuda":
        return [E2ECase(batch=1), E2ECase(batch=4)]
    return [E2ECase(image=256, steps=4, width=0.5, layers_per_block=1)]


def build_pipeline(case: E2ECase, device: str, dtype):
    """An SD pipeline (no text encoder, no VAE) on a random-weight U-Net of the case's size."""
    import diffusers

    from fastdiff.integrations.diffusers import zoo

    over = {"sample_size": case.image // 8}
    if case.layers_per_block:
        over["layers_per_block"] = case.layers_per_block
    unet = zoo.build_unet(case.model, width=case.width, device=device, dtype=dtype, **over)
    pipe = diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet,
        scheduler=zoo.build_scheduler(case.model, "DDIMScheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    dim = unet.config.cross_attention_dim
    pe = torch.randn(case.batch, 77, dim, generator=g).to(device, dtype)
    ne = torch.randn(case.batch, 77, dim, generator=g).to(device, dtype)
    return pipe, pe, ne


def e2e_fn(case: E2ECase, system: str, pipe, pe, ne, compile_mode: str | None = None):
    """A callable running one full sampling loop of ``case`` on ``system`` (prepared here: the
    pipeline is accelerated, compiled or left stock)."""
    import fastdiff

    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=case.image, width=case.image,
              num_inference_steps=case.steps, guidance_scale=7.5)
    if system in ("diffusers", "compile", "accelerate"):
        if system == "compile":
            mode = compile_mode or ("max-autotune" if pe.is_cuda else None)
            pipe.unet = torch.compile(pipe.unet, mode=mode)
        elif system == "accelerate":
            fastdiff.accelerate(pipe)
        return lambda: pipe(**kw, output_type="latent",
                            generator=torch.Generator().manual_seed(1)).images
    if system == "engine":
        fastdiff.accelerate(pipe, cuda_graphs=False)
        return lambda: fastdiff.sample_pipeline(pipe, **kw,
                                              generator=torch.Generator().manual_seed(1))
    raise ValueError(f"'system' must be one of {E2E_SYSTEMS}, got {system!r}")


# ---------------------------------------------------------------- report

@dataclass
class Row:
    kind: str
    case: str
    system: str
    seconds: float                  # median per call (per op call for kernels)
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
        if kind not in ("kernel", "e2e", "first_call"):
            continue
        t = b["stats"]["median"] / info.get("inner", 1)
        row = Row(kind, info["case"], info["system"], t, rounds=b["stats"].get("rounds"),
                  partial=bool(info.get("partial")))
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
    return "\n".join(out)


def chart(rows: list[Row], path: str, title: str = "") -> None:
    """A PNG bar chart: per case one bar per system. Kernels: fraction of the roofline when the
    device has one (a line marks 100%), else speed-up over eager (a line marks 1x); end to end:
    speed-up over diffusers eager."""
    from PIL import Image, ImageDraw

    colors = {"fastdiff": (220, 80, 40), "engine": (220, 80, 40), "accelerate": (240, 150, 60),
              "eager": (90, 90, 90), "diffusers": (90, 90, 90), "compile": (60, 110, 200),
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
    listed = {"kernel": KERNEL_SYSTEMS, "e2e": E2E_SYSTEMS, "first_call": ("prebuilt", "jit")}
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
                  notes: str = "", keep_raw: bool = True) -> tuple[str, list[Row]]:
    """results.json (environment, rows, ``extra``'s keys and, with keep_raw, the raw timings),
    results.md (``notes`` above the tables) and, when there are rows, chart.png in out_dir."""
    from fastdiff.checkpoint import atomic_write_json

    os.makedirs(out_dir, exist_ok=True)
    rows = rows_from_benchmarks(raw)
    md = table(rows)
    atomic_write_json({"environment": raw.get("fastdiff_env"), **(extra or {}),
                       "rows": [asdict(r) for r in rows], **({"raw": raw} if keep_raw else {})},
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
