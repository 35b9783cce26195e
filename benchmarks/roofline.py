"""A roofline model of one sampling step of a U-Net: where GPU time would go, computed on a CPU.

A model, not a measurement. One step (the U-Net on the model batch, the guidance combine, the
scheduler step) runs on meta tensors (shapes only: no memory, no arithmetic) under a recorder
that keeps every op that would launch a GPU kernel:

- aten ops reaching the dispatcher (TorchDispatchMode) and fastdiff's ops (their Meta kernels),
  on the meta device only (the scheduler's scalar arithmetic on CPU tensors launches nothing);
- metadata-only ops (views, reshapes, expands, detach, empty) are dropped: they launch nothing;
- ``F.scaled_dot_product_attention`` is taken at the function level (TorchFunctionMode) as one
  fused (flash) kernel: on meta tensors it would otherwise decompose into matmul + softmax.

Per kernel: FLOPs (convolutions and matmuls 2 per multiply-add, attention 4 B H Lq Lk D, every
other op ~1 per output element), bytes (each input read once, each output written once; a
broadcast input counts its own elements), and on a device with copy bandwidth ``BW`` and matmul
rate ``P`` (``report.ROOFLINES``, measured) its floor ``max(flops / P, bytes / BW)``; it is
memory-bound when ``flops / bytes`` is below the ridge point ``P / BW``. A step's floor is the
sum of its kernels' floors.

Systems (DDIM, eta = 0; guided models with CFG, model batch [uncond; cond]):

- ``diffusers``: the loop body of diffusers' pipelines, eager: ``torch.cat([latents] * 2)``,
  the stock U-Net, the CFG combine ``u + s * (c - u)`` and ``DDIMScheduler.step`` (run on meta
  tensors too);
- ``accelerate``: the same loop with ``fastdiff.accelerate`` (patched U-Net: group_norm_silu,
  attention, geglu, add_layer_norm; the scheduler's step one ``denoise_step``); the pipeline's
  cat and CFG combine stay;
- ``engine``: ``SamplingEngine``'s step (``fastdiff.sample_pipeline``): input scaling, cat,
  the patched U-Net, one ``denoise_step`` with the guidance inside, state updates. Its CUDA
  graph removes launch gaps, not kernels.

    python benchmarks/roofline.py [--models sd15 sdxl ddpm_cifar10] [--batch 2]
        [--resolution PX] [--dtype fp16] [--top 10] [--group-by shape|block] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import ROOFLINES, environment  # noqa: E402  (the measured ceilings, one source)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
         torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.bool: "bool"}
# Per model: image resolution in pixels, latent downscale (the VAE's 8; 1 for pixel space),
# whether the U-Net is text-conditioned (then sampled with CFG), cross-attention context
# (tokens, width), added conditioning (SDXL), and whose scheduler config DDIM takes.
MODELS = {
    "sd15": {"resolution": 512, "down": 8, "guided": True, "context": (77, 768),
             "scheduler": "sd15"},
    "sdxl": {"resolution": 1024, "down": 8, "guided": True, "context": (77, 2048),
             "added": {"text_embeds": (1280,), "time_ids": (6,)}, "scheduler": "sdxl"},
    "ddpm_cifar10": {"resolution": 32, "down": 1, "guided": False, "scheduler": "ddpm_cifar10"},
}
GUIDANCE_SCALE = 7.5
STEPS = 50

# No kernel: views (schemas whose returns alias an input, see _is_view), and these, which
# only allocate or relabel memory.
_NO_KERNEL = {"_unsafe_view", "_reshape_alias", "lift_fresh", "empty", "empty_strided",
              "empty_like", "new_empty", "new_empty_strided", "_local_scalar_dense"}
# In-place ops that write their first argument without reading it.
_WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_",
               "exponential_"}
_MATMUL = {"mm", "addmm", "bmm", "baddbmm"}
# fastdiff GEMMs with an epilogue (GEGLU; a folded LayerNorm): their FLOPs are the GEMM's
_FOLDED_GEMMS = {"linear_geglu", "layer_norm_linear"}
_ATTENTION = {"attention", "sdpa", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}
# Modules of torch.nn (Linear, Conv2d, GroupNorm) are leaves: a kernel in one is named by its
# op and the diffusers block around the leaf.
_LEAF_PREFIX = "torch.nn."


@dataclass
class Kernel:
    """One kernel launch: op name, where it runs (innermost diffusers block or step phase), a
    shape label, FLOPs and bytes moved (inputs read once, outputs written once)."""
    op: str
    where: str
    shape: str
    flops: float
    bytes: float

    def floor_s(self, dev: dict) -> float:
        return max(self.flops / (dev["matmul_tflops"] * 1e12), self.bytes / (dev["copy_gbs"] * 1e9))

    def memory_bound(self, dev: dict) -> bool:
        return self.flops < ridge(dev) * self.bytes


def ridge(dev: dict) -> float:
    """FLOPs per byte at which a kernel stops being memory-bound (peak rate / bandwidth)."""
    return dev["matmul_tflops"] * 1e12 / (dev["copy_gbs"] * 1e9)


# ---------------------------------------------------------------- per-op FLOPs, bytes, labels

def _read_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel reads from ``t``: its own elements (a stride-0, broadcast dim counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _dims(t) -> str:
    return "x".join(map(str, t.shape)) if t.dim() else "scalar"


def _flops(name: str, args, outs) -> float:
    if name == "convolution":
        x, w = args[0], args[1]
        transposed = len(args) > 6 and bool(args[6])
        if transposed:              # weight (Cin, Cout/g, kh, kw): every input element fans out
            return 2.0 * x.numel() * w[0].numel()
        return 2.0 * outs[0].numel() * w[0].numel()          # per output: Cin/g * kh * kw MACs
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
        return 2.0 * outs[0].numel() * a.shape[-1]
    if name == "norm_conv2d":       # an implicit GEMM: per output, K = k*k*C (+ shortcut) MACs
        return 2.0 * outs[0].numel() * args[1].shape[1]
    if name in _FOLDED_GEMMS:       # x (..., K) @ W (N, K).T: a GEMM, then the epilogue
        x, w = args[0], args[1]
        return 2.0 * (x.numel() // max(1, x.shape[-1])) * w.shape[0] * w.shape[1]
    if name in _ATTENTION:
        q, k, v = args[:3]
        b_h_lq = q.numel() // q.shape[-1]
        return 2.0 * b_h_lq * k.shape[-2] * (q.shape[-1] + v.shape[-1])   # = 4 B H Lq Lk D
    return float(sum(o.numel() for o in outs))


def _label(name: str, args, outs, dtype) -> str:
    """A short shape label: what an aggregated row of the report is keyed by."""
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.device.type == "meta"]
    if name == "convolution":
        x, w = args[0], args[1]
        return f"{_dims(x)} -> {_dims(outs[0])} k{w.shape[-2]}x{w.shape[-1]}"
    if name in _MATMUL:
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
        return f"{_dims(a)} @ {_dims(b)}"
    if name == "norm_conv2d":       # (x, packed, kernel_size, bias, x2, ...)
        x2 = args[4] if len(args) > 4 and isinstance(args[4], torch.Tensor) else None
        src = _dims(args[0]) + (f" + {_dims(x2)}" if x2 is not None else "")
        return f"{src} -> {_dims(outs[0])} k{args[2]}x{args[2]}"
    if name in _FOLDED_GEMMS:
        return f"{_dims(args[0])} @ {_dims(args[1])}^T -> {_dims(outs[0])}"
    if name in _ATTENTION:
        q, k = args[0], args[1]
        return f"q {_dims(q)}, kv len {k.shape[-2]}"
    out = outs[0] if outs else tensors[0]
    label = _dims(out)
    if name == "cat":
        label = " + ".join(_dims(t) for t in args[0]) + " -> " + label
    elif any(t.shape != out.shape for t in tensors):
        label = ", ".join(_dims(t) for t in tensors) + " -> " + label
    kinds = {t.dtype for t in tensors} | {out.dtype}
    if kinds != {dtype}:
        name_of = lambda d: SHORT.get(d, str(d).replace("torch.", ""))  # noqa: E731
        src = "/".join(sorted({name_of(t.dtype) for t in tensors}))
        dst = name_of(out.dtype)
        label += f" {src}->{dst}" if src and src != dst else f" {dst}"
    return label


def _is_view(func) -> bool:
    """A schema whose every return aliases an input, written or not (views, not in-place ops)."""
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


# ---------------------------------------------------------------- the recorder

class Recorder(TorchDispatchMode):
    """Records the kernels of the ops run inside it (on meta tensors), each with its place."""

    def __init__(self, dtype=torch.float16):
        super().__init__()
        self.dtype = dtype
        self.kernels: list[Kernel] = []
        self.where: list[str] = ["step"]
        self._quiet = 0

    @contextlib.contextmanager
    def at(self, phase: str):
        self.where.append(phase)
        try:
            yield
        finally:
            self.where.pop()

    def add(self, op: str, args, reads, writes):
        """Records kernel ``op`` ('aten.add_', 'fastdiff.attention', 'sdpa')."""
        outs = [t for t in writes if isinstance(t, torch.Tensor)]
        seen, nbytes = set(), 0
        for t in reads:              # host scalars travel as kernel arguments: not read
            if isinstance(t, torch.Tensor) and t.device.type == "meta" and id(t) not in seen:
                seen.add(id(t))
                nbytes += _read_bytes(t)
        nbytes += sum(t.numel() * t.element_size() for t in outs)
        bare = op.split(".", 1)[-1].rstrip("_")
        self.kernels.append(Kernel(op, self.where[-1], _label(bare, args, outs, self.dtype),
                                   _flops(bare, args, outs), float(nbytes)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._quiet:
            return out
        name = func.overloadpacket.__name__
        if name in _NO_KERNEL or _is_view(func):
            return out
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not any(t.device.type == "meta" for t in outs):
            return out                              # host arithmetic on CPU scalars
        schema = func._schema.arguments
        reads, writes = [], []
        bound = list(zip(schema, args)) + [(a, kwargs[a.name]) for a in schema
                                           if a.name in kwargs]
        for arg, value in bound:
            written = arg.alias_info is not None and arg.alias_info.is_write
            leaves = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
            if written:
                writes += leaves
                if arg.name == "out" or name in _WRITE_ONLY:
                    continue
            reads += leaves
        if not writes:
            writes = outs
        prefix = "fastdiff." if func.namespace == "fastdiff" else "aten."
        x = args[0] if args else None
        if (name == "native_layer_norm" and isinstance(x, torch.Tensor)
                and not x.is_contiguous()):
            # CUDA's layer_norm copies a strided input to contiguous first (expect_contiguous):
            # a copy kernel, inside the call, that the dispatcher never sees.
            self._quiet += 1
            try:
                dense = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            finally:
                self._quiet -= 1
            self.add("aten.clone", [x], [x], [dense])
        self.add(prefix + name, list(args), reads, writes)
        return out


class _FusedSDPA(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as one fused kernel (what a GPU runs for these
    shapes: flash attention, or the memory-efficient kernel with a mask)."""

    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.rec._quiet += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.rec._quiet -= 1
        names = ("query", "key", "value", "attn_mask")
        q, k, v, mask = (list(args) + [kwargs.get(n) for n in names[len(args):]])[:4]
        if out.dim() == 4:
            # CUDA's flash, memory-efficient and cuDNN kernels write (B, L, H, D) and return it
            # viewed as (B, H, L, D): the processors' transpose(1, 2).reshape is then a view, not
            # the copy a contiguous meta output would record.
            self.rec._quiet += 1
            try:
                out = torch.empty(out.shape[0], out.shape[2], out.shape[1], out.shape[3],
                                  dtype=out.dtype, device=out.device).transpose(1, 2)
            finally:
                self.rec._quiet -= 1
        self.rec.add("sdpa", [q, k, v], [q, k, v, mask], [out])
        return out


