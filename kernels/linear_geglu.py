"""Triton kernel for fastdiff::linear_geglu: diffusers' GEGLU, projection and activation, in one
GEMM.

x: (..., K); weight: (2F, K), nn.Linear's layout (rows 0..F-1 make the value half, rows F..2F-1
the gate); bias: (2F,) or absent. The output is (..., F):

    y = (x @ W[:F].T + b[:F]) * gelu(x @ W[F:].T + b[F:]),   gelu(g) = g / 2 (1 + erf(g / sqrt 2))

(diffusers.models.activations.GEGLU: ``hidden_states, gate = proj(x).chunk(2, -1)``, then
``hidden_states * F.gelu(gate)``). Eager runs the projection (an addmm writing the (..., 2F)
tensor) and then the activation (fastdiff.geglu: reads it back, writes F); here each program
computes one [BLOCK_M, BLOCK_N] tile of y from two accumulators, the value columns n..n+BN and the
gate columns F+n..F+n+BN of the projection, so the 2F-wide tensor never reaches memory.

A tiled matmul (the structure of Triton's matmul tutorial): a program walks K in BLOCK_K steps,
loading a [BLOCK_M, BLOCK_K] tile of x once for both products and the two [BLOCK_K, BLOCK_N]
tiles of W^T (W is read row-major, so the transpose is an index swap, not a copy); tl.dot with
fp32 accumulation (tensor cores for 16-bit inputs; fp32 inputs in IEEE fp32, as torch's default
matmul on CUDA: TF32 would be 10 bits of mantissa where the op promises fp32); bias, GELU and the
product in fp32 in the epilogue, one rounding to x's dtype. Masks cover M, F and K that are not
multiples of the blocks. Programs are ordered in groups of GROUP_M row tiles (all column tiles of
GROUP_M row tiles before the next group), so a wave of programs shares x's row tiles and W's
column tiles in L2. Row offsets are 64-bit (M * K may exceed 2**31); M, F, K and the grid are
32-bit (the planners check).

The bias is a runtime flag (has_bias; x stands in when absent, masked off: never read), so one
cubin per dtype serves both. Prebuilt, the kernel is compiled twice per dtype: assuming K and F
multiples of 16 (the JIT's specialization of SD's widths: 16-byte tile loads, LDGSTS.128) and
not (any shape); tests/test_prebuild.py checks the machine code (tensor cores, no spills).
"""
import torch
import triton
import triton.language as tl

from . import variant

