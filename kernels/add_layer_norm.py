"""Triton kernel for fastdiff::add_layer_norm: a residual add and the LayerNorm after it, one pass.

x, residual: (..., C), one dtype; weight, bias, next_bias: (C,) in x's dtype, or absent. Returns
(h_out, y):

    h = x + residual                      (rounded to x's dtype)
    y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias     (over the last dim, fp32 math)
    h_out = h + next_bias                 (fp32 add of the rounded h, rounded: the next residual)

as diffusers' BasicTransformerBlock does with ``hidden_states = attn_output + hidden_states``
followed by ``norm2(hidden_states)`` (and norm3 after the cross-attention). The statistics are
taken of h as rounded, so y is LayerNorm of exactly the tensor eager torch normalizes. Eager runs
two kernels: the add (2 reads, 1 write) and the LayerNorm (1 read, 1 write); this one reads x and
residual and writes h and y. next_bias is the bias of the Linear whose output is added to h next
(the feed-forward's last): with it in h_out, the block ends with one in-place
``h_out.addmm_(g, W.T)`` (no bias) instead of an addmm and a residual add.

One program per row, the whole row in registers (BLOCK_C = C rounded up to a power of two, a
compile-time constant): the mean and the variance are two passes over registers, not memory.
The planner passes VEC, the elements in 16 bytes when C is a multiple of it (rows then start on
16-byte boundaries), else 1, and C as C / VEC (Triton then knows VEC divides it). Prebuilt
cubins exist for 16-byte rows of up to 4096 elements (the widths of SD1.5, SDXL: 320 to 1280);
other rows run on the JIT, and the C++ plan says why.
"""
import torch
import triton
import triton.language as tl

from . import variant

# Row widths (BLOCK_C) with prebuilt cubins.
PREBUILT_BLOCKS = (256, 512, 1024, 2048, 4096)
NUM_STAGES = 1

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def block_c(C):
    """BLOCK_C of a row of C elements: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(C))


def num_warps(block, itemsize):
    """Warps per row: 32 bytes of each tensor per thread (two 16-byte accesses), at most 8
    warps (then 64 bytes: 16 fp32 per thread and tensor, no spills)."""
    return min(8, max(1, block * itemsize // 1024))


@triton.jit(do_not_specialize=["has_w", "has_b", "has_nb"])
def add_layer_norm(x_ptr, r_ptr, w_ptr, b_ptr, nb_ptr, h_ptr, y_ptr, cvecs, eps, has_w, has_b,
                   has_nb, VEC: tl.constexpr, BLOCK_C: tl.constexpr):
    c_len = cvecs * VEC
    row = tl.program_id(0).to(tl.int64) * c_len
    col = tl.arange(0, BLOCK_C)
    mask = col < c_len
    x = tl.load(x_ptr + row + col, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row + col, mask=mask, other=0.0).to(tl.float32)
    h = (x + r).to(h_ptr.dtype.element_ty)      # the sum in x's dtype, as eager rounds it
    hf = h.to(tl.float32)
    # next_bias: a runtime flag like has_w/has_b (one cubin serves both); absent, h itself is
    # stored (not h + 0: that would turn -0.0 into +0.0).
    nb = tl.load(nb_ptr + col, mask=mask & (has_nb != 0), other=0.0).to(tl.float32)
    h_out = tl.where(has_nb != 0, (hf + nb).to(h_ptr.dtype.element_ty), h)
    tl.store(h_ptr + row + col, h_out, mask=mask)
    mean = tl.sum(hf, axis=0) / c_len
    d = tl.where(mask, hf - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / c_len + eps)
    # weight, bias: runtime flags (an absent one is never read), so one cubin serves both.
    w = tl.load(w_ptr + col, mask=mask & (has_w != 0), other=1.0).to(tl.float32)
    b = tl.load(b_ptr + col, mask=mask & (has_b != 0), other=0.0).to(tl.float32)
    tl.store(y_ptr + row + col, (d * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)


def _config(dtype, block, aligned=True):
    """The configuration of a call with rows of BLOCK_C = ``block``; ``aligned``: C is a multiple
    of 16 bytes' worth of elements (VEC). Prebuilt, it assumes 16-byte aligned tensors."""
    t = "*" + _TL_DTYPES[dtype]
    cfg = {"fn": add_layer_norm,
           "signature": {"x_ptr": t, "r_ptr": t, "w_ptr": t, "b_ptr": t, "nb_ptr": t, "h_ptr": t,
                         "y_ptr": t, "cvecs": "i32", "eps": "fp32", "has_w": "i32",
                         "has_b": "i32", "has_nb": "i32"},
           "constexprs": {"VEC": 16 // dtype.itemsize if aligned else 1, "BLOCK_C": block},
           "num_warps": num_warps(block, dtype.itemsize), "num_stages": NUM_STAGES}
    return variant(cfg, ("x_ptr", "r_ptr", "w_ptr", "b_ptr", "nb_ptr", "h_ptr", "y_ptr"))


def prebuilt_configs():
    """dtype x PREBUILT_BLOCKS, 16-byte rows; other rows (unaligned C, C > 4096 or < 129)
    run on the JIT."""
    return [_config(dt, block) for dt in _TL_DTYPES for block in PREBUILT_BLOCKS]


def plan(x, residual, weight, bias, eps, next_bias=None):
    """The launch of one call, [(config, grid, args)], and the outputs (h_out, y).

    x, residual: (..., C), contiguous, one dtype; weight, bias, next_bias: (C,) in that dtype or
    None; checked by the C++ op."""
    h, y = torch.empty_like(x), torch.empty_like(x)
    if x.numel() == 0:
        return [], (h, y)
    C = x.shape[-1]
    rows = x.numel() // C
    if rows >= 2**31 or C >= 2**31:
        raise ValueError(f"fastdiff.add_layer_norm: {rows} rows of C={C} are beyond the CUDA "
                         f"kernel's 32-bit sizes")
    cfg = _config(x.dtype, block_c(C), C % (16 // x.element_size()) == 0)
    vec = cfg["constexprs"]["VEC"]
    # An absent weight, bias or next_bias: x stands in (masked off: never read), so the types
    # stay and one cubin serves every combination.
    args = [x, residual, *(x if t is None else t for t in (weight, bias, next_bias)), h, y,
            C // vec, float(eps), *(int(t is not None) for t in (weight, bias, next_bias))]
    return [(cfg, (rows, 1, 1), args)], (h, y)
