"""Triton flash-attention forward for fastdiff::attention.

One program per (block of BLOCK_M query rows, batch x head), all on grid axis 0 (up to 2**31 - 1
programs; axis 1 would cap B * H at 65,535), the query blocks of one head adjacent so that they
share its K and V in L2. Keys are walked in blocks of BLOCK_N: S = Q K^T on tensor cores (tl.dot,
fp32 accumulation), the bias added in its own dtype through its strides (stride 0 broadcasts, so
a (B, 1, 1, Lk) key-padding mask costs one row load), and an online softmax in base 2 rescales
the running output. The head dim D is a compile-time constant: the tile is padded to the next
power of two and masked only where D is not one, so D = 40, 80, 160 work without copies. The
planner passes VEC, a power of two of elements dividing every q/k/v stride the offsets multiply
(16 bytes' worth wherever the layout allows: (B, H, L, D) contiguous and (B, L, H*D) views at
D = 40, 64, 80, ...), so that Q/K/V are read in 16-byte loads (LDG.128, or LDGSTS where the
loads are pipelined). fp32 inputs use IEEE dots: TF32 would not meet the tests' bound of 2x
torch's own fp32 error.
"""
import math

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
LOG2E = 1.4426950408889634


@triton.jit
def attention_fwd(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                  sbb, sbh, sbm, sbn, H, Lq, Lk, qk_scale,
                  D: tl.constexpr, VEC: tl.constexpr, HAS_BIAS: tl.constexpr,
                  IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    pid_m = pid - bh * num_m
    b = bh // H
    h = bh - b * H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    m_mask = rm < Lq
    if D == BLOCK_D:  # no head-dim mask: nothing limits the load width
        q_mask = m_mask[:, None]
    else:
        q_mask = m_mask[:, None] & (rd < D)[None, :]
    # The planner's guarantee (VEC divides the strides; size-1 dims are indexed at 0 only) makes
    # every row start a multiple of VEC elements: Triton cannot know it from runtime strides.
    q_rows = tl.multiple_of(b.to(tl.int64) * sqb + h * sqh + rm * sqm, VEC)
    q = tl.load(q_ptr + q_rows[:, None] + rd[None, :], mask=q_mask, other=0.0)
    k_base = k_ptr + tl.multiple_of(b.to(tl.int64) * skb + h * skh, VEC)
    v_base = v_ptr + tl.multiple_of(b.to(tl.int64) * svb + h * svh, VEC)
    bias_base = bias_ptr + b.to(tl.int64) * sbb + h * sbh + rm[:, None] * sbm

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        cols = n0 + rn
        n_mask = cols < Lk
        if D == BLOCK_D:
            kv_mask = n_mask[:, None]
        else:
            kv_mask = n_mask[:, None] & (rd < D)[None, :]
        k_rows = tl.multiple_of(cols.to(tl.int64) * skn, VEC)
        k = tl.load(k_base + k_rows[:, None] + rd[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale                                  # scale * log2(e): base-2 softmax
        if HAS_BIAS:
            bias = tl.load(bias_base + cols[None, :] * sbn,
                           mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows whose keys are all -inf so far: subtract 0 so that exp2 stays finite (gives 0).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_rows = tl.multiple_of(cols.to(tl.int64) * svn, VEC)
        v = tl.load(v_base + v_rows[:, None] + rd[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o = o_ptr + bh.to(tl.int64) * Lq * D + rm[:, None] * D + rd[None, :]
    tl.store(o, out.to(o_ptr.dtype.element_ty), mask=q_mask)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kind of call (2-byte inputs without a bias, with
# one; fp32 inputs, with or without) and padded head dim BLOCK_D (16, 32, 64, 128, 256), chosen
# so that no configuration spills registers on sm_80 or sm_90, Q/K/V tiles give every
# thread 16 bytes or more to load, and every one fits the 99 KB of shared memory a block may use
# on sm_86/sm_89 (tests/test_prebuild.py checks all three in the compiled code). 2-byte inputs: 8
# warps hold the 16-byte Q loads and the pipelined K/V tiles without spills (4 at D <= 16, where
# 8 would leave 8 bytes per thread). With a bias the pipeline stages its tile in shared memory
# too (fp32: 32 KB per 128 x 64 tile and stage) and holds an address per element: BLOCK_N 32
# from D = 64 on, 2 stages below. fp32: IEEE dots run on FMA units with their operands in
# registers, hence smaller tiles (at D = 256, BLOCK_M 32: 64 left a 6.6 KB stack on sm_90).
# Measured on an H200 (benchmarks/tune.py, 2026-11-30, fp16, 2 x 8 heads, no bias): at D = 80,
# L = 1024, 3 stages instead of 2 at BLOCK_D 128 took 35.8 us to 28.7 us (96 KB of shared
# memory on sm_80: under the 99 KB). At D = 160, L = 256, (64, 32, 4 warps, 3 stages) took
# 23.6 us to 13.9 us on sm_90 but needs 100 KB and spills on sm_80: a per-architecture tile
# table is left to do. At D = 40 the tiles here were the grid's best (199 us; SDPA 163 us).
TILES = (((128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3), (64, 32, 8, 2)),
         ((128, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 8, 2)),
         ((64, 64, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 2), (32, 16, 8, 1)))

# Head dims compiled into the wheel (each one configuration per dtype and bias dtype); any
# other D in [1, 256] runs on the Triton JIT. 40/80/160: SD 1.x (8 heads on 320/640/1280
# channels); 64: SD 2.x and SDXL; 72: DiT-XL (1152 channels, 16 heads); 48/96/128: 8 heads on
# 384/768/1024 channels; 256: DDPM-CIFAR10's single head; 8/16/32: small U-Nets (fastdiff's
# own models use 32). All are multiples of 8, so every (B, H, L, D) or (B, L, H*D) layout has
# 16-byte rows: only the VEC of 16 bytes is prebuilt.
PREBUILT_HEAD_DIMS = (8, 16, 32, 40, 48, 64, 72, 80, 96, 128, 160, 256)


def vec_of(dtype, *tensors):
    """VEC: the largest power of two of elements, at most 16 bytes' worth, dividing every stride
    of dims 0-2 of ``tensors`` that the kernel multiplies by a nonzero index (size > 1)."""
    vec = 16 // dtype.itemsize
    for t in tensors:
        for d in range(3):
            if t.shape[d] > 1:
                vec = math.gcd(vec, t.stride(d))
    return vec


def _config(dtype, D, bias_dtype=None, vec=None):
    """The one place that maps a call to a compiled configuration (prebuilt_configs lists those of
    PREBUILT_HEAD_DIMS): q/k/v dtype, head dim, bias dtype (None: no bias) and VEC (default:
    16 bytes' worth, what every prebuilt configuration assumes)."""
    block_d = max(16, triton.next_power_of_2(D))
    kind = 2 if dtype == torch.float32 else int(bias_dtype is not None)
    bm, bn, warps, stages = TILES[kind][block_d.bit_length() - 5]
    t = "*" + _TL_DTYPES[dtype]
    strides = {n: "i64" for n in ("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn",
                                  "sbb", "sbh", "sbm", "sbn")}
    signature = {"q_ptr": t, "k_ptr": t, "v_ptr": t,
                 "bias_ptr": t if bias_dtype is None else "*" + _TL_DTYPES[bias_dtype],
                 "o_ptr": t, **strides, "H": "i32", "Lq": "i32", "Lk": "i32", "qk_scale": "fp32"}
    constexprs = {"D": D, "VEC": 16 // dtype.itemsize if vec is None else vec,
                  "HAS_BIAS": bias_dtype is not None, "IEEE": dtype == torch.float32,
                  "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d}
    # Prebuilt: 16-byte aligned q/k/v/o (the bias is read element by element; its pointer may
    # be anything), as Triton's JIT specializes them.
    return {"fn": attention_fwd, "signature": signature, "constexprs": constexprs,
            "num_warps": warps, "num_stages": stages,
            "aligned": ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}


def prebuilt_configs():
    """Every prebuilt configuration: dtype x PREBUILT_HEAD_DIMS x bias (none, q's dtype, fp32)."""
    return [_config(dt, d, b) for dt in _TL_DTYPES for d in PREBUILT_HEAD_DIMS
            for b in dict.fromkeys((None, dt, torch.float32))]


def plan(q, k, v, attn_mask, scale):
    """The launch of a call, [(config, grid, args)], and the output."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return [], out
    cfg = _config(q.dtype, D, None if attn_mask is None else attn_mask.dtype,
                  vec_of(q.dtype, q, k, v))
    if attn_mask is not None:  # a view: broadcast dims get stride 0; read in its own dtype
        bias = attn_mask.expand(B, H, Lq, Lk)
        bstrides = bias.stride()
    else:
        bias, bstrides = q, (0, 0, 0, 0)
    s = scale if scale is not None else 1.0 / math.sqrt(D)
    grid = (B * H * triton.cdiv(Lq, cfg["constexprs"]["BLOCK_M"]), 1, 1)
    args = [q, k, v, bias, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), v.stride(0), v.stride(1), v.stride(2), *bstrides, H, Lq, Lk,
            float(s) * LOG2E]
    return [(cfg, grid, args)], out

