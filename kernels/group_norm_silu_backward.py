"""Triton kernels for fastdiff::group_norm_silu_backward (the math and its derivation:
csrc/group_norm_silu_backward.cpp).

Two launches. ``group_norm_silu_backward_group`` runs one program per (n, group) and walks the
group three times in tiles of [BLOCK_C channels, BLOCK_P pixels] (either layout: the channel and
pixel strides are arguments): the statistics (sums of h minus the group's first value, so a
large mean keeps its digits in fp32), the per-channel sums A = sum du and B = sum du * xhat with
du = dy * silu'(u), and dx in one pass from them; it writes the per-(n, c) gradients of pre_bias,
scale and shift and the per-(n, c) terms of weight's and bias's. ``group_norm_silu_backward_params``
sums those terms over n (a fixed order: deterministic, no atomics).

The statistics are recomputed rather than saved by the forward (whose schema and prebuilt
kernels stay as inference needs them). One program per group is a first version: N * G
programs (64 for SD's 2 x 32) underfill a large GPU; splitting groups as the forward's stats
kernel does is the next step. These kernels have no prebuilt cubins (no ``prebuilt_configs``):
the C++ op says so and runs them through the JIT.
"""
import torch
import triton
import triton.language as tl

from .group_norm_silu import _param

TILE = 1024             # elements per [BLOCK_C, BLOCK_P] tile
PARAM_BLOCK = 128       # channels per program of the weight/bias sum
NUM_WARPS = 4


@triton.jit
def _load(dy_ptr, x_ptr, pre_ptr, pre_kind, base, cc, pp, cmask, mask, n, g, C, CG, SC, SP,
          HAS_PRE: tl.constexpr):
    """h = x + pre_bias and dy of one tile, fp32 (0 where masked), and the offsets."""
    off = base + cc.to(tl.int64)[:, None] * SC + pp.to(tl.int64)[None, :] * SP
    h = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:
        pre = _param(pre_ptr, pre_kind, n * C + g * CG + cc, cmask, 0.0, x_ptr.dtype.element_ty)
        h = tl.where(mask, h + pre[:, None], 0.0)
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    return h, dy, off


@triton.jit
def _du(dy, xhat, w, b, s, sh, SILU: tl.constexpr):
    """The gradient at u = (xhat w + b) s + sh, the SiLU's input: dy silu'(u) (dy without SiLU);
    passes 2 and 3 recompute it rather than keep a group's worth."""
    du = dy
    if SILU:
        u = (xhat * w[:, None] + b[:, None]) * s[:, None] + sh[:, None]
        sig = tl.sigmoid(u)
        du = dy * sig * (1.0 + u * (1.0 - sig))
    return du