def _module_names(rec: Recorder):
    """Global forward hooks naming the innermost block a kernel runs in (torch.nn leaves such
    as Linear or Conv2d are named by the op itself)."""
    from torch.nn.modules import module as m

    def pre(mod, inputs):
        if not type(mod).__module__.startswith(_LEAF_PREFIX):
            rec.where.append(type(mod).__name__)

    def post(mod, inputs, output):
        if not type(mod).__module__.startswith(_LEAF_PREFIX):
            rec.where.pop()

    # (observers: accelerate's folded transformer blocks may compute the modules they watch
    # without calling them, as they do unwatched)
    from fastdiff.integrations.diffusers.blocks import OBSERVER

    setattr(pre, OBSERVER, True)
    setattr(post, OBSERVER, True)
    return m.register_module_forward_pre_hook(pre), m.register_module_forward_hook(post)


@contextlib.contextmanager
def recording(rec: Recorder | torch.dtype = torch.float16):
    """``with recording(dtype) as rec:`` records the kernels of what runs inside into ``rec``
    (a new Recorder, or the one given)."""
    rec = rec if isinstance(rec, Recorder) else Recorder(rec)
    hooks = _module_names(rec)
    try:
        with torch.no_grad(), _FusedSDPA(rec), rec:
            yield rec
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------- one step, three systems

