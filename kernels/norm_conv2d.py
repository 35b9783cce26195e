"""Triton kernel for fastdiff::norm_conv2d: a 3x3 or 1x1 convolution as one implicit GEMM whose
input is normalized on the fly.

x: (N, C1, H, W), x2: (N, C2, H, W) or absent (read as cat([x, x2], 1): a skip connection's cat
never materialized), C = C1 + C2; packed: (O, K) with K = k*k*C + S (fastdiff.ops.
pack_conv_weight: packed[o, (kh*k + kw)*C + c] = weight[o, c, kh, kw], then the shortcut's
columns); scale, shift: (N, C) float32 (a GroupNorm folded into a per-(n, channel) affine) or
absent; shortcut (N, S1, H, W), shortcut2 (N, S2, H, W): a raw 1x1 segment in the same K loop
(a ResnetBlock2D's conv_shortcut, of a cat too). Per output element (n, o, h, w):

    a[n, c, h', w'] = round(silu(x[n, c, h', w'] * scale[n, c] + shift[n, c]))   (0 outside)
    y = sum_{kh, kw, c} packed[o, (kh k + kw) C + c] a[n, c, h + kh - k//2, w + kw - k//2]
        + sum_s packed[o, k k C + s] shortcut[n, s, h, w] + bias[o] + temb[n, o]
        + residual[n, o, h, w]

(round: to x's dtype, what the unfused GroupNorm + SiLU materializes; skipped without scale and
SiLU). Eager runs the cat, the norm, the SiLU, the convolution, the shortcut convolution and the
adds as separate kernels, each writing its (N, C, H, W) result; here the rows of the GEMM are
the output pixels (n, h, w), M = N H W, its columns the output channels, and its K loop walks
the taps (kh, kw), then the channels of x, of x2 (BLOCK_K at a time), loading each [BLOCK_M,
BLOCK_K] tile of the input at the rows' shifted pixels (masked at the border: zero padding
after the prologue), applying the affine and SiLU in registers and feeding tl.dot; the shortcut
is one more segment at the centre tap, read raw. The epilogue adds bias, temb and the residual
(fp32), one rounding, and stores with the output's strides (NCHW, or channels_last: transformer
tokens).

Every tensor is read through its strides (runtime int64 arguments: NCHW or channels_last, one
cubin for both); address products are 64-bit; M, O, K and the grid are 32-bit (the planners
check). fp32 inputs multiply in IEEE fp32 (no TF32); 16-bit inputs on tensor cores. Programs in
groups of GROUP_M row tiles (linear_geglu.grouped_tile) for L2 reuse of the weight's tiles.

Constexpr flags say what is present: KS (1 or 3), HAS_X2, PROLOGUE (scale and shift), SILU,
HAS_BIAS, HAS_TEMB, HAS_RES, HAS_SC, HAS_SC2; an absent tensor's pointer is x's (never read).
Prebuilt: the combinations diffusers' blocks use (prebuilt_configs), fp16 and bf16, assuming
16-byte aligned pointers and C1, C2, S1, S2, K multiples of 16; the rest runs on the JIT.
"""
import torch
import triton
import triton.language as tl

from . import variant
from .linear_geglu import grouped_tile