@triton.jit
def group_norm_silu_backward_group(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, pre_ptr, scale_ptr,
                                   shift_ptr, dpre_ptr, dscale_ptr, dshift_ptr, part_ptr,
                                   HW, C, G, CG, SC, SP, eps, w_kind, b_kind, pre_kind,
                                   scale_kind, shift_kind, HAS_PRE: tl.constexpr,
                                   HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                                   SILU: tl.constexpr, BLOCK_C: tl.constexpr,
                                   BLOCK_P: tl.constexpr):
    ng = tl.program_id(0)
    n = ng // G
    g = ng % G
    xt = x_ptr.dtype.element_ty
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < CG
    c = g * CG + cc                              # channels of the group
    base = n.to(tl.int64) * C * HW + (g * CG).to(tl.int64) * SC
    k = tl.load(x_ptr + base).to(tl.float32)     # the group's first value
    if HAS_PRE:
        k += _param(pre_ptr, pre_kind, n * C + g * CG, True, 0.0, xt)
    # Pass 1: per-channel sums of h - k and (h - k)^2.
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        mask = cmask[:, None] & (pp < HW)[None, :]
        h, dy, off = _load(dy_ptr, x_ptr, pre_ptr, pre_kind, base, cc, pp, cmask, mask, n, g, C,
                           CG, SC, SP, HAS_PRE)
        d = tl.where(mask, h - k, 0.0)
        s1 += tl.sum(d, axis=1)
        s2 += tl.sum(d * d, axis=1)
    L = CG * HW
    dmean = tl.sum(s1, axis=0) / L
    var = tl.maximum(tl.sum(s2, axis=0) / L - dmean * dmean, 0.0)
    mean = k + dmean
    rstd = 1.0 / tl.sqrt(var + eps)
    w = _param(w_ptr, w_kind, c, cmask, 1.0, xt)
    b = _param(b_ptr, b_kind, c, cmask, 0.0, xt)
    s = 1.0 + _param(scale_ptr, scale_kind, n * C + c, cmask, 0.0, xt)
    sh = _param(shift_ptr, shift_kind, n * C + c, cmask, 0.0, xt)
    # Pass 2: A = sum du, B = sum du * xhat per channel.
    A = tl.zeros([BLOCK_C], dtype=tl.float32)
    B = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        mask = cmask[:, None] & (pp < HW)[None, :]
        h, dy, off = _load(dy_ptr, x_ptr, pre_ptr, pre_kind, base, cc, pp, cmask, mask, n, g, C,
                           CG, SC, SP, HAS_PRE)
        xhat = (h - mean) * rstd
        du = _du(dy, xhat, w, b, s, sh, SILU)
        du = tl.where(mask, du, 0.0)
        A += tl.sum(du, axis=1)
        B += tl.sum(du * xhat, axis=1)
    kc = w * s
    mean1 = tl.sum(kc * A, axis=0) / L
    mean2 = tl.sum(kc * B, axis=0) / L
    nc = n * C + c
    if HAS_SHIFT:
        tl.store(dshift_ptr + nc, A.to(dshift_ptr.dtype.element_ty), mask=cmask)
    if HAS_SCALE:
        tl.store(dscale_ptr + nc, (w * B + b * A).to(dscale_ptr.dtype.element_ty), mask=cmask)
    tl.store(part_ptr + nc * 2, s * B, mask=cmask)
    tl.store(part_ptr + nc * 2 + 1, s * A, mask=cmask)
    if HAS_PRE:  # sum over the channel of dx, with sum xhat = HW (mean_c - mean) rstd
        xsum = (k + s1 / HW - mean) * rstd * HW
        dpre = rstd * (kc * A - HW * mean1 - mean2 * xsum)
        tl.store(dpre_ptr + nc, dpre.to(dpre_ptr.dtype.element_ty), mask=cmask)
    # Pass 3: dx = rstd * (k du - mean1 - xhat * mean2).
    for p0 in range(0, HW, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        mask = cmask[:, None] & (pp < HW)[None, :]
        h, dy, off = _load(dy_ptr, x_ptr, pre_ptr, pre_kind, base, cc, pp, cmask, mask, n, g, C,
                           CG, SC, SP, HAS_PRE)
        xhat = (h - mean) * rstd
        du = _du(dy, xhat, w, b, s, sh, SILU)
        dx = rstd * (kc[:, None] * du - mean1 - xhat * mean2)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def group_norm_silu_backward_params(part_ptr, dw_ptr, db_ptr, N, C, HAS_W: tl.constexpr,
                                    HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = c < C
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for n in range(0, N):
        off = (n * C + c).to(tl.int64) * 2
        dw += tl.load(part_ptr + off, mask=cmask, other=0.0)
        db += tl.load(part_ptr + off + 1, mask=cmask, other=0.0)
    if HAS_W:
        tl.store(dw_ptr + c, dw.to(dw_ptr.dtype.element_ty), mask=cmask)
    if HAS_B:
        tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=cmask)


def _kind(t):
    """How the kernels read an optional per-channel tensor: 0 absent, 1 float32, 2 x's dtype."""
    return 0 if t is None else 1 if t.dtype == torch.float32 else 2


def plan(grad_y, x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu):
    """The two launches of a call, [(config, grid, args)], and the outputs (dx, dweight, dbias,
    dpre_bias, dscale, dshift; an absent input's gradient is an empty (0,) tensor)."""
    N, C, H, W = x.shape
    dx = torch.empty_like(x)
    grads = [x.new_empty((0,)) if t is None else torch.empty_like(t)
             for t in (weight, bias, pre_bias, scale, shift)]
    if x.numel() == 0:
        return [], (dx, *grads)
    HW, G = H * W, num_groups
    cg = C // G
    cl = not x.is_contiguous()
    sc, sp = (1, C) if cl else (HW, 1)
    block_c = triton.next_power_of_2(cg)
    block_p = max(1, min(triton.next_power_of_2(HW), TILE // block_c))
    part = torch.empty((N, C, 2), dtype=torch.float32, device=x.device)
    # Absent tensors: x stands in (kind 0 or HAS_* False: never read or written).
    w, b, pre, s, sh = (x if t is None else t for t in (weight, bias, pre_bias, scale, shift))
    dw, db, dpre, dscale, dshift = (x if t is None else gr
                                    for t, gr in zip((weight, bias, pre_bias, scale, shift), grads))
    group = {"fn": group_norm_silu_backward_group, "num_warps": NUM_WARPS, "num_stages": 1,
             "constexprs": {"HAS_PRE": pre_bias is not None, "HAS_SCALE": scale is not None,
                            "HAS_SHIFT": shift is not None, "SILU": bool(apply_silu),
                            "BLOCK_C": block_c, "BLOCK_P": block_p}}
    params = {"fn": group_norm_silu_backward_params, "num_warps": NUM_WARPS, "num_stages": 1,
              "constexprs": {"HAS_W": weight is not None, "HAS_B": bias is not None,
                             "BLOCK": PARAM_BLOCK}}
    return [(group, (N * G, 1, 1),
             [grad_y, x, dx, w, b, pre, s, sh, dpre, dscale, dshift, part, HW, C, G, cg, sc, sp,
              float(eps), _kind(weight), _kind(bias), _kind(pre_bias), _kind(scale),
              _kind(shift)]),
            (params, (triton.cdiv(C, PARAM_BLOCK), 1, 1), [part, dw, db, N, C])], (dx, *grads)
