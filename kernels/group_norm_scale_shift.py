"""Triton kernel for fastdiff::group_norm_scale_shift: a GroupNorm's statistics as a per-(n, c)
affine, ``scale = rstd * weight``, ``shift = bias - mean * scale`` (csrc/group_norm_scale_shift.cpp
states the op), of ``cat([x, x2], 1)`` without making the cat.

One program per (n, group). A group's channels [c0, c0 + C/G) are read from x (channels below
C1) and then from x2 (the rest, at channel - C1): two walks, either of which may be empty, so
that a group straddling the boundary reads each input with its own layout and no lane is
masked off for the other tensor. Each input is walked as its layout (``CL1``/``CL2``) lays it:

- planar (NCHW, NCDHW, ...): the group's channels of one sample are one dense segment of
  channels * S elements, walked in 1-D tiles of BLOCK;
- channels-last: S rows of the group's channels (stride 1), ``ss`` apart, walked in tiles of
  BLOCK // COLS rows by COLS channels.

The statistics are sums of v - p in fp32 lanes, p the group's first element (a pivot: mean 1e3
with std 1 keeps its digits), reduced across lanes once at the end (x2's walk adds into x's lanes
when both have one layout); mean = p + s1 / n,
var = max(s2 / n - (s1 / n)^2, 0) (biased).

Why not a split reduction: at SD1.5's largest GroupNorm, (2, 320, 64, 64) in fp16 with 32 groups,
this is 64 programs of 40960 elements (80 KB each), 5.2 MB in all, half the SMs of an H100/H200
idle. The loop body is loads and FMAs into per-lane accumulators (no cross-warp reduction per
tile, 8 warps, 2048-element tiles: several 16-byte loads in flight per thread), so a program
streams its 80 KB; a split would add a second launch (or atomics) and a partials buffer for a
pass whose traffic is already a fraction of the convolution that applies it. Revisit with a
GPU measurement (not measured here).

VEC (the planner's): elements per 16 bytes when every segment and row of the call starts on
such a boundary (batch strides, S for planar inputs, the row stride, C/G and C1 for
channels-last inputs), else 1; it becomes tl.multiple_of hints, so 16-byte loads.
"""
import torch
import triton
import triton.language as tl

from .group_norm_silu import _param

