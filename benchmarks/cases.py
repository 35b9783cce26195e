"""The benchmark suite's cases and the systems each is timed on (benchmarks/test_*.py).

Kernel cases are the op shapes of real U-Nets, derived from their public configurations
(``fastdiff.integrations.diffusers.zoo``): SD1.5 at 512x512, SDXL at 1024x1024, DDPM-CIFAR10 at
32x32 and the shipped digits model at 8x8, each with the CFG batch (2 x images). Every case is
timed for three systems in the same run: ``fastdiff`` (the fused op), ``eager`` (the torch code
it replaces) and ``compile`` (``torch.compile`` of that same eager code). End-to-end cases time
the denoising loop of a diffusers pipeline (SD1.5 architecture, random weights) for: stock
diffusers eager, diffusers with ``torch.compile(unet, mode="max-autotune")``,
``fastdiff.accelerate(pipe)`` (and ``accelerate-cublas``: its Triton GEMMs off) and the
fastdiff engine (``fastdiff.sample_pipeline``, whole steps in CUDA graphs). ``unfused`` is
timed for the ops that replace a fastdiff pair (linear_geglu: the projection, then
``fastdiff.geglu``, as accelerate ran GEGLU before it; layer_norm_linear: the LayerNorm, then
the Linear or ``fastdiff.linear_geglu``). Timing is
pytest-benchmark's; on CUDA every timed call ends with a synchronize
and runs the op ``inner`` times, so a kernel's time is the round's time / inner.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

KERNEL_SYSTEMS = ("fastdiff", "eager", "compile", "unfused")
# Ops with an ``unfused`` system: the same math as fastdiff ran it before the op fused it.
UNFUSED_OPS = ("linear_geglu", "layer_norm_linear", "norm_conv2d")
E2E_SYSTEMS = ("engine", "accelerate", "accelerate-cublas", "diffusers", "compile")
# accelerate-cublas: accelerate with its Triton GEMMs off (the LayerNorm fold, linear_geglu and
# the GroupNorm fold into norm_conv2d: FASTDIFF_NORM_FOLD=off, FASTDIFF_GEGLU=split,
# FASTDIFF_CONV_FOLD=off), every matmul on cuBLAS and every convolution on cuDNN: the GPU run's
# A/B of those fusions, side by side with accelerate's defaults
CUBLAS_ENV = {"FASTDIFF_NORM_FOLD": "off", "FASTDIFF_GEGLU": "split",
              "FASTDIFF_CONV_FOLD": "off"}


# ---------------------------------------------------------------- kernel cases

@dataclass
class KernelCase:
    # group_norm_silu | attention | denoise_step | geglu | add_layer_norm | linear_geglu |
    # layer_norm_linear | norm_conv2d
    op: str
    model: str                   # sd15@512 ...
    shape: tuple                 # linear_geglu: (B, L, K, F), x (B, L, K) -> y (B, L, F)
                                 # layer_norm_linear: (B, L, K, N), W (N, K)
    groups: int = 32
    quick: bool = False
    label: str = field(default="", compare=False)
    next_bias: bool = False      # add_layer_norm only: h_out = h + next_bias as well
    tokens: bool = False         # group_norm_silu only: no SiLU, channels_last out of NCHW x
    geglu: bool = False          # layer_norm_linear only: y (B, L, N/2), GEGLU of the GEMM
    conv: str = ""               # norm_conv2d only: shape (B, C1, C2, H, W, O); 'conv1': an up
                                 # resnet's conv1 over cat(x, x2) with the time embedding;
                                 # 'conv2': its conv2 with the 1x1 shortcut over cat(x, x2)

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
        if self.op == "geglu":
            return (n + n // 2) * itemsize                       # (..., 2F) read, (..., F)
        if self.op == "linear_geglu":
            b, seq, k, f = self.shape                            # x, W (2F, K), bias read; y
            return (b * seq * k + 2 * f * k + 2 * f + b * seq * f) * itemsize
        if self.op == "layer_norm_linear":
            b, seq, k, nn = self.shape                           # x, W read; y written (the
            out = nn // 2 if self.geglu else nn                  # fold: 3N floats, not counted)
            return (b * seq * k + nn * k + b * seq * out) * itemsize
        if self.op == "norm_conv2d":
            b, c1, c2, hh, ww, o = self.shape                    # inputs, packed weight read;
            hw = hh * ww                                         # out written (float32
            if self.conv == "conv1":                             # tables not counted)
                return (b * (c1 + c2) * hw + o * 9 * (c1 + c2) + b * o * hw) * itemsize
            return (b * (o + c1 + c2) * hw + o * (9 * o + c1 + c2) + b * o * hw) * itemsize
        if self.op == "add_layer_norm":
            return 4 * n * itemsize                              # x, residual read; h, y
                                                                 # (next_bias: C more)
        return (2 * n + n + n) * itemsize                        # [u; c] read, x read, out

    def flops(self) -> int:
        if self.op == "attention":
            b, h, lq, lk, d = self.shape
            return 4 * b * h * lq * lk * d
        if self.op == "linear_geglu":
            b, seq, k, f = self.shape
            return 2 * b * seq * k * 2 * f                       # the projection's GEMM
        if self.op == "layer_norm_linear":
            b, seq, k, nn = self.shape
            return 2 * b * seq * k * nn                          # the GEMM
        if self.op == "norm_conv2d":
            b, c1, c2, hh, ww, o = self.shape
            k = 9 * (c1 + c2) if self.conv == "conv1" else 9 * o + c1 + c2
            return 2 * b * hh * ww * o * k                       # the implicit GEMM
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
                # the transformer's feed-forward: GEGLU on the projection's (B, L, 2 * 4C)
                cases.append(KernelCase("geglu", tag, (B, res * res, 2 * 4 * ch)))
                # the same GEGLU with its projection (C -> 2 * 4C) in one GEMM
                cases.append(KernelCase("linear_geglu", tag, (B, res * res, ch, 4 * ch),
                                        label=f"{B}x{res * res}x{ch}->{4 * ch}"))
                # a LayerNorm folded into the GEMM that reads it: norm1 -> the stacked q/k/v
                # (C -> 3C), norm3 -> GEGLU's projection (C -> 2 x 4C)
                cases.append(KernelCase("layer_norm_linear", tag, (B, res * res, ch, 3 * ch),
                                        label=f"{B}x{res * res}x{ch}->{3 * ch} qkv"))
                cases.append(KernelCase("layer_norm_linear", tag, (B, res * res, ch, 8 * ch),
                                        geglu=True,
                                        label=f"{B}x{res * res}x{ch}->2x{4 * ch} geglu"))
                # a residual add and the LayerNorm after it (norm2, norm3)
                cases.append(KernelCase("add_layer_norm", tag, (B, res * res, ch)))
                if name == "sd15" and res >= 32:
                    # an up block's resnet at this level: conv1 over cat(hidden, skip) of C
                    # channels each, conv2 with the 1x1 shortcut over the same cat
                    for conv in ("conv1", "conv2"):
                        cases.append(KernelCase("norm_conv2d", tag, (B, ch, ch, res, res, ch),
                                                conv=conv, label=f"{B}x({ch}+{ch})x{res}x{res}"
                                                f"->{ch} {conv}"))
                if name == "sd15":
                    # Transformer2DModel's GroupNorm before its 1x1 proj_in, written as the
                    # (B, HW, C) tokens (channels_last) the transformer reads
                    cases.append(KernelCase("group_norm_silu", tag, (B, ch, res, res),
                                            tokens=True,
                                            label=f"{B}x{ch}x{res}x{res} tokens"))
                    # norm3 with the feed-forward's output bias added to the residual
                    cases.append(KernelCase("add_layer_norm", tag, (B, res * res, ch),
                                            next_bias=True,
                                            label=f"{B}x{res * res}x{ch} +next_bias"))
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
        cases.append(KernelCase("geglu", "tiny", (2, 64, 2 * 128), quick=True))
        cases.append(KernelCase("linear_geglu", "tiny", (2, 64, 32, 128), quick=True,
                                label="2x64x32->128"))
        cases.append(KernelCase("add_layer_norm", "tiny", (2, 64, 32), quick=True))
        cases.append(KernelCase("layer_norm_linear", "tiny", (2, 64, 32, 128), quick=True,
                                geglu=True, label="2x64x32->2x64 geglu"))
        cases.append(KernelCase("add_layer_norm", "tiny", (2, 64, 32), quick=True,
                                next_bias=True, label="2x64x32 +next_bias"))
        for conv in ("conv1", "conv2"):
            cases.append(KernelCase("norm_conv2d", "tiny", (2, 16, 16, 8, 8, 16), quick=True,
                                    groups=8, conv=conv, label=f"2x(16+16)x8x8->16 {conv}"))
    return cases


L2_BYTES = 50e6


def kernel_fn(case: KernelCase, system: str, device: str, dtype: torch.dtype):
    """A zero-argument callable running ``case`` once on ``system`` (inputs made here).

    On CUDA the callable cycles through enough copies of the inputs to total 3x the L2 cache
    (50 MB on H100/H200), so bandwidth figures are not L2 hits.
    """
    from fastdiff import ops, schedules

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    if case.op == "group_norm_silu":
        G = case.groups

        def make():
            return rnd(*case.shape), rnd(case.shape[1]), rnd(case.shape[1])
        if case.tokens:
            def fused(x, w, b):
                return ops.group_norm_silu(x, G, w, b, silu=False, channels_last_out=True)

            def fn(x, w, b):         # diffusers: the norm, then the tokens made contiguous
                return F.group_norm(x, G, w, b).permute(0, 2, 3, 1).contiguous()
        else:
            fused = lambda x, w, b: ops.group_norm_silu(x, G, w, b)  # noqa: E731
            fn = lambda x, w, b: F.silu(F.group_norm(x, G, w, b))  # noqa: E731
    elif case.op == "attention":
        bsz, h, lq, lk, d = case.shape

        def make():
            return rnd(bsz, h, lq, d), rnd(bsz, h, lk, d), rnd(bsz, h, lk, d)
        fused, fn = ops.attention, F.scaled_dot_product_attention
    elif case.op == "geglu":
        def make():
            return (rnd(*case.shape),)
        fused = ops.geglu

        def fn(h):                                   # diffusers' GEGLU after its projection
            a, gate = h.chunk(2, dim=-1)
            return a * F.gelu(gate)
    elif case.op == "linear_geglu":
        bsz, seq, K, F_ = case.shape

        def make():
            return rnd(bsz, seq, K), rnd(2 * F_, K) * K ** -0.5, rnd(2 * F_)
        fused = ops.linear_geglu

        def fn(x, w, b):                             # diffusers' GEGLU with its projection
            h, gate = F.linear(x, w, b).chunk(2, dim=-1)
            return h * F.gelu(gate)

        def unfused(x, w, b):                        # accelerate's GEGLU before linear_geglu
            return ops.geglu(F.linear(x, w, b))
    elif case.op == "layer_norm_linear":
        bsz, seq, K, N = case.shape
        geglu = case.geglu

        def make():          # x, the LayerNorm's and the Linear's parameters, their fold
            x, lw, lb, w, b = (rnd(bsz, seq, K), 1 + 0.1 * rnd(K), 0.1 * rnd(K),
                               rnd(N, K) * K ** -0.5, rnd(N))
            return (x, lw, lb, w, b, *ops.fold_layer_norm(lw, lb, w, b))

        def fused(x, lw, lb, w, b, wf, fold):
            return ops.layer_norm_linear(x, wf, fold, None, 1e-5, geglu)

        def fn(x, lw, lb, w, b, wf, fold):           # diffusers: the norm, then the Linear
            z = F.linear(F.layer_norm(x, (K,), lw, lb), w, b)
            if not geglu:
                return z
            h, gate = z.chunk(2, dim=-1)
            return h * F.gelu(gate)

        def unfused(x, lw, lb, w, b, wf, fold):      # accelerate before the fold
            n = F.layer_norm(x, (K,), lw, lb)
            return ops.linear_geglu(n, w, b) if geglu else F.linear(n, w, b)
    elif case.op == "norm_conv2d":
        bsz, c1, c2, hh, ww, o = case.shape
        G, conv1 = case.groups, case.conv == "conv1"
        cin = c1 + c2 if conv1 else o

        def make():   # x, x2, (conv2: h), the norm's, conv's and shortcut's weights, temb
            x, x2 = rnd(bsz, c1, hh, ww), rnd(bsz, c2, hh, ww)
            h = rnd(bsz, o, hh, ww) if not conv1 else None
            gw, gb = 1 + 0.1 * rnd(cin), 0.1 * rnd(cin)
            w, b = rnd(o, cin, 3, 3) * (9 * cin) ** -0.5, rnd(o)
            sw = None if conv1 else rnd(o, c1 + c2, 1, 1) * (c1 + c2) ** -0.5
            temb = rnd(bsz, o).float()
            return (x, x2, h, gw, gb, w, b, sw, temb,
                    ops.pack_conv_weight(w, sw), b.float())

        def fused(x, x2, h, gw, gb, w, b, sw, temb, packed, b32):   # as accelerate runs it
            if conv1:
                s, f = ops.group_norm_scale_shift(x, G, gw, gb, 1e-5, x2=x2)
                return ops.norm_conv2d(x, packed, 3, b32, x2=x2, scale=s, shift=f, silu=True,
                                       temb=temb)
            s, f = ops.group_norm_scale_shift(h, G, gw, gb, 1e-5)
            return ops.norm_conv2d(h, packed, 3, b32, scale=s, shift=f, silu=True,
                                   shortcut=x, shortcut2=x2)

        def fn(x, x2, h, gw, gb, w, b, sw, temb, packed, b32):      # diffusers' resnet
            if conv1:
                a = F.silu(F.group_norm(torch.cat([x, x2], 1), G, gw, gb))
                return F.conv2d(a, w, b, padding=1) + temb.to(x.dtype)[:, :, None, None]
            a = F.silu(F.group_norm(h, G, gw, gb))
            return F.conv2d(torch.cat([x, x2], 1), sw) + F.conv2d(a, w, b, padding=1)

        def unfused(x, x2, h, gw, gb, w, b, sw, temb, packed, b32):  # accelerate before
            if conv1:
                a = ops.group_norm_silu(torch.cat([x, x2], 1), G, gw, gb)
                return F.conv2d(a, w, b, padding=1) + temb.to(x.dtype)[:, :, None, None]
            a = ops.group_norm_silu(h, G, gw, gb)
            out = F.conv2d(a, w, b, padding=1)
            xs = torch.cat([x, x2], 1)
            out.view(bsz, o, -1).baddbmm_(sw.view(o, -1).expand(bsz, o, c1 + c2),
                                          xs.view(bsz, c1 + c2, -1))
            return out
    elif case.op == "add_layer_norm" and case.next_bias:
        C = case.shape[-1]

        def make():
            return rnd(*case.shape), rnd(*case.shape), rnd(C), rnd(C), rnd(C)

        def fused(x, r, w, b, nb):
            return ops.add_layer_norm(x, r, w, b, next_bias=nb)

        def fn(x, r, w, b, nb):    # add, norm3, and the add of the feed-forward's bias to h
            h = x + r
            return h + nb, F.layer_norm(h, (C,), w, b)
    elif case.op == "add_layer_norm":
        C = case.shape[-1]

        def make():
            return rnd(*case.shape), rnd(*case.shape), rnd(C), rnd(C)
        fused = ops.add_layer_norm

        def fn(x, r, w, b):                          # BasicTransformerBlock: add, then norm2
            h = x + r
            return h, F.layer_norm(h, (C,), w, b)
    else:
        n = case.shape[0]
        # one DDIM-like row: x0 = P_x x + P_m e; out = K_x x + K_0 x0 + K_m e
        px, pm, k0, km = 1.2, -0.3, 0.9, 0.4
        row = schedules.step_row(p={"x": px, "m": pm}, o={"x0": k0, "m": km})
        coeffs = torch.tensor([row], dtype=torch.float32, device=device)
        idx = torch.zeros(1, dtype=torch.int64, device=device)

        def make():
            return rnd(2 * n, *case.shape[1:]), rnd(*case.shape)
        fused = lambda m, x: ops.denoise_step(m, x, coeffs, idx, guidance_scale=7.5)  # noqa: E731

        def fn(m, x):
            u, c = m.chunk(2)
            e = u + 7.5 * (c - u)
            x0 = px * x + pm * e
            return k0 * x0 + km * e
    if system == "fastdiff":
        fn = fused
    elif system == "unfused":
        if case.op not in UNFUSED_OPS:
            raise ValueError(f"'system' 'unfused' is for {UNFUSED_OPS}, not {case.op}")
        fn = unfused
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
    if system == "accelerate-cublas":
        fastdiff.accelerate(pipe)

        def run():
            saved = {k: os.environ.get(k) for k in CUBLAS_ENV}
            os.environ.update(CUBLAS_ENV)
            try:
                return pipe(**kw, output_type="latent",
                            generator=torch.Generator().manual_seed(1)).images
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return run
    if system == "engine":
        fastdiff.accelerate(pipe, cuda_graphs=False)
        return lambda: fastdiff.sample_pipeline(pipe, **kw,
                                              generator=torch.Generator().manual_seed(1))
    raise ValueError(f"'system' must be one of {E2E_SYSTEMS}, got {system!r}")
