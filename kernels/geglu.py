"""Triton kernel for fastdiff::geglu: diffusers' GEGLU after its projection, in one pass.

x: (..., 2F), the output of GEGLU's ``proj`` (a Linear whose bias is already inside its addmm);
the output is (..., F):

    y = x[..., :F] * gelu(x[..., F:]),   gelu(g) = g / 2 * (1 + erf(g / sqrt(2)))

(diffusers.models.activations.GEGLU: ``hidden_states, gate = proj(x).chunk(2, -1)``, then
``hidden_states * F.gelu(gate)``, exact GELU). Eager torch runs two kernels over it, GELU on the
gate half (F read, F written) and the product (2F read, F written); this one reads 2F and writes
F, with the math in fp32.

Bandwidth-bound, one program per BLOCK columns of a row: the grid is rows * ceil(F / BLOCK) on
axis 0 (axis 1 would stop at 65,535 rows). The planner passes VEC, the elements in 16 bytes when
F is a multiple of it (every row of x and y then starts on a 16-byte boundary), else 1, and F as
F / VEC: the loads and stores are 16 bytes wide exactly when VEC > 1 (tests/test_prebuild.py).
"""
import torch
import triton
import triton.language as tl

from . import variant

# 8 elements per thread at 4 warps: one 16-byte access per 16-bit half row, two for fp32.
BLOCK = 1024
NUM_WARPS = 4
NUM_STAGES = 1  # no loop to pipeline

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SQRT1_2 = tl.constexpr(0.7071067811865476)


@triton.jit
def geglu(x_ptr, y_ptr, vecs, nblk, VEC: tl.constexpr, BLOCK: tl.constexpr):
    # F arrives as vecs = F / VEC: Triton learns that VEC divides F from the product (a hint
    # on a scalar argument is lost), so the row starts below are multiples of VEC.
    f = vecs * VEC
    pid = tl.program_id(0)
    row = pid // nblk
    col = (pid - row * nblk) * BLOCK + tl.arange(0, BLOCK)
    mask = col < f
    x_row = row.to(tl.int64) * f * 2
    y_row = row.to(tl.int64) * f
    a = tl.load(x_ptr + x_row + col, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + x_row + f + col, mask=mask, other=0.0).to(tl.float32)
    y = a * (0.5 * g * (1.0 + tl.math.erf(g * _SQRT1_2)))
    tl.store(y_ptr + y_row + col, y.to(y_ptr.dtype.element_ty), mask=mask)


def _config(dtype, aligned):
    """The configuration a call runs with. ``aligned``: F is a multiple of 16 bytes' worth of
    elements (VEC); both variants assume 16-byte aligned x and y when prebuilt."""
    t = "*" + _TL_DTYPES[dtype]
    cfg = {"fn": geglu, "signature": {"x_ptr": t, "y_ptr": t, "vecs": "i32", "nblk": "i32"},
           "constexprs": {"VEC": 16 // dtype.itemsize if aligned else 1, "BLOCK": BLOCK},
           "num_warps": NUM_WARPS, "num_stages": NUM_STAGES}
    return variant(cfg, ("x_ptr", "y_ptr"))


def prebuilt_configs():
    """Every configuration the launcher can choose: dtype x (F 16-byte aligned or not)."""
    return [_config(dt, aligned) for dt in _TL_DTYPES for aligned in (True, False)]


def plan(x):
    """The launch of one call, [(config, grid, args)], and the output (..., F).

    x: (..., 2F), contiguous, checked by the C++ op."""
    F = x.shape[-1] // 2
    y = x.new_empty((*x.shape[:-1], F))
    if y.numel() == 0:
        return [], y
    rows = y.numel() // F
    nblk = triton.cdiv(F, BLOCK)
    if F >= 2**31 or rows * nblk >= 2**31:
        raise ValueError(f"fastdiff.geglu: {rows} rows of F={F} are beyond the CUDA kernel's "
                         f"32-bit sizes (F and rows * ceil(F / {BLOCK}) below 2**31)")
    cfg = _config(x.dtype, F % (16 // x.element_size()) == 0)
    vec = cfg["constexprs"]["VEC"]
    return [(cfg, (rows * nblk, 1, 1), [x, y, F // vec, nblk])], y