# 16-bit: 128 x 64 output tiles over 8 warps (one fp32 accumulator of 8192 values: 32 registers
# a thread), K in steps of 16, three stages; 64 columns divide SD's widths (320, 640, 1280). The
# input tile is gathered (per-element 64-bit addresses) and goes through registers for the
# prologue, with the scale and shift gathered beside it, so registers bound the tile: at 4 warps
# x BLOCK_K 32 x 3 stages ptxas spilled every configuration (255 registers, up to 344 B of
# stack); at 8 warps x BLOCK_K 32 x 2 stages it used 103-206 and still spilled conv_out on sm_80
# (capped at 128); at 8 warps x BLOCK_K 16 x 3 stages none spills (BENCHMARKS.md's SASS table).
BLOCK_M = 128
BLOCK_N = 64
BLOCK_K = 16
NUM_WARPS = 8
NUM_STAGES = 3
# fp32 (FFMA, IEEE precision; JIT only): 64x64 tiles over 8 warps, K in steps of 16, two stages
# (with three, every flag set spilled 8 B on sm_90; with two, 192-194 registers).
BLOCK_M_FP32 = 64
BLOCK_N_FP32 = 64
BLOCK_K_FP32 = 16
NUM_WARPS_FP32 = 8
NUM_STAGES_FP32 = 2
GROUP_M = 8

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _segment(acc, src_ptr, row_off, row_ok, sc_ch, Cseg, chan0, C, n_row, sc_ptr, sh_ptr, w_cols,
             n_ok, NORM: tl.constexpr, SILU: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += a @ W^T over Cseg channels of one input at rows row_off (int64 element offsets;
    row_ok: in bounds), channel stride sc_ch; chan0: the channels' offset in the (N, C) scale
    and shift tables; w_cols: [1, BLOCK_N] pointers to the weight rows at the segment's first
    column."""
    rk = tl.arange(0, BLOCK_K)
    for c0 in range(0, Cseg, BLOCK_K):
        c = c0 + rk
        c_ok = c < Cseg
        mask = row_ok[:, None] & c_ok[None, :]
        a = tl.load(src_ptr + row_off[:, None] + c.to(tl.int64)[None, :] * sc_ch, mask=mask,
                    other=0.0)
        if NORM or SILU:
            f = a.to(tl.float32)
            if NORM:
                tab = n_row[:, None] * C + (chan0 + c)[None, :]
                f = f * tl.load(sc_ptr + tab, mask=mask, other=0.0) \
                    + tl.load(sh_ptr + tab, mask=mask, other=0.0)
            if SILU:
                f = f * tl.sigmoid(f)
            # zero padding after the prologue; rounded as the unfused path materializes it
            a = tl.where(mask, f, 0.0).to(src_ptr.dtype.element_ty)
        wt = tl.load(w_cols + c[:, None], mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision="ieee")
    return acc


@triton.jit
def norm_conv2d(x_ptr, x2_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, t_ptr, r_ptr, s_ptr, s2_ptr, y_ptr,
                N, H, W, C1, C2, S1, S2, O, K,
                sxn, sxc, sxh, sxw, sx2n, sx2c, sx2h, sx2w, srn, src, srh, srw,
                ssn, ssc, ssh, ssw, ss2n, ss2c, ss2h, ss2w, syn, syc, syh, syw,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, KS: tl.constexpr, HAS_X2: tl.constexpr,
                PROLOGUE: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_TEMB: tl.constexpr, HAS_RES: tl.constexpr, HAS_SC: tl.constexpr,
                HAS_SC2: tl.constexpr):
    HW = H * W
    M = N * HW
    C = C1 + C2
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, O, BLOCK_M, BLOCK_N, GROUP_M)
    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < O
    n_row = rm // HW
    hw = rm % HW
    h = hw // W
    w = hw % W
    n64 = n_row.to(tl.int64)
    h64 = h.to(tl.int64)
    w64 = w.to(tl.int64)
    k64 = tl.cast(K, tl.int64)
    w_rows = w_ptr + rn.to(tl.int64)[None, :] * k64          # [1, BLOCK_N]: packed's rows
    x_off = n64 * sxn + h64 * sxh + w64 * sxw
    if HAS_X2:
        x2_off = n64 * sx2n + h64 * sx2h + w64 * sx2w

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(KS * KS):
        dh = tap // KS - KS // 2
        dw = tap % KS - KS // 2
        hh = h + dh
        ww = w + dw
        ok = m_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        col = tap * C
        acc = _segment(acc, x_ptr, x_off + (dh * sxh + dw * sxw), ok, sxc, C1, 0, C, n_row,
                       sc_ptr, sh_ptr, w_rows + col, n_ok, PROLOGUE, SILU, BLOCK_K)
        if HAS_X2:
            acc = _segment(acc, x2_ptr, x2_off + (dh * sx2h + dw * sx2w), ok, sx2c, C2, C1, C,
                           n_row, sc_ptr, sh_ptr, w_rows + (col + C1), n_ok, PROLOGUE, SILU,
                           BLOCK_K)
    if HAS_SC:
        col = KS * KS * C
        s_off = n64 * ssn + h64 * ssh + w64 * ssw
        acc = _segment(acc, s_ptr, s_off, m_ok, ssc, S1, 0, C, n_row, sc_ptr, sh_ptr,
                       w_rows + col, n_ok, False, False, BLOCK_K)
        if HAS_SC2:
            s2_off = n64 * ss2n + h64 * ss2h + w64 * ss2w
            acc = _segment(acc, s2_ptr, s2_off, m_ok, ss2c, S2, 0, C, n_row, sc_ptr, sh_ptr,
                           w_rows + (col + S1), n_ok, False, False, BLOCK_K)

    mask = m_ok[:, None] & n_ok[None, :]
    rn64 = rn.to(tl.int64)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_TEMB:
        acc += tl.load(t_ptr + n64[:, None] * O + rn64, mask=mask, other=0.0)
    if HAS_RES:
        r_off = n64 * srn + h64 * srh + w64 * srw
        acc += tl.load(r_ptr + r_off[:, None] + rn64 * src, mask=mask, other=0.0).to(tl.float32)
    y_off = n64 * syn + h64 * syh + w64 * syw
    tl.store(y_ptr + y_off[:, None] + rn64 * syc, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _blocks(dtype):
    wide = dtype == torch.float32
    return {"BLOCK_M": BLOCK_M_FP32 if wide else BLOCK_M,
            "BLOCK_N": BLOCK_N_FP32 if wide else BLOCK_N,
            "BLOCK_K": BLOCK_K_FP32 if wide else BLOCK_K}


# The constexpr flags, in the kernel's order.
FLAGS = ("KS", "HAS_X2", "PROLOGUE", "SILU", "HAS_BIAS", "HAS_TEMB", "HAS_RES", "HAS_SC",
         "HAS_SC2")
_POINTERS = ("x_ptr", "x2_ptr", "w_ptr", "b_ptr", "sc_ptr", "sh_ptr", "t_ptr", "r_ptr", "s_ptr",
             "s2_ptr", "y_ptr")
_STRIDES = tuple(f"s{t}{d}" for t in ("x", "x2", "r", "s", "s2", "y") for d in "nchw")


def _config(dtype, flags):
    """The configuration of a call: flags maps FLAGS to ints. Prebuilt, it assumes 16-byte
    aligned pointers and C1, C2, S1, S2, K multiples of 16."""
    t = "*" + _TL_DTYPES[dtype]
    wide = dtype == torch.float32
    sig = {p: "*fp32" if p in ("b_ptr", "sc_ptr", "sh_ptr", "t_ptr") else t for p in _POINTERS}
    sig.update({n: "i32" for n in ("N", "H", "W", "C1", "C2", "S1", "S2", "O", "K")})
    sig.update({s: "i64" for s in _STRIDES})
    cx = {**_blocks(dtype), "GROUP_M": GROUP_M, **{f: int(flags[f]) for f in FLAGS}}
    cfg = {"fn": norm_conv2d, "signature": sig, "constexprs": cx,
           "num_warps": NUM_WARPS_FP32 if wide else NUM_WARPS,
           "num_stages": NUM_STAGES_FP32 if wide else NUM_STAGES}
    return variant(cfg, _POINTERS + ("C1", "C2", "S1", "S2", "K"))


def _flags(KS=3, HAS_X2=0, PROLOGUE=0, SILU=0, HAS_BIAS=0, HAS_TEMB=0, HAS_RES=0, HAS_SC=0,
           HAS_SC2=0):
    return dict(KS=KS, HAS_X2=HAS_X2, PROLOGUE=PROLOGUE, SILU=SILU, HAS_BIAS=HAS_BIAS,
                HAS_TEMB=HAS_TEMB, HAS_RES=HAS_RES, HAS_SC=HAS_SC, HAS_SC2=HAS_SC2)


# The combinations diffusers' U-Net blocks use (accelerate), as values of FLAGS in order (also
# fastdiff::config::norm_conv2d::PREBUILT_FLAGS, which the C++ plan checks a call against):
PREBUILT_FLAGS = (
    # KS X2 PRO SILU BIAS TEMB RES SC SC2
    (3, 0, 1, 1, 1, 1, 0, 0, 0),   # ResnetBlock2D.conv1: norm1 + SiLU + conv + bias + temb
    (3, 1, 1, 1, 1, 1, 0, 0, 0),   # the same on an up block's cat([h, skip])
    (3, 0, 1, 1, 1, 0, 1, 0, 0),   # ResnetBlock2D.conv2 + the input as residual
    (3, 0, 1, 1, 1, 0, 0, 1, 0),   # conv2 + conv_shortcut(input)
    (3, 0, 1, 1, 1, 0, 0, 1, 1),   # conv2 + conv_shortcut(cat([h, skip]))
    (1, 0, 1, 0, 1, 0, 0, 0, 0),   # Transformer2DModel.proj_in after its GroupNorm
    (1, 0, 0, 0, 1, 0, 1, 0, 0),   # Transformer2DModel.proj_out + the residual
    (3, 0, 1, 1, 1, 0, 0, 0, 0),   # the U-Net's conv_out after norm_out + SiLU
)


def prebuilt_configs():
    """The combinations of PREBUILT_FLAGS in fp16 and bf16 (fp32 and other flags: the JIT)."""
    return [_config(dt, dict(zip(FLAGS, row))) for dt in (torch.float16, torch.bfloat16)
            for row in PREBUILT_FLAGS]


def grid_of(M, O, dtype):
    cx = _blocks(dtype)
    return triton.cdiv(M, cx["BLOCK_M"]) * triton.cdiv(O, cx["BLOCK_N"])


def plan(x, packed, kernel_size, bias=None, x2=None, scale=None, shift=None, silu=False,
         temb=None, residual=None, shortcut=None, shortcut2=None, channels_last_out=False):
    """The launch of one call and the output (N, O, H, W) (channels_last memory with
    channels_last_out). Arguments as the schema's, checked by the C++ op."""
    N, C1, H, W = x.shape
    O, K = packed.shape
    fmt = torch.channels_last if channels_last_out else torch.contiguous_format
    y = torch.empty((N, O, H, W), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return [], y
    C2 = 0 if x2 is None else x2.shape[1]
    S1 = 0 if shortcut is None else shortcut.shape[1]
    S2 = 0 if shortcut2 is None else shortcut2.shape[1]
    M = N * H * W
    programs = grid_of(M, O, x.dtype)
    if (M >= 2**31 or O >= 2**31 or K >= 2**31 or programs >= 2**31
            or N * (C1 + C2) >= 2**31 or N * O >= 2**31):
        raise ValueError(f"fastdiff.norm_conv2d: M={M}, O={O}, K={K} are beyond the CUDA "
                         f"kernel's 32-bit sizes (M = N*H*W, O, K, N*C, N*O and the tiles below "
                         f"2**31)")
    flags = _flags(KS=kernel_size, HAS_X2=int(x2 is not None), PROLOGUE=int(scale is not None),
                   SILU=int(silu), HAS_BIAS=int(bias is not None), HAS_TEMB=int(temb is not None),
                   HAS_RES=int(residual is not None), HAS_SC=int(shortcut is not None),
                   HAS_SC2=int(shortcut2 is not None))

    def st(t):
        return list(t.stride()) if t is not None else [0, 0, 0, 0]

    # Absent tensors: x stands in (their flag is 0: never read), so the signature is one.
    ptrs = [x, x2, packed, bias, scale, shift, temb, residual, shortcut, shortcut2, y]
    ptrs = [x if p is None else p for p in ptrs]
    args = ptrs + [N, H, W, C1, C2, S1, S2, O, K] + st(x) + st(x2) + st(residual) \
        + st(shortcut) + st(shortcut2) + st(y)
    return [(_config(x.dtype, flags), (programs, 1, 1), args)], y
