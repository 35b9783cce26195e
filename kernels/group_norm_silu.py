"""Triton kernels for fastdiff::group_norm_silu.

Two launches. ``group_norm_silu_stats`` splits every (n, group) into chunks so that a GPU is
filled even when N * G is small (2 x 32 = 64 groups against 132 SMs): each program reduces one
chunk, tile by tile, exactly (mean, then squared deviations of the tile held in registers, in
the corrected two-pass form) and merges tiles with Chan's formula, all on x minus the group's
first value, so that a large mean with a small spread (or none) keeps its digits in fp32;
``group_norm_silu_apply`` merges a group's chunk partials the same way and writes
``silu((x + pre - mean) * rstd * w + b) * (1 + scale) + shift`` for its chunk.

A group is walked in rows of COLS elements that are contiguous in memory: NCHW rows are COLS
pixels of one channel, channels_last rows COLS channels of one pixel; a tile is ROWS such rows.
Row starts are computed once per row (no division per element), and the planner passes VEC, the
elements per 16 bytes when H*W (NCHW) or C/G (channels_last) is a multiple of it, else 1: every
row then starts on a VEC boundary and x is read, y written, in 16-byte accesses. weight, bias,
pre_bias, scale and shift are read in their own dtype (float32 or x's, a runtime ``*_kind``
each; 0 = absent), so a call launches these two kernels and nothing else.

``channels_last_out`` with an NCHW x (``Y_CL``, apply only): x is walked and read as NCHW (its
16-byte loads kept), and each value is stored at its channels_last place in y, one element per
store (a row of 16 pixels of one channel is 16 pixels apart in y).

``RES`` (apply only; fastdiff::group_norm_silu_residual, ``plan_residual``): the kernel also
stores r = x + residual_bias[c] (float32 add) at x's own offsets, in x's dtype: 16-byte stores
wherever x's loads are 16 bytes wide.
"""
import torch
import triton
import triton.language as tl

MAX_SPLIT = 32          # chunks per group: enough programs to fill a GPU, few partials to merge
NUM_WARPS = 4
# (ROWS, COLS) of a tile, 1024 elements, for NCHW and channels_last: NCHW rows of 16 pixels
# (H*W = 16, 64, 144, 4096, ... fill them), channels_last rows of 8 channels (C/G = 8, 16, 40
# fill them; 10 and 20 fill 5/8).
TILE = ((64, 16), (128, 8))
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _param(ptr, kind, idx, mask, default, X_DTYPE: tl.constexpr):
    """A per-channel value in fp32, read from float32 (kind 1) or x's dtype (kind 2), or
    ``default`` where the tensor is absent (kind 0). A branch, not two masked loads: only one
    set of addresses is live (fewer registers)."""
    if kind == 2:
        v = tl.load(ptr.to(tl.pointer_type(X_DTYPE), bitcast=True) + idx, mask=mask,
                    other=default).to(tl.float32)
    else:
        v = tl.load(ptr.to(tl.pointer_type(tl.float32), bitcast=True) + idx,
                    mask=mask & (kind == 1), other=default)
    return v


@triton.jit
def _tile(x_ptr, pre_ptr, pre_kind, tile, n, g, HW, C, CG,
          CL: tl.constexpr, HAS_PRE: tl.constexpr, VEC: tl.constexpr, ROWS: tl.constexpr,
          COLS: tl.constexpr):
    """Tile ``tile`` of group (n, g): x (+ pre_bias) in fp32 [ROWS, COLS], the memory offsets,
    the channels (per row for NCHW, per element for channels_last), the mask and the mask of
    the channels' shape."""
    # Sizes are 32-bit (rows per group < 2**31: plan() checks), memory offsets 64-bit.
    j = tile * ROWS + tl.arange(0, ROWS)   # rows of the group, in memory order
    col = tl.arange(0, COLS)
    # VEC divides every row start, every row's length and the group's start (the planner's
    # guarantee; Triton cannot derive it from runtime sizes).
    if CL:
        per = tl.cdiv(CG, COLS)            # rows per pixel
        p = j // per
        c0 = (j - p * per) * COLS          # the row's first channel within the group
        nrows = HW * per
        start = tl.multiple_of(p.to(tl.int64) * C + c0, VEC)
        length = tl.multiple_of(CG - c0, VEC)
        base = tl.multiple_of(n.to(tl.int64) * HW * C + g * CG, VEC)
    else:
        per = tl.cdiv(HW, COLS)            # rows per channel
        ch = j // per
        p0 = (j - ch * per) * COLS         # the row's first pixel
        nrows = CG * per
        start = tl.multiple_of(ch.to(tl.int64) * HW + p0, VEC)
        length = tl.multiple_of(HW - p0, VEC)
        base = tl.multiple_of((n.to(tl.int64) * C + g * CG) * HW, VEC)
    rmask = (j < nrows)[:, None]
    mask = rmask & (col[None, :] < length[:, None])
    off = base + start[:, None] + col[None, :]
    if CL:
        c = g * CG + c0[:, None] + col[None, :]
        cmask = mask
    else:
        c = (g * CG + ch)[:, None]
        cmask = rmask
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:  # masked-off elements stay 0 (the statistics sum whole tiles)
        v = tl.where(mask, v + _param(pre_ptr, pre_kind, n * C + c, cmask, 0.0,
                                      x_ptr.dtype.element_ty), 0.0)
    return v, off, c, mask, cmask


