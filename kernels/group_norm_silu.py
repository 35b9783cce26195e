"""Triton kernels for fastdiff::group_norm_silu.

Two launches. ``_stats`` splits every (n, group) into chunks so that a GPU is filled even when
N * G is small (2 x 32 = 64 groups against 132 SMs): each program reduces one chunk, tile by
tile, exactly (mean, then squared deviations of the tile held in registers) and merges tiles
with Chan's formula; ``_apply`` merges a group's chunk partials the same way and writes
``silu((x + pre - mean) * rstd * w + b) * (1 + scale) + shift`` for its chunk. NCHW and
channels_last are read in place through strides, each in its coalesced order.
"""
import torch
import triton
import triton.language as tl

from . import pointers, run, variant

BLOCK = 1024
NUM_WARPS = 4
MAX_SPLIT = 32          # chunks per group: enough programs to fill a GPU, few partials to merge
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _tile(x_ptr, pre_ptr, start, t, chunk, n, g, HW, C, CG,
          CL: tl.constexpr, HAS_PRE: tl.constexpr, BLOCK: tl.constexpr):
    """Tile t of the chunk that begins at element ``start`` of group (n, g): x (+ pre_bias) in
    fp32, with memory offsets, channels and the mask. NCHW walks spatially within a channel,
    channels_last walks channels within a pixel: both read contiguous memory."""
    r = t + tl.arange(0, BLOCK)
    e = start + r
    mask = (e < CG * HW) & (r < chunk)
    if CL:
        c = g * CG + e % CG
        off = (n * HW + e // CG) * C + c
    else:
        c = g * CG + e // HW
        off = (n * C + c) * HW + e % HW
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:
        v += tl.load(pre_ptr + n * C + c, mask=mask, other=0.0)
    return v, off, c, mask


@triton.jit
def _stats(x_ptr, pre_ptr, part_ptr, HW, C, G, CG, chunk, split,
           CL: tl.constexpr, HAS_PRE: tl.constexpr, BLOCK: tl.constexpr):
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng % G
    start = s.to(tl.int64) * chunk
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for t in range(0, chunk, BLOCK):
        v, off, c, mask = _tile(x_ptr, pre_ptr, start, t, chunk, n, g, HW, C, CG, CL, HAS_PRE,
                                BLOCK)
        k = tl.sum(mask.to(tl.float32), axis=0)
        k_safe = tl.maximum(k, 1.0)
        tmean = tl.sum(v, axis=0) / k_safe
        d = tl.where(mask, v - tmean, 0.0)
        tm2 = tl.sum(d * d, axis=0)
        tot = tl.maximum(cnt + k, 1.0)
        delta = tmean - mean
        mean += delta * k / tot
        m2 += tm2 + delta * delta * cnt * k / tot
        cnt += k
    base = part_ptr + (ng * split + s) * 3
    tl.store(base + 0, cnt)
    tl.store(base + 1, mean)
    tl.store(base + 2, m2)


@triton.jit
def _apply(x_ptr, y_ptr, w_ptr, b_ptr, pre_ptr, scale_ptr, shift_ptr, part_ptr,
           HW, C, G, CG, chunk, split, eps,
           CL: tl.constexpr, HAS_PRE: tl.constexpr, HAS_SS: tl.constexpr, SILU: tl.constexpr,
           SPLIT_P2: tl.constexpr, BLOCK: tl.constexpr):
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng % G
    # Merge the group's chunk partials (Chan et al.): one vector op over <= MAX_SPLIT entries.
    i = tl.arange(0, SPLIT_P2)
    pm = i < split
    base = part_ptr + (ng * split + i) * 3
    cnts = tl.load(base + 0, mask=pm, other=0.0)
    means = tl.load(base + 1, mask=pm, other=0.0)
    m2s = tl.load(base + 2, mask=pm, other=0.0)
    total_cnt = tl.sum(cnts, axis=0)
    mean = tl.sum(cnts * means, axis=0) / total_cnt
    dev = means - mean
    m2 = tl.sum(m2s + cnts * dev * dev, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total_cnt + eps)

    start = s.to(tl.int64) * chunk
    for t in range(0, chunk, BLOCK):
        v, off, c, mask = _tile(x_ptr, pre_ptr, start, t, chunk, n, g, HW, C, CG, CL, HAS_PRE,
                                BLOCK)
        y = (v - mean) * rstd * tl.load(w_ptr + c, mask=mask, other=1.0) \
            + tl.load(b_ptr + c, mask=mask, other=0.0)
        if HAS_SS:
            y = y * (1.0 + tl.load(scale_ptr + n * C + c, mask=mask, other=0.0)) \
                + tl.load(shift_ptr + n * C + c, mask=mask, other=0.0)
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


_COMMON = {"HW": "i64", "C": "i64", "G": "i64", "CG": "i64", "chunk": "i64", "split": "i64"}


def _configs(dtype, cl, has_pre, has_ss, silu):
    """The (stats, apply) configurations for one call; the launcher uses nothing else.

    ``aligned`` is the common case (16-byte aligned tensors, H*W and C multiples of 16, as in
    every diffusion U-Net); aot_configs() adds a variant that assumes aligned pointers only."""
    t = "*" + _TL_DTYPES[dtype]
    stats = {"fn": _stats, "num_warps": NUM_WARPS, "num_stages": 1,
             "signature": {"x_ptr": t, "pre_ptr": "*fp32", "part_ptr": "*fp32", **_COMMON},
             "constexprs": {"CL": cl, "HAS_PRE": has_pre, "BLOCK": BLOCK}}
    apply = {"fn": _apply, "num_warps": NUM_WARPS, "num_stages": 1,
             "signature": {"x_ptr": t, "y_ptr": t, "w_ptr": "*fp32", "b_ptr": "*fp32",
                           "pre_ptr": "*fp32", "scale_ptr": "*fp32", "shift_ptr": "*fp32",
                           "part_ptr": "*fp32", **_COMMON, "eps": "fp32"},
             "constexprs": {"CL": cl, "HAS_PRE": has_pre, "HAS_SS": has_ss, "SILU": silu,
                            "SPLIT_P2": MAX_SPLIT, "BLOCK": BLOCK}}
    # chunk is a multiple of BLOCK by construction.
    return tuple(variant(c, pointers(c) + ("HW", "C", "chunk")) for c in (stats, apply))


def aot_configs():
    """Every configuration the launcher can choose (stats kernels listed once each)."""
    out = {}
    for dt in _TL_DTYPES:
        for cl in (False, True):
            for pre in (False, True):
                for ss in (False, True):
                    for silu in (False, True):
                        stats, apply = _configs(dt, cl, pre, ss, silu)
                        out[("stats", dt, cl, pre)] = stats
                        out[("apply", dt, cl, pre, ss, silu)] = apply
    return [v for c in out.values() for v in (c, variant(c, pointers(c) + ("chunk",)))]


def _f32(t, fill, shape, device):
    if t is None:
        return torch.full(shape, fill, dtype=torch.float32, device=device)
    return t.to(torch.float32).contiguous()


def plan(x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu):
    """The two launches of a call, [(config, grid, args)], and the output; x non-empty."""
    N, C, H, W = x.shape
    y = torch.empty_like(x)
    HW, G = H * W, num_groups
    cg = C // G
    cl = not x.is_contiguous()
    dev = x.device
    w = _f32(weight, 1.0, (C,), dev)
    b = _f32(bias, 0.0, (C,), dev)
    has_ss = scale is not None or shift is not None
    sc = _f32(scale, 0.0, (N, C), dev) if has_ss else w
    sh = _f32(shift, 0.0, (N, C), dev) if has_ss else w
    pre = _f32(pre_bias, 0.0, (N, C), dev) if pre_bias is not None else w
    total = cg * HW
    split = min(MAX_SPLIT, triton.cdiv(total, BLOCK))
    chunk = triton.cdiv(triton.cdiv(total, split), BLOCK) * BLOCK
    split = triton.cdiv(total, chunk)
    part = torch.empty((N * G, split, 3), dtype=torch.float32, device=dev)
    stats, apply = _configs(x.dtype, cl, pre_bias is not None, has_ss, bool(apply_silu))
    grid = (N * G, split, 1)
    common = [HW, C, G, cg, chunk, split]
    return [(stats, grid, [x, pre, part, *common]),
            (apply, grid, [x, y, w, b, pre, sc, sh, part, *common, float(eps)])], y


def group_norm_silu(x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu):
    """Launch on checked inputs (csrc/ops.cpp): x (N, C, H, W) contiguous or channels_last."""
    if x.numel() == 0:
        return torch.empty_like(x)
    launches, y = plan(x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu)
    for cfg, grid, args in launches:
        run(cfg, grid, args)
    return y