BLOCK = 2048    # elements per tile: 8 per thread of 8 warps (one 16-byte fp16/bf16 load, two fp32)
COLS = 16       # channels-last tiles: channels per row (BLOCK // COLS = 128 rows of pixels)
NUM_WARPS = 8

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _zeros(CL: tl.constexpr, BLOCK: tl.constexpr, COLS: tl.constexpr):
    """Per-lane accumulators of a walk's tile shape."""
    if CL:
        z = tl.zeros([BLOCK // COLS, COLS], dtype=tl.float32)
    else:
        z = tl.zeros([BLOCK], dtype=tl.float32)
    return z


@triton.jit
def _total(a, CL: tl.constexpr):
    if CL:
        t = tl.sum(tl.sum(a, axis=1), axis=0)
    else:
        t = tl.sum(a, axis=0)
    return t


@triton.jit
def _planar_acc(ptr, base, length, p, a1, a2, BLOCK: tl.constexpr):
    """a1 += v - p, a2 += (v - p)^2 lane-wise over the dense segment ptr[base : base + length]."""
    i = tl.arange(0, BLOCK)
    seg = ptr + base
    for start in range(0, length, BLOCK):
        off = start + i
        m = off < length
        v = tl.load(seg + off, mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, v - p, 0.0)
        a1 += d
        a2 += d * d
    return a1, a2


@triton.jit
def _cl_acc(ptr, base, ss, S, cn, p, a1, a2, VEC: tl.constexpr, BLOCK: tl.constexpr,
            COLS: tl.constexpr):
    """The same over S rows of cn channels (stride 1), row r at ptr[base + r * ss]."""
    ROWS: tl.constexpr = BLOCK // COLS
    r = tl.arange(0, ROWS)
    c = tl.arange(0, COLS)
    for s0 in range(0, S, ROWS):
        rows = s0 + r
        rm = rows < S
        start = tl.multiple_of(base + rows.to(tl.int64) * ss, VEC)
        for c0 in range(0, cn, COLS):
            cols = c0 + c
            m = rm[:, None] & (cols < cn)[None, :]
            v = tl.load(ptr + start[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, v - p, 0.0)
            a1 += d
            a2 += d * d
    return a1, a2


@triton.jit
def _part_acc(ptr, n, ns, ss, S, c_lo, cn, p, a1, a2, CL: tl.constexpr, VEC: tl.constexpr,
              BLOCK: tl.constexpr, COLS: tl.constexpr):
    """Accumulates channels [c_lo, c_lo + cn) of sample n of one input (cn may be 0). The VEC
    hints sit here, on computed values (a hint on a function's argument is lost when Triton
    inlines it)."""
    if CL:
        base = tl.multiple_of(n.to(tl.int64) * ns + c_lo, VEC)
        a1, a2 = _cl_acc(ptr, base, ss, S, cn, p, a1, a2, VEC, BLOCK, COLS)
    else:
        base = tl.multiple_of(n.to(tl.int64) * ns + c_lo.to(tl.int64) * S, VEC)
        a1, a2 = _planar_acc(ptr, base, tl.multiple_of(cn * S, VEC), p, a1, a2, BLOCK)
    return a1, a2


@triton.jit
def group_norm_scale_shift(x_ptr, x2_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, S, C, C1, G, CG,
                           ns1, ss1, ns2, ss2, eps, w_kind, b_kind, CL1: tl.constexpr,
                           CL2: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
                           COLS: tl.constexpr):
    ng = tl.program_id(0)
    n = ng // G
    g = ng % G
    c0 = g * CG
    c1 = c0 + CG
    # The pivot, the group's first element, from whichever input holds channel c0 (a masked
    # load each: the other's address is never read).
    in1 = c0 < C1
    if CL1:
        o1 = n.to(tl.int64) * ns1 + c0
    else:
        o1 = n.to(tl.int64) * ns1 + c0.to(tl.int64) * S
    if CL2:
        o2 = n.to(tl.int64) * ns2 + (c0 - C1)
    else:
        o2 = n.to(tl.int64) * ns2 + (c0 - C1).to(tl.int64) * S
    p = tl.load(x_ptr + o1, mask=in1, other=0.0).to(tl.float32) \
        + tl.load(x2_ptr + o2, mask=c0 >= C1, other=0.0).to(tl.float32)

    cn1 = tl.maximum(tl.minimum(c1, C1) - c0, 0)
    lo2 = tl.maximum(c0 - C1, 0)
    cn2 = tl.maximum(c1 - C1 - lo2, 0)
    if CL1:  # channels-last: a part's channel count is a multiple of VEC (C/G and C1 are)
        cn1 = tl.multiple_of(cn1, VEC)
    if CL2:
        cn2 = tl.multiple_of(cn2, VEC)
    a1 = _zeros(CL1, BLOCK, COLS)
    a2 = _zeros(CL1, BLOCK, COLS)
    a1, a2 = _part_acc(x_ptr, n, ns1, ss1, S, c0, cn1, p, a1, a2, CL1, VEC, BLOCK, COLS)
    if CL1 == CL2:  # one tile shape: x2 accumulates into the same lanes, one reduction
        a1, a2 = _part_acc(x2_ptr, n, ns2, ss2, S, lo2, cn2, p, a1, a2, CL2, VEC, BLOCK, COLS)
        s1 = _total(a1, CL1)
        s2 = _total(a2, CL1)
    else:
        b1 = _zeros(CL2, BLOCK, COLS)
        b2 = _zeros(CL2, BLOCK, COLS)
        b1, b2 = _part_acc(x2_ptr, n, ns2, ss2, S, lo2, cn2, p, b1, b2, CL2, VEC, BLOCK, COLS)
        s1 = _total(a1, CL1) + _total(b1, CL2)
        s2 = _total(a2, CL1) + _total(b2, CL2)
    cnt = tl.cast(CG * S, tl.float32)  # (a Python int when the JIT makes CG and S 1)
    md = s1 / cnt
    var = tl.maximum(s2 / cnt - md * md, 0.0)
    mean = p + md
    rstd = 1.0 / tl.sqrt(var + eps)

    xt = x_ptr.dtype.element_ty
    j = tl.arange(0, 128)   # scale/shift written 128 channels at a time
    for cb in range(0, CG, 128):
        m = cb + j < CG
        c = c0 + cb + j
        sc = rstd * _param(w_ptr, w_kind, c, m, 1.0, xt)
        sh = _param(b_ptr, b_kind, c, m, 0.0, xt) - mean * sc
        out = n.to(tl.int64) * C + c
        tl.store(scale_ptr + out, sc, mask=m)
        tl.store(shift_ptr + out, sh, mask=m)


# weight, bias: either dtype the op accepts, read per *_kind; the signature names one type.
_SMALL = "*fp32"


def _config(dtype, cl1, cl2, vec):
    """The configuration of a call: x's dtype, the inputs' layouts (channels-last or planar),
    VEC (16 // itemsize, or 1). Prebuilt, it assumes 16-byte aligned x, x2 and outputs."""
    t = "*" + _TL_DTYPES[dtype]
    return {"fn": group_norm_scale_shift, "num_warps": NUM_WARPS, "num_stages": 1,
            "signature": {"x_ptr": t, "x2_ptr": t, "w_ptr": _SMALL, "b_ptr": _SMALL,
                          "scale_ptr": "*fp32", "shift_ptr": "*fp32", "S": "i32", "C": "i32",
                          "C1": "i32", "G": "i32", "CG": "i32", "ns1": "i64", "ss1": "i64",
                          "ns2": "i64", "ss2": "i64", "eps": "fp32", "w_kind": "i32",
                          "b_kind": "i32"},
            "constexprs": {"CL1": int(cl1), "CL2": int(cl2), "VEC": vec, "BLOCK": BLOCK,
                           "COLS": COLS},
            "aligned": ("x_ptr", "x2_ptr", "scale_ptr", "shift_ptr")}


def prebuilt_configs():
    """Per dtype: both inputs planar or both channels-last (x2 absent: x's), 16-byte rows or
    not. x and x2 in different layouts run on the JIT (the C++ plan says why)."""
    return [_config(dt, cl, cl, vec) for dt in _TL_DTYPES for cl in (False, True)
            for vec in (16 // dt.itemsize, 1)]


def _spatial(t):
    s = 1
    for d in t.shape[2:]:
        s *= d
    return s


def walk_of(t):
    """(cl, ns, cs, ss): element (n, c, s) of t at n * ns + c * cs + s * ss, s the flattened
    spatial index; planar (cl False: ss == 1, cs == S) or channels-last (cs == 1); None when t
    is neither. csrc/group_norm_scale_shift.cpp's walk_of, which the op checks with."""
    C, S = t.shape[1], _spatial(t)
    if t.numel() == 0:
        return False, 0, S, 1
    ss = expected = 0
    for d in range(t.dim() - 1, 1, -1):
        if t.shape[d] == 1:
            continue
        if ss == 0:
            ss = expected = t.stride(d)
        elif t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    if S == 1:
        ss = 1
    cs = (S if ss == 1 else 1) if C == 1 else t.stride(1)
    if ss == 1 and cs == S:
        return False, t.stride(0), cs, 1
    if cs == 1:
        return True, t.stride(0), 1, ss
    return None


def _kind(t):
    return 0 if t is None else 1 if t.dtype == torch.float32 else 2


def plan(x, num_groups, weight=None, bias=None, eps=1e-5, x2=None):
    """The launch of a call, [(config, grid, args)], and the outputs (scale, shift). Arguments
    as the schema's, checked by the C++ op."""
    N, C1 = x.shape[0], x.shape[1]
    C = C1 + (0 if x2 is None else x2.shape[1])
    scale = torch.empty((N, C), dtype=torch.float32, device=x.device)
    shift = torch.empty((N, C), dtype=torch.float32, device=x.device)
    subject = x2 if x.numel() == 0 and x2 is not None else x
    if subject.numel() == 0:
        return [], (scale, shift)
    G = num_groups
    cg, S = C // G, _spatial(x)
    if cg * S >= 2**31 or N * G >= 2**31 or C >= 2**31:
        raise ValueError(f"fastdiff.group_norm_scale_shift: a group of C/G * S = {cg * S} "
                         f"elements (or N * G = {N * G} groups) is beyond the CUDA kernel's "
                         "32-bit sizes")
    w1 = walk_of(x)
    w2 = w1 if x2 is None or x2.numel() == 0 else walk_of(x2)   # (empty: never read)
    v16 = 16 // x.element_size()

    def vec_ok(w):
        return w[1] % v16 == 0 and (w[3] if w[0] else S) % v16 == 0

    aligned = (vec_ok(w1) and (x2 is None or vec_ok(w2))
               and (not (w1[0] or (x2 is not None and w2[0])) or (cg % v16 == 0
                                                                and C1 % v16 == 0)))
    cfg = _config(x.dtype, w1[0], w2[0], v16 if aligned else 1)
    # Absent x2: x stands in (C1 = C: never read); absent weight/bias: x (kind 0: never read).
    args = [x, x if x2 is None else x2, x if weight is None else weight,
            x if bias is None else bias, scale, shift, S, C, C1, G, cg, w1[1], w1[3], w2[1],
            w2[3], float(eps), _kind(weight), _kind(bias)]
    return [(cfg, (N * G, 1, 1), args)], (scale, shift)
