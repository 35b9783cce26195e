"""Triton flash-attention forward for fastdiff::attention.

One program per (block of BLOCK_M query rows, batch x head). Keys are walked in blocks of
BLOCK_N: S = Q K^T on tensor cores (tl.dot, fp32 accumulation), the bias added through its
strides (stride 0 broadcasts, so a (B, 1, 1, Lk) key-padding mask costs one row load), and an
online softmax in base 2 rescales the running output. The head dim is padded to a power of two
and masked, so D = 40, 80, 160 work without copies. fp32 inputs use IEEE dots: TF32 would not
meet the tests' bound of 2x torch's own fp32 error.
"""
import math

import torch
import triton
import triton.language as tl

from . import pointers, run, variant

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr,
                      sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                      sbb, sbh, sbm, sbn, H, Lq, Lk, D, qk_scale,
                      HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    m_mask = rm < Lq
    d_mask = rd < D
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + rm[:, None] * sqm + rd[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * skb + h * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h * svh
    bias_base = bias_ptr + b.to(tl.int64) * sbb + h * sbh + rm[:, None] * sbm

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        cols = n0 + rn
        n_mask = cols < Lk
        k = tl.load(k_base + cols[:, None] * skn + rd[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale                                  # scale * log2(e): base-2 softmax
        if HAS_BIAS:
            s += tl.load(bias_base + cols[None, :] * sbn,
                         mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows whose keys are all -inf so far: subtract 0 so that exp2 stays finite (gives 0).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * svn + rd[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o = o_ptr + bh.to(tl.int64) * Lq * D + rm[:, None] * D + rd[None, :]
    tl.store(o, out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim, for 2-byte inputs. fp32 tiles
# take twice the shared memory: fp32 halves BLOCK_M, BLOCK_N too from D = 128 on, and pipelines
# at most 2 stages (1 at D = 256), to stay within the 99 KB a block may use on sm_86/sm_89
# (tests/test_aot.py checks every configuration; sm_80 allows 163 KB).
_TILES = {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 2),
          256: (64, 32, 8, 2)}


def _config(dtype, D, has_bias):
    """The one place that maps a call to a compiled configuration (also listed by aot_configs)."""
    block_d = max(16, triton.next_power_of_2(D))
    bm, bn, warps, stages = _TILES[block_d]
    if dtype == torch.float32:
        bm = min(bm, 64)
        bn = bn // 2 if block_d >= 128 else bn
        stages = 1 if block_d == 256 else min(stages, 2)
    t = "*" + _TL_DTYPES[dtype]
    strides = {n: "i64" for n in ("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn",
                                  "sbb", "sbh", "sbm", "sbn")}
    signature = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "bias_ptr": "*fp32" if has_bias else t,
                 "o_ptr": t, **strides, "H": "i32", "Lq": "i32", "Lk": "i32", "D": "i32",
                 "qk_scale": "fp32"}
    constexprs = {"HAS_BIAS": has_bias, "IEEE": dtype == torch.float32, "BLOCK_M": bm,
                  "BLOCK_N": bn, "BLOCK_D": block_d}
    cfg = {"fn": _attention_kernel, "signature": signature, "constexprs": constexprs,
           "num_warps": warps, "num_stages": stages}
    # Prebuilt: aligned q/k/v rows (every stride a multiple of 16, e.g. head dims 64, 80, 160
    # in (B, L, H*D) layouts), the JIT's vectorized loads; the bias strides vary with masks.
    return variant(cfg, pointers(cfg) + _QKV_STRIDES)


_QKV_STRIDES = ("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn")


def aot_configs():
    """Every configuration the launcher can choose, each also assuming aligned pointers only."""
    return [v for dt in _TL_DTYPES for d in _TILES for hb in (False, True)
            for c in [_config(dt, d, hb)] for v in (c, variant(c, pointers(c)))]


def plan(q, k, v, attn_bias, scale):
    """The launch of a call, [(config, grid, args)], and the output; inputs non-empty."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    if D == 1:  # a head dim of 1 may carry any stride; the kernel assumes unit stride
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cfg = _config(q.dtype, D, attn_bias is not None)
    if attn_bias is not None:
        bias = attn_bias.to(torch.float32).expand(B, H, Lq, Lk)
        bstrides = bias.stride()
    else:
        bias, bstrides = q, (0, 0, 0, 0)
    s = scale if scale is not None else 1.0 / math.sqrt(D)
    grid = (triton.cdiv(Lq, cfg["constexprs"]["BLOCK_M"]), B * H, 1)
    args = [q, k, v, bias, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), v.stride(0), v.stride(1), v.stride(2), *bstrides, H, Lq, Lk, D,
            float(s) * LOG2E]
    return [(cfg, grid, args)], out


def attention(q, k, v, attn_bias, scale):
    """Launch on checked inputs (csrc/ops.cpp): q (B, H, Lq, D), k/v (B, H, Lk, D)."""
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    launches, out = plan(q, k, v, attn_bias, scale)
    for cfg, grid, args in launches:
        run(cfg, grid, args)
    return out
