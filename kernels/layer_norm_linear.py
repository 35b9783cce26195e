"""Triton kernel for fastdiff::layer_norm_linear: a LayerNorm folded into the GEMM that reads it.

x: (..., K); weight: (N, K), W' = W * gamma[None, :] (nn.Linear's weight with the LayerNorm's
weight folded in); fold: (3, N) float32, the rows colsum[n] = sum_k W'[n, k], d[n] = sum_k
W'[n, k] shift[k] and b'[n] = b[n] + sum_k W[n, k] beta[k]; shift: (K,) float32 or absent. Per
row of x, with h = x + shift:

    p = h[0],  mean = p + sum(h - p) / K,  var = max(sum((h - p)^2) / K - (mean - p)^2, 0),
    rstd = 1 / sqrt(var + eps),
    z[n] = rstd * (sum_k x[k] W'[n, k] + d[n] - mean * colsum[n]) + b'[n]

which is Linear(LayerNorm(h)): LN(h) W^T + b = rstd (h - mean) W'^T + (b + W beta), and
h W'^T = x W'^T + d. y = z, or with GEGLU y = z[:N/2] * gelu(z[N/2:]) (exact GELU; value columns
first, as diffusers' GEGLU and linear_geglu).

Eager runs the norm (a kernel reading x, writing the normalized copy) and then the GEMM reading
that copy back. Here the row sums of h - p and (h - p)^2 are taken from the same x tiles the
GEMM's K loop loads for tl.dot, beside the MMA (the shift's tile added first), so the
statistics cost no extra read of x (but one element a row, the pivot p) and the normalized
tensor never exists; the correction is in the epilogue. Sums around the row's first value keep
the one-pass variance's digits when the mean is large against the spread (fp32, K = 320: 3e-4
of |y| lost at a mean 50 sigmas out with sums of h, 2e-5 with the pivot, where what is left is
the epilogue's acc - mean * colsum); the CPU kernel sums around the same value.

The GEMM is linear_geglu's (Triton's matmul tutorial): [BLOCK_M, BLOCK_K] tiles of x, W read
row-major as W^T tiles (an index swap), fp32 accumulation (tensor cores for 16-bit inputs; fp32
inputs in IEEE fp32, no TF32), programs in groups of GROUP_M row tiles for L2 reuse, masks for
any M, N, K, 64-bit row offsets (M, N, K and the grid 32-bit: the planners check). GEGLU
(constexpr) keeps two accumulators, value columns n.. and gate columns N/2 + n..; HAS_SHIFT
(constexpr) adds the shift's sums (absent: the fold stands in for its pointer, never read).

Prebuilt: one configuration per dtype, GEGLU and HAS_SHIFT, compiled assuming K and N multiples
of 16 (16-byte tile loads: SD's widths); other shapes run on the JIT (the selection says why).
"""
import torch
import triton
import triton.language as tl

from . import variant
from .linear_geglu import grouped_tile

# 16-bit: 128 x BLOCK_N output tiles over 8 warps, K in steps of 32, three stages (as
# linear_geglu, whose GEGLU tiles these are): one fp32 accumulator of 128x128, or with GEGLU two
# of 128x64 (16384 values either way: 64 registers a thread), plus the row sums.
BLOCK_M = 128
BLOCK_N = 128
BLOCK_N_GEGLU = 64
BLOCK_K = 32
NUM_WARPS = 8
NUM_STAGES = 3
# fp32 (FFMA, no tensor cores at IEEE precision): 64x64 tiles over 8 warps, K in steps of 16.
BLOCK_M_FP32 = 64
BLOCK_N_FP32 = 64
BLOCK_K_FP32 = 16
NUM_WARPS_FP32 = 8
NUM_STAGES_FP32 = 3
# Row tiles per group of the program order (L2 reuse of W's tiles across a group).
GROUP_M = 8

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SQRT1_2 = tl.constexpr(0.7071067811865476)


