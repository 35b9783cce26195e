"""Triton kernel for fastdiff::denoise_step: guidance + solver update + noise, one pass.

The solver lives in the coefficient table (fastdiff/schedules.py): the kernel loads row
``step_index`` itself, so the launch never reads the index on the host and a CUDA graph of it
replays correctly for every step. An index outside the table cannot be reported without a host
sync; the kernel writes NaN instead (visible, never a silent wrong answer).
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024
NUM_WARPS = 4
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _denoise_step_kernel(mo_ptr, x_ptr, noise_ptr, prev_ptr, coef_ptr, idx_ptr, out_ptr, x0_ptr,
                         numel, num_steps, guidance, clip_lo, clip_hi,
                         GUIDED: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_PREV: tl.constexpr,
                         WRITE_X0: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    idx = tl.load(idx_ptr)
    valid = (idx >= 0) & (idx < num_steps)
    row = coef_ptr + tl.where(valid, idx, 0) * 8
    poison = tl.where(valid, 0.0, float("nan"))
    H = tl.load(row + 0)
    Px = tl.load(row + 1)
    Pm = tl.load(row + 2)
    Kx = tl.load(row + 3)
    K0 = tl.load(row + 4)
    Km = tl.load(row + 5)
    Kp = tl.load(row + 6)
    Kn = tl.load(row + 7)

    m = tl.load(mo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:  # [uncond; cond]: diffusers' u + s * (c - u)
        c = tl.load(mo_ptr + numel + offs, mask=mask, other=0.0).to(tl.float32)
        m = m + guidance * (c - m)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        n = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = x + H * n
    x0 = tl.minimum(tl.maximum(Px * x + Pm * m, clip_lo), clip_hi)
    out = Kx * x + K0 * x0 + Km * m + poison
    if HAS_NOISE:
        out += Kn * n
    if HAS_PREV:
        out += Kp * tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + offs, (x0 + poison).to(x0_ptr.dtype.element_ty), mask=mask)


def _config(dtype, guided, has_noise, has_prev, write_x0):
    """The one place that maps a call to a compiled configuration (also listed by aot_configs)."""
    t = "*" + _TL_DTYPES[dtype]
    signature = {"mo_ptr": t, "x_ptr": t, "noise_ptr": t, "prev_ptr": t, "coef_ptr": "*fp32",
                 "idx_ptr": "*i64", "out_ptr": t, "x0_ptr": t, "numel": "i64", "num_steps": "i64",
                 "guidance": "fp32", "clip_lo": "fp32", "clip_hi": "fp32"}
    constexprs = {"GUIDED": guided, "HAS_NOISE": has_noise, "HAS_PREV": has_prev,
                  "WRITE_X0": write_x0, "BLOCK": BLOCK}
    return {"fn": _denoise_step_kernel, "signature": signature, "constexprs": constexprs,
            "num_warps": NUM_WARPS, "num_stages": 1}


def aot_configs():
    """Every configuration the launcher can choose."""
    return [_config(dt, g, n, p, w) for dt in _TL_DTYPES for g in (False, True)
            for n in (False, True) for p in (False, True) for w in (False, True)]


def denoise_step(model_output, sample, coeffs, step_index, noise, prev_x0, guidance_scale,
                 clip_sample, clip_sample_range, write_x0):
    """Launch on checked inputs (csrc/ops.cpp); returns (next sample, x0c or empty)."""
    out = torch.empty_like(sample)
    x0 = torch.empty_like(sample) if write_x0 else sample.new_empty(0)
    numel = sample.numel()
    if numel == 0:
        return out, x0
    guided = model_output.shape[0] == 2 * sample.shape[0]
    cfg = _config(sample.dtype, guided, noise is not None, prev_x0 is not None, bool(write_x0))
    idx = step_index.reshape(1).to(torch.int64)  # a device op: no host sync
    r = float(clip_sample_range) if clip_sample else float("inf")
    grid = (triton.cdiv(numel, BLOCK),)
    _denoise_step_kernel[grid](
        model_output, sample, noise if noise is not None else sample,
        prev_x0 if prev_x0 is not None else sample, coeffs, idx, out, x0 if write_x0 else out,
        numel, coeffs.shape[0], float(guidance_scale), -r, r,
        **cfg["constexprs"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, x0