def _meta(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


def inputs(spec: dict, in_channels: int, batch: int, dtype=torch.float16):
    """Meta tensors of one step of a model described by ``spec`` (see MODELS): the latents
    (batch/2 rows when guided) and the U-Net's conditioning keywords (model-batch rows)."""
    side = spec["resolution"] // spec["down"]
    if spec["guided"] and batch % 2:
        raise ValueError(f"a guided model batch is [uncond; cond]: 'batch' must be even, got "
                         f"{batch}")
    latents = _meta(batch // 2 if spec["guided"] else batch, in_channels, side, side,
                    dtype=dtype)
    cond = {}
    if spec.get("context"):
        cond["encoder_hidden_states"] = _meta(batch, *spec["context"], dtype=dtype)
    if spec.get("added"):
        cond["added_cond_kwargs"] = {k: _meta(batch, *v, dtype=dtype)
                                     for k, v in spec["added"].items()}
    return latents, cond


def _scheduler(name: str):
    """diffusers' DDIMScheduler with model ``name``'s schedule, set to STEPS steps."""
    from fastdiff.integrations.diffusers import zoo

    sched = zoo.build_scheduler(name, "DDIMScheduler")
    sched.set_timesteps(STEPS)
    return sched


def pipeline_step(rec, unet, sched, latents, cond, guided, k: int = STEPS // 2):
    """The loop body of diffusers' pipelines (StableDiffusionPipeline, DDIMPipeline) at step k:
    the U-Net's timestep is on the device; the scheduler's is the host copy of it (its scalar
    arithmetic runs on the CPU)."""
    t = sched.timesteps[k]
    t_dev = _meta(dtype=sched.timesteps.dtype)
    with rec.at("pipeline"):
        x_in = torch.cat([latents] * 2) if guided else latents
        x_in = sched.scale_model_input(x_in, t)
    out = unet(x_in, t_dev, **cond).sample
    if guided:
        with rec.at("CFG combine"):
            u, c = out.chunk(2)
            out = u + GUIDANCE_SCALE * (c - u)          # diffusers' convention: u + s (c - u)
    with rec.at("scheduler step"):
        return sched.step(out, t, latents).prev_sample


def engine_step(rec, unet, sched, latents, cond, guided):
    """One step of ``SamplingEngine`` over the U-Net, as ``fastdiff.sample_pipeline`` runs it
    (its set-up, made once per sampling call, is done here outside the recording). Returns the
    step as a callable."""
    from fastdiff import engine, schedules
    from fastdiff.integrations.diffusers.pipeline import _UNetFn

    unet_fn = _UNetFn(unet)

    def model_fn(*args, **kwargs):     # the engine calls forward itself, not the module's hooks
        with rec.at(type(unet).__name__):
            return unet_fn(*args, **kwargs)

    eng = engine.SamplingEngine(model_fn, cuda_graphs=False)
    table = schedules.table_from_scheduler(sched)
    flat = {}
    for key, v in cond.items():
        if isinstance(v, dict):
            flat.update({f"{key}.{a}": b for a, b in v.items()})
        else:
            flat[key] = v
    state = engine._Static(latents, table, flat, sched.timesteps.dtype)

    def step():
        with rec.at("engine"):
            eng._step(state, table, guided, GUIDANCE_SCALE if guided else 1.0, None,
                      table.needs_noise)
    return step


@contextlib.contextmanager
def _attention_backend(name: str):
    """accelerate's attention product as FASTDIFF_ATTENTION picks it, for the recording."""
    before = os.environ.get("FASTDIFF_ATTENTION")
    os.environ["FASTDIFF_ATTENTION"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["FASTDIFF_ATTENTION"]
        else:
            os.environ["FASTDIFF_ATTENTION"] = before


def record(unet, spec: dict, batch: int = 2, dtype=torch.float16,
           attention: str = "sdpa") -> dict[str, list[Kernel]]:
    """The kernels of one step of ``unet`` (on the meta device; ``spec`` as in MODELS) for each
    system. Accelerates ``unet`` in place (diffusers is recorded first). ``attention``: what
    accelerate's processors compute the attention product with: 'sdpa', what they run on CUDA
    (FASTDIFF_ATTENTION=auto), or 'fastdiff' (the op; its output is contiguous (B, H, L, D),
    so the processor's transpose back to (B, L, H*D) copies it)."""
    with _attention_backend(attention):
        return _record(unet, spec, batch, dtype)


def _record(unet, spec: dict, batch: int, dtype) -> dict[str, list[Kernel]]:
    import fastdiff
    from fastdiff.integrations.diffusers import schedulers

    latents, cond = inputs(spec, unet.config.in_channels, batch, dtype)
    guided = spec["guided"]
    result = {}
    sched = _scheduler(spec["scheduler"])
    with recording(dtype) as rec:
        pipeline_step(rec, unet, sched, latents, cond, guided)
    result["diffusers"] = rec.kernels

    fastdiff.accelerate(unet, cuda_graphs=False)
    schedulers.patch(sched)
    # The fused step's first call moves its coefficient table to the device (once per call
    # of the pipeline, not per step), and the first forward makes the weights accelerate
    # derives from the model's (stacked projections, summed biases; once, then only when a
    # weight changes): both made by a step before the recorded one.
    with torch.no_grad():
        pipeline_step(Recorder(dtype), unet, sched, latents, cond, guided)
    with recording(dtype) as rec:
        pipeline_step(rec, unet, sched, latents, cond, guided)
    result["accelerate"] = rec.kernels

    rec = Recorder(dtype)
    step = engine_step(rec, unet, _scheduler(spec["scheduler"]), latents, cond, guided)
    with torch.no_grad():
        step()         # (the warm-up before a capture: what derives from the inputs is made)
    rec.kernels.clear()
    with recording(rec):
        step()
    result["engine"] = rec.kernels
    return result


def build(name: str, dtype=torch.float16):
    """Model ``name`` at full width on the meta device (no weights are materialised)."""
    from diffusers.utils import logging

    from fastdiff.integrations.diffusers import zoo

    level = logging.get_verbosity()
    logging.set_verbosity_error()              # its advice on casting with to(), said per model
    try:
        with torch.device("meta"):
            return zoo.build_unet(name, dtype=dtype, device="meta")
    finally:
        logging.set_verbosity(level)


# ---------------------------------------------------------------- summaries

def summary(kernels: list[Kernel], top: int = 10) -> dict:
    """Totals of one step, its floor per device, and the largest memory-bound contributors
    (H100's ridge point) aggregated by (op, block, shape)."""
    dev0 = ROOFLINES["H100"]
    out = {"kernels": len(kernels), "gflop": sum(k.flops for k in kernels) / 1e9,
           "bytes_gb": sum(k.bytes for k in kernels) / 1e9}
    mem = [k for k in kernels if k.memory_bound(dev0)]
    out["memory_bound_kernels"] = len(mem)
    out["memory_bound_mb"] = sum(k.bytes for k in mem) / 1e6
    # Kernels whose floor is shorter than a few microseconds are bound by launch and
    # scheduling in practice, which the roofline does not see: how many there are.
    out["kernels_under_2us_H100"] = sum(k.floor_s(dev0) < 2e-6 for k in kernels)
    for dname, dev in ROOFLINES.items():
        out[f"floor_ms_{dname}"] = sum(k.floor_s(dev) for k in kernels) * 1e3
        out[f"memory_bound_floor_ms_{dname}"] = sum(k.floor_s(dev) for k in kernels
                                                    if k.memory_bound(dev)) * 1e3
    groups = defaultdict(lambda: [0, 0.0])
    for k in mem:
        g = groups[(k.op, k.where, k.shape)]
        g[0] += 1
        g[1] += k.bytes
    total = out["memory_bound_mb"] * 1e6 or 1.0
    out["top_memory_bound"] = [
        {"op": op, "where": where, "shape": shape, "count": n, "mb": b / 1e6, "share": b / total}
        for (op, where, shape), (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]]
    by_block = defaultdict(lambda: [0, 0.0])
    for k in mem:
        g = by_block[(k.op, k.where)]
        g[0] += 1
        g[1] += k.bytes
    out["memory_bound_by_op_and_block"] = [
        {"op": op, "where": where, "count": n, "mb": b / 1e6, "share": b / total}
        for (op, where), (n, b) in sorted(by_block.items(), key=lambda kv: -kv[1][1])]
    by_class = {c: [0, 0.0] for c in CLASSES}
    for k in kernels:
        c = by_class[op_class(k.op)]
        c[0] += 1
        c[1] += k.floor_s(dev0) * 1e3
    out["by_class_H100"] = {c: {"kernels": n, "floor_ms": ms} for c, (n, ms) in by_class.items()}
    return out


CLASSES = ("conv", "matmul", "attention", "norm", "elementwise", "copy/cast/cat")


def op_class(op: str) -> str:
    """The kind of kernel an op is (one of CLASSES)."""
    name = op.split(".", 1)[-1].rstrip("_")
    if name in ("convolution", "norm_conv2d"):
        return "conv"
    if name in _MATMUL or name in _FOLDED_GEMMS:
        return "matmul"
    if name in _ATTENTION:
        return "attention"
    if name in ("native_group_norm", "native_layer_norm", "group_norm_silu",
                "group_norm_silu_residual", "add_layer_norm", "group_norm_scale_shift"):
        return "norm"
    if name in ("cat", "clone", "copy", "_to_copy", "index_select", "upsample_nearest2d"):
        return "copy/cast/cat"
    return "elementwise"


def markdown(results: dict) -> str:
    lines = ["| model | system | kernels | of which floor < 2 us | GFLOP | memory-bound MB | "
             "floor ms H100 | of which memory-bound | floor ms H200 | floor it/s H100 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, systems in results["models"].items():
        for system, s in systems.items():
            lines.append(
                f"| {model} | {system} | {s['kernels']} | {s['kernels_under_2us_H100']} | "
                f"{s['gflop']:.1f} | "
                f"{s['memory_bound_mb']:.0f} | {s['floor_ms_H100']:.2f} | "
                f"{s['memory_bound_floor_ms_H100']:.2f} | {s['floor_ms_H200']:.2f} | "
                f"{1e3 / s['floor_ms_H100']:.0f} |")
    return "\n".join(lines)


def class_markdown(results: dict) -> str:
    lines = ["| model | system | " + " | ".join(CLASSES) + " |",
             "|---|---|" + "---:|" * len(CLASSES)]
    for model, systems in results["models"].items():
        for system, s in systems.items():
            cells = [f"{s['by_class_H100'][c]['kernels']}: {s['by_class_H100'][c]['floor_ms']:.2f}"
                     for c in CLASSES]
            lines.append(f"| {model} | {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def top_markdown(s: dict, by: str = "shape") -> str:
    """The largest memory-bound contributors of one step: per (op, block, shape), or summed
    over shapes per (op, block)."""
    if by == "block":
        rows = [(f"{r['op']} ({r['where']})", "all", r["count"], r) for r in
                s["memory_bound_by_op_and_block"][:len(s["top_memory_bound"])]]
    else:
        rows = [(f"{r['op']} ({r['where']})", r["shape"], r["count"], r)
                for r in s["top_memory_bound"]]
    lines = ["| op (block) | shape | count | MB | share |", "|---|---|---:|---:|---:|"]
    for name, shape, n, r in rows:
        lines.append(f"| {name} | {shape} | {n} | {r['mb']:.1f} | {100 * r['share']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, default=2,
                   help="U-Net batch per step (guided models: [uncond; cond], so 2 = 1 image)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels for every model listed (default: each "
                        "model's native resolution)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--attention", choices=("sdpa", "fastdiff"), default="sdpa",
                   help="accelerate's attention product: sdpa (what it runs on CUDA, "
                        "FASTDIFF_ATTENTION=auto) or fastdiff (the op)")
    p.add_argument("--top", type=int, default=10, help="memory-bound contributors listed")
    p.add_argument("--group-by", choices=("shape", "block"), default="shape",
                   help="list contributors per (op, block, shape) or per (op, block)")
    p.add_argument("--json", default=None, help="also write the results (and every kernel) here")
    a = p.parse_args(argv)
    dtype = DTYPES[a.dtype]
    results = {"about": "roofline model on meta tensors, not a measurement",
               "environment": environment(), "rooflines": ROOFLINES, "batch": a.batch,
               "dtype": a.dtype, "attention": a.attention,
               "scheduler": f"DDIMScheduler, {STEPS} steps, eta=0",
               "guidance_scale": GUIDANCE_SCALE, "models": {}, "kernels": {}}
    for name in a.models:
        t0 = time.perf_counter()
        spec = dict(MODELS[name])
        if a.resolution:
            spec["resolution"] = a.resolution
        per = record(build(name, dtype), spec, a.batch, dtype, attention=a.attention)
        results["models"][name] = {s: summary(k, a.top) for s, k in per.items()}
        results["kernels"][name] = {s: [asdict(x) for x in k] for s, k in per.items()}
        print(f"# {name}: recorded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"Roofline model of one step (a model, not a measurement): batch {a.batch}, {a.dtype}, "
          f"DDIM; accelerate's attention: {a.attention}; "
          f"commit {results['environment']['git_commit']}\n")
    print(markdown(results))
    print("\nKernels and floor (ms, H100) by kind of kernel:\n")
    print(class_markdown(results))
    for name, systems in results["models"].items():
        for system, s in systems.items():
            print(f"\n{name} / {system}: the {a.top} largest memory-bound contributors "
                  f"(H100 ridge {ridge(ROOFLINES['H100']):.0f} FLOP/B; share of "
                  f"{s['memory_bound_mb']:.0f} MB)\n")
            print(top_markdown(s, a.group_by))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