# One configuration per dtype width, for sm_80 and sm_90 (tests/test_prebuild.py: no spills,
# shared memory within sm_86's 99 KB). 16-bit: 128x64 output tiles with two fp32 accumulators
# (2 x 8192 values over 8 warps: 64 registers a thread), K in steps of 32, three stages of
# an x tile (8 KB) and two W tiles (8 KB): 48 KB of shared memory on sm_90, 32 KB on sm_80 as
# compiled (BENCHMARKS.md's SASS table: 111-142 registers, no spills).
BLOCK_M = 128
BLOCK_N = 64
BLOCK_K = 32
NUM_WARPS = 8
NUM_STAGES = 3
# fp32 (FFMA, no tensor cores at IEEE precision): 64x64 tiles over 8 warps, K in steps of 16
# (tl.dot's least), 24 KB of shared memory; at 4 warps ptxas spilled (sm_90, unaligned K).
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
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` of an (M, N) output in grouped order: programs
    run all column tiles of GROUP_M row tiles in turn, so a wave shares x's row tiles and W's
    column tiles in L2 (linear_geglu's and layer_norm_linear's GEMMs)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    in_group = pid % per_group
    return first_m + in_group % rows_in_group, in_group // rows_in_group


@triton.jit
def linear_geglu(x_ptr, w_ptr, b_ptr, y_ptr, M, F, K, has_bias, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, F, BLOCK_M, BLOCK_N, GROUP_M)

    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < F
    # 64-bit row starts: x is M * K elements, W 2F * K (either may pass 2**31).
    k64 = tl.cast(K, tl.int64)  # K == 1 is a Python int (the JIT specializes 1)
    x_tile = x_ptr + rm.to(tl.int64)[:, None] * k64 + rk[None, :]       # [BLOCK_M, BLOCK_K]
    wh_tile = w_ptr + rn.to(tl.int64)[None, :] * k64 + rk[:, None]      # W[:F]^T [BLOCK_K, BN]
    wg_tile = wh_tile + tl.cast(F, tl.int64) * k64                      # W[F:]^T

    acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(x_tile, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        wh = tl.load(wh_tile, mask=w_mask, other=0.0)
        wg = tl.load(wg_tile, mask=w_mask, other=0.0)
        acc_h = tl.dot(a, wh, acc_h, input_precision="ieee")
        acc_g = tl.dot(a, wg, acc_g, input_precision="ieee")
        x_tile += BLOCK_K
        wh_tile += BLOCK_K
        wg_tile += BLOCK_K

    b_ok = n_ok & (has_bias != 0)
    bh = tl.load(b_ptr + rn, mask=b_ok, other=0.0).to(tl.float32)
    bg = tl.load(b_ptr + F + rn, mask=b_ok, other=0.0).to(tl.float32)
    h = acc_h + bh[None, :]
    g = acc_g + bg[None, :]
    y = h * (0.5 * g * (1.0 + tl.math.erf(g * _SQRT1_2)))
    y_tile = y_ptr + rm.to(tl.int64)[:, None] * F + rn[None, :]
    tl.store(y_tile, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _config(dtype):
    """The configuration a call runs with: the blocks of its dtype; prebuilt, it assumes 16-byte
    aligned pointers and K, F multiples of 16 (prebuilt_configs() adds the variant without)."""
    t = "*" + _TL_DTYPES[dtype]
    wide = dtype == torch.float32
    cx = {"BLOCK_M": BLOCK_M_FP32 if wide else BLOCK_M,
          "BLOCK_N": BLOCK_N_FP32 if wide else BLOCK_N,
          "BLOCK_K": BLOCK_K_FP32 if wide else BLOCK_K, "GROUP_M": GROUP_M}
    cfg = {"fn": linear_geglu,
           "signature": {"x_ptr": t, "w_ptr": t, "b_ptr": t, "y_ptr": t, "M": "i32", "F": "i32",
                         "K": "i32", "has_bias": "i32"},
           "constexprs": cx, "num_warps": NUM_WARPS_FP32 if wide else NUM_WARPS,
           "num_stages": NUM_STAGES_FP32 if wide else NUM_STAGES}
    return variant(cfg, _POINTERS + ("F", "K"))


_POINTERS = ("x_ptr", "w_ptr", "b_ptr", "y_ptr")


def prebuilt_configs():
    """Every configuration the launcher can choose: per dtype, K and F multiples of 16 or not
    (the launcher picks the most aligned variant a call satisfies)."""
    return [v for dt in _TL_DTYPES for c in [_config(dt)] for v in (c, variant(c, _POINTERS))]


def grid_of(M, F, dtype):
    """Programs of a call: one per [BLOCK_M, BLOCK_N] tile of y."""
    cx = _config(dtype)["constexprs"]
    return triton.cdiv(M, cx["BLOCK_M"]) * triton.cdiv(F, cx["BLOCK_N"])


def plan(x, weight, bias=None):
    """The launch of one call, [(config, grid, args)], and the output (..., F).

    x: (..., K), contiguous; weight: (2F, K), contiguous; bias: (2F,) or None; one dtype;
    checked by the C++ op."""
    F, K = weight.shape[0] // 2, weight.shape[1]
    y = x.new_empty((*x.shape[:-1], F))
    if y.numel() == 0:
        return [], y
    M = y.numel() // F
    programs = grid_of(M, F, x.dtype)
    if M >= 2**31 or 2 * F >= 2**31 or K >= 2**31 or programs >= 2**31:
        raise ValueError(f"fastdiff.linear_geglu: M={M}, F={F}, K={K} are beyond the CUDA "
                         f"kernel's 32-bit sizes (M, 2F, K and the tiles below 2**31)")
    # An absent bias: x stands in (masked off: never read), so one cubin serves both.
    args = [x, weight, x if bias is None else bias, y, M, F, K, int(bias is not None)]
    return [(_config(x.dtype), (programs, 1, 1), args)], y