@triton.jit
def _nchw_to_cl(tile, n, HW, C, CG, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The channels_last offsets of an NCHW tile's elements (as ``_tile`` walks them)."""
    j = tile * ROWS + tl.arange(0, ROWS)
    per = tl.cdiv(HW, COLS)
    ch = j // per
    p = ((j - ch * per) * COLS)[:, None] + tl.arange(0, COLS)[None, :]
    return (n.to(tl.int64) * HW + p) * C + ch[:, None]


@triton.jit
def _shift(x_ptr, pre_ptr, pre_kind, n, g, HW, C, CG, CL: tl.constexpr, HAS_PRE: tl.constexpr):
    """The group's first value (x + pre_bias), fp32: both kernels work on x minus it, so that a
    group with a large mean and a small spread (or none) keeps its digits in fp32 sums."""
    if CL:
        base = n.to(tl.int64) * HW * C + g * CG
    else:
        base = (n.to(tl.int64) * C + g * CG) * HW
    k = tl.load(x_ptr + base).to(tl.float32)
    if HAS_PRE:
        k += _param(pre_ptr, pre_kind, n * C + g * CG, True, 0.0, x_ptr.dtype.element_ty)
    return k


@triton.jit
def _tiles(HW, CG, CL: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The number of tiles of a group."""
    if CL:
        return tl.cdiv(HW * tl.cdiv(CG, COLS), ROWS)
    return tl.cdiv(CG * tl.cdiv(HW, COLS), ROWS)


@triton.jit
def group_norm_silu_stats(x_ptr, pre_ptr, part_ptr, HW, C, G, CG, chunk, split, pre_kind,
                          CL: tl.constexpr, HAS_PRE: tl.constexpr, VEC: tl.constexpr,
                          ROWS: tl.constexpr, COLS: tl.constexpr):
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng % G
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    shift = _shift(x_ptr, pre_ptr, pre_kind, n, g, HW, C, CG, CL, HAS_PRE)
    first = s * chunk
    for tile in range(first, tl.minimum(first + chunk, _tiles(HW, CG, CL, ROWS, COLS))):
        v, off, c, mask, cmask = _tile(x_ptr, pre_ptr, pre_kind, tile, n, g, HW, C, CG, CL,
                                       HAS_PRE, VEC, ROWS, COLS)
        v = tl.where(mask, v - shift, 0.0)
        k = tl.sum(mask.to(tl.float32))
        k_safe = tl.maximum(k, 1.0)
        tmean = tl.sum(v) / k_safe
        # Corrected two-pass: what the rounded tile mean left over refines it and M2.
        d = tl.where(mask, v - tmean, 0.0)
        dsum = tl.sum(d)
        tm2 = tl.maximum(tl.sum(d * d) - dsum * dsum / k_safe, 0.0)
        tmean += dsum / k_safe
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
def group_norm_silu_apply(x_ptr, y_ptr, r_ptr, rb_ptr, w_ptr, b_ptr, pre_ptr, scale_ptr,
                          shift_ptr, part_ptr, HW, C, G, CG, chunk, split, eps, w_kind, b_kind,
                          pre_kind, scale_kind, shift_kind, CL: tl.constexpr,
                          Y_CL: tl.constexpr, HAS_PRE: tl.constexpr, HAS_SS: tl.constexpr,
                          SILU: tl.constexpr, RES: tl.constexpr, SPLIT_P2: tl.constexpr,
                          VEC: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
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
    shift = _shift(x_ptr, pre_ptr, pre_kind, n, g, HW, C, CG, CL, HAS_PRE)

    xt = x_ptr.dtype.element_ty
    first = s * chunk
    for tile in range(first, tl.minimum(first + chunk, _tiles(HW, CG, CL, ROWS, COLS))):
        v, off, c, mask, cmask = _tile(x_ptr, pre_ptr, pre_kind, tile, n, g, HW, C, CG, CL,
                                       HAS_PRE, VEC, ROWS, COLS)
        if RES:  # r = x + rb[c] where x was read (x's layout: its 16-byte stores); no pre_bias
            r = v + tl.load(rb_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            tl.store(r_ptr + off, r.to(r_ptr.dtype.element_ty), mask=mask)
        a = rstd * _param(w_ptr, w_kind, c, cmask, 1.0, xt)
        y = ((v - shift) - mean) * a + _param(b_ptr, b_kind, c, cmask, 0.0, xt)
        if HAS_SS:
            y = y * (1.0 + _param(scale_ptr, scale_kind, n * C + c, cmask, 0.0, xt)) \
                + _param(shift_ptr, shift_kind, n * C + c, cmask, 0.0, xt)
        if SILU:
            y = y * tl.sigmoid(y)
        if Y_CL:  # x NCHW (CL False), y channels_last; c is the row's channel (+ g * CG)
            off = _nchw_to_cl(tile, n, HW, C, CG, ROWS, COLS) + g * CG
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


# 32-bit sizes, as Triton's JIT types them (and without 64-bit divisions, whose library calls
# made ptxas spill); a size beyond 32 bits takes the JIT, which compiles a 64-bit variant.
_COMMON = {"HW": "i32", "C": "i32", "G": "i32", "CG": "i32", "chunk": "i32", "split": "i32"}
# weight, bias, pre_bias, scale, shift: any dtype the op accepts, read per their *_kind; the
# prebuilt signature names one pointer type for them (a pointer is an address either way).
_SMALL = "*fp32"


def _configs(dtype, cl, has_pre, has_ss, silu, aligned=True, y_cl=False, res=False):
    """The (stats, apply) configurations for one call; the launcher uses nothing else.

    ``y_cl``: y channels_last while x is NCHW (``cl`` False; channels_last_out).
    ``res``: the apply kernel also writes r = x + residual_bias[c] in x's layout
    (group_norm_silu_residual; r_ptr and rb_ptr are x otherwise, never read or written).

    ``aligned``: rows start 16 bytes apart or more (VEC = elements per 16 bytes), the common
    case (H*W a multiple of 8 in NCHW, C/G in channels_last); else VEC = 1. Prebuilt, both
    assume 16-byte aligned x, y and partials (the JIT specializes them as it finds them)."""
    t = "*" + _TL_DTYPES[dtype]
    rows, cols = TILE[cl]
    shape = {"VEC": 16 // dtype.itemsize if aligned else 1, "ROWS": rows, "COLS": cols}
    stats = {"fn": group_norm_silu_stats, "num_warps": NUM_WARPS, "num_stages": 1,
             "signature": {"x_ptr": t, "pre_ptr": _SMALL, "part_ptr": "*fp32", **_COMMON,
                           "pre_kind": "i32"},
             "constexprs": {"CL": cl, "HAS_PRE": has_pre, **shape},
             "aligned": ("x_ptr", "part_ptr")}
    apply = {"fn": group_norm_silu_apply, "num_warps": NUM_WARPS, "num_stages": 1,
             "signature": {"x_ptr": t, "y_ptr": t, "r_ptr": t, "rb_ptr": t, "w_ptr": _SMALL,
                           "b_ptr": _SMALL, "pre_ptr": _SMALL, "scale_ptr": _SMALL,
                           "shift_ptr": _SMALL, "part_ptr": "*fp32", **_COMMON, "eps": "fp32",
                           "w_kind": "i32", "b_kind": "i32", "pre_kind": "i32",
                           "scale_kind": "i32", "shift_kind": "i32"},
             "constexprs": {"CL": cl, "Y_CL": y_cl, "HAS_PRE": has_pre, "HAS_SS": has_ss,
                            "SILU": silu, "RES": res, "SPLIT_P2": MAX_SPLIT, **shape},
             # rb_ptr, a (C,) tensor, may be any element of a larger one: never assumed aligned
             "aligned": ("x_ptr", "y_ptr", "part_ptr") + (("r_ptr",) if res else ())}
    return stats, apply


def prebuilt_configs():
    """Every configuration the launcher can choose (stats kernels listed once each)."""
    out = {}
    for dt in _TL_DTYPES:
        for cl in (False, True):
            for pre in (False, True):
                for aligned in (True, False):
                    for ss in (False, True):
                        for silu in (False, True):
                            stats, apply = _configs(dt, cl, pre, ss, silu, aligned)
                            out[("stats", dt, cl, pre, aligned)] = stats
                            out[("apply", dt, cl, pre, aligned, ss, silu, False)] = apply
        # NCHW in, channels_last out: what SD1.5's transformer norms (GroupNorm before a 1x1
        # proj_in, no SiLU, no fusions, H*W a multiple of 8) need; other mixed calls take the JIT.
        for stats, apply in [_configs(dt, False, False, False, False, True, True)]:
            out[("stats", dt, False, False, True)] = stats
            out[("apply", dt, False, False, True, False, False, True)] = apply
        # The same with r = x + residual_bias (group_norm_silu_residual): SD1.5's transformer
        # norm, whose r the transformer's proj_out then accumulates into (one baddbmm_).
        stats, apply = _configs(dt, False, False, False, False, True, True, True)
        out[("apply", dt, False, False, True, False, False, True, "res")] = apply
    return list(out.values())


def _kind(t):
    """How the kernels read an optional per-channel tensor: 0 absent, 1 float32, 2 x's dtype."""
    return 0 if t is None else 1 if t.dtype == torch.float32 else 2


def _y_cl(x, channels_last_out):
    """y channels_last while x is NCHW. (A tensor with C == 1 or H*W == 1 is both: its elements
    sit at the same places either way, so it is not mixed.)"""
    return bool(channels_last_out) and x.is_contiguous() and not x.is_contiguous(
        memory_format=torch.channels_last)


def plan(x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu,
         channels_last_out=False):
    """The two launches of a call, [(config, grid, args)], and the output."""
    return _plan(x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu,
                 channels_last_out, None)


def plan_residual(x, num_groups, weight, bias, eps, residual_bias, apply_silu=True,
                  channels_last_out=False):
    """group_norm_silu_residual's launches (kernels/group_norm_silu_residual.py runs this): the
    same two, the apply kernel also writing r = x + residual_bias; the outputs (y, r)."""
    return _plan(x, num_groups, weight, bias, eps, None, None, None, apply_silu,
                 channels_last_out, residual_bias)


def _plan(x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu,
          channels_last_out, residual_bias):
    N, C, H, W = x.shape
    y = (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
         if channels_last_out else torch.empty_like(x))
    res = residual_bias is not None
    # r in x's memory format (x is dense: NCHW or channels_last, the op checked it).
    r = torch.empty_like(x) if res else None
    outputs = (y, r) if res else y
    if x.numel() == 0:
        return [], outputs
    HW, G = H * W, num_groups
    cg = C // G
    cl = not x.is_contiguous()
    rows, cols = TILE[cl]
    nrows = HW * triton.cdiv(cg, cols) if cl else cg * triton.cdiv(HW, cols)
    if nrows >= 2**31:
        raise ValueError(f"fastdiff.group_norm_silu: a group of C/G * H * W = {cg * HW} "
                         f"elements is beyond the CUDA kernels' {2**31} rows of {cols}")
    tiles = triton.cdiv(nrows, rows)
    split = min(MAX_SPLIT, tiles)
    chunk = triton.cdiv(tiles, split)      # tiles per program
    split = triton.cdiv(tiles, chunk)
    part = torch.empty((N * G, split, 3), dtype=torch.float32, device=x.device)
    aligned = (cg if cl else HW) % (16 // x.element_size()) == 0
    has_ss = scale is not None or shift is not None
    stats, apply = _configs(x.dtype, cl, pre_bias is not None, has_ss, bool(apply_silu), aligned,
                            _y_cl(x, channels_last_out), res)
    # Absent tensors: x stands in (kind 0: never read), so the argument types stay the same.
    w, b, pre, sc, sh = (x if t is None else t for t in (weight, bias, pre_bias, scale, shift))
    grid = (N * G, split, 1)
    common = [HW, C, G, cg, chunk, split]
    return [(stats, grid, [x, pre, part, *common, _kind(pre_bias)]),
            (apply, grid, [x, y, r if res else x, residual_bias if res else x, w, b, pre, sc, sh,
                           part, *common, float(eps), _kind(weight), _kind(bias),
                           _kind(pre_bias), _kind(scale), _kind(shift)])], outputs