@triton.jit
def layer_norm_linear(x_ptr, w_ptr, f_ptr, s_ptr, y_ptr, M, N, K, eps, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      GEGLU: tl.constexpr, HAS_SHIFT: tl.constexpr):
    if GEGLU:
        F = N // 2   # output columns
    else:
        F = N
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, F, BLOCK_M, BLOCK_N, GROUP_M)

    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < F
    # 64-bit row starts: x is M * K elements, W N * K (either may pass 2**31).
    k64 = tl.cast(K, tl.int64)  # K == 1 is a Python int (the JIT specializes 1)
    x_tile = x_ptr + rm.to(tl.int64)[:, None] * k64 + rk[None, :]       # [BLOCK_M, BLOCK_K]
    wv_tile = w_ptr + rn.to(tl.int64)[None, :] * k64 + rk[:, None]      # W'^T [BLOCK_K, BN]
    if GEGLU:
        wg_tile = wv_tile + tl.cast(F, tl.int64) * k64                  # the gate rows

    acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GEGLU:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The row statistics are sums of h - p, p = h's first element (x[r, 0] + shift[0]): a
    # row whose mean is large against its spread keeps its digits (the one-pass variance of
    # h itself lost ~15x more at a mean 50 sigmas out, ~150x at 500).
    piv = tl.load(x_ptr + rm.to(tl.int64) * k64, mask=m_ok, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        piv += tl.load(s_ptr).to(tl.float32)
    sum_d = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_dd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(x_tile, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        wv = tl.load(wv_tile, mask=w_mask, other=0.0)
        acc_v = tl.dot(a, wv, acc_v, input_precision="ieee")
        if GEGLU:
            wg = tl.load(wg_tile, mask=w_mask, other=0.0)
            acc_g = tl.dot(a, wg, acc_g, input_precision="ieee")
            wg_tile += BLOCK_K
        h = a.to(tl.float32)
        if HAS_SHIFT:
            h += tl.load(s_ptr + k0 + rk, mask=k_ok, other=0.0)[None, :]
        dev = tl.where(k_ok[None, :], h - piv[:, None], 0.0)
        sum_d += tl.sum(dev, axis=1)
        sum_dd += tl.sum(dev * dev, axis=1)
        x_tile += BLOCK_K
        wv_tile += BLOCK_K

    mean_d = sum_d / K
    mean = piv + mean_d
    var = tl.maximum(sum_dd / K - mean_d * mean_d, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)

    colsum = tl.load(f_ptr + rn, mask=n_ok, other=0.0)
    d = tl.load(f_ptr + N + rn, mask=n_ok, other=0.0)
    b = tl.load(f_ptr + 2 * N + rn, mask=n_ok, other=0.0)
    z = rstd[:, None] * (acc_v + d[None, :] - mean[:, None] * colsum[None, :]) + b[None, :]
    if GEGLU:
        colsum_g = tl.load(f_ptr + F + rn, mask=n_ok, other=0.0)
        d_g = tl.load(f_ptr + N + F + rn, mask=n_ok, other=0.0)
        b_g = tl.load(f_ptr + 2 * N + F + rn, mask=n_ok, other=0.0)
        g = rstd[:, None] * (acc_g + d_g[None, :] - mean[:, None] * colsum_g[None, :])
        g += b_g[None, :]
        z = z * (0.5 * g * (1.0 + tl.math.erf(g * _SQRT1_2)))
    y_tile = y_ptr + rm.to(tl.int64)[:, None] * F + rn[None, :]
    tl.store(y_tile, z.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _blocks(dtype, geglu):
    wide = dtype == torch.float32
    return {"BLOCK_M": BLOCK_M_FP32 if wide else BLOCK_M,
            "BLOCK_N": BLOCK_N_FP32 if wide else (BLOCK_N_GEGLU if geglu else BLOCK_N),
            "BLOCK_K": BLOCK_K_FP32 if wide else BLOCK_K}


def _config(dtype, geglu, has_shift):
    """The configuration a call runs with; prebuilt, it assumes 16-byte aligned pointers and K, N
    multiples of 16 (SD's widths)."""
    t = "*" + _TL_DTYPES[dtype]
    wide = dtype == torch.float32
    cx = {**_blocks(dtype, geglu), "GROUP_M": GROUP_M, "GEGLU": int(geglu),
          "HAS_SHIFT": int(has_shift)}
    cfg = {"fn": layer_norm_linear,
           "signature": {"x_ptr": t, "w_ptr": t, "f_ptr": "*fp32", "s_ptr": "*fp32", "y_ptr": t,
                         "M": "i32", "N": "i32", "K": "i32", "eps": "fp32"},
           "constexprs": cx, "num_warps": NUM_WARPS_FP32 if wide else NUM_WARPS,
           "num_stages": NUM_STAGES_FP32 if wide else NUM_STAGES}
    return variant(cfg, _POINTERS + ("N", "K"))


_POINTERS = ("x_ptr", "w_ptr", "f_ptr", "s_ptr", "y_ptr")


def prebuilt_configs():
    """Every configuration the launcher can choose, all assuming K and N multiples of 16: a call
    with other widths has no cubin and runs on the JIT (the selection names the parameter)."""
    return [_config(dt, geglu, shift) for dt in _TL_DTYPES for geglu in (False, True)
            for shift in (False, True)]


def grid_of(M, F, dtype, geglu):
    """Programs of a call: one per [BLOCK_M, BLOCK_N] tile of y (F: its columns)."""
    cx = _blocks(dtype, geglu)
    return triton.cdiv(M, cx["BLOCK_M"]) * triton.cdiv(F, cx["BLOCK_N"])


def plan(x, weight, fold, shift=None, eps=1e-5, geglu=False):
    """The launch of one call, [(config, grid, args)], and the output (..., N) or with GEGLU
    (..., N/2). Arguments as the schema's, checked by the C++ op."""
    N, K = weight.shape
    F = N // 2 if geglu else N
    y = x.new_empty((*x.shape[:-1], F))
    if y.numel() == 0:
        return [], y
    M = y.numel() // F
    programs = grid_of(M, F, x.dtype, geglu)
    if M >= 2**31 or N >= 2**31 or K >= 2**31 or programs >= 2**31:
        raise ValueError(f"fastdiff.layer_norm_linear: M={M}, N={N}, K={K} are beyond the CUDA "
                         f"kernel's 32-bit sizes (M, N, K and the tiles below 2**31)")
    # An absent shift: fold stands in (HAS_SHIFT=0: never read), so the signature is one.
    args = [x, weight, fold, fold if shift is None else shift, y, M, N, K, eps]
    return [(_config(x.dtype, geglu, shift is not None), (programs, 1, 1), args)], y
