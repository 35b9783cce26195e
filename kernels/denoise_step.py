"""Triton kernel for fastdiff::denoise_step: guidance combine + solver update + noise, one pass.

The solver is not known here: it lives in the per-step coefficient table (columns in
fastdiff/schedules.py, semantics in csrc/denoise_step.cpp), so one kernel serves DDPM, DDIM,
DPM-Solver++ and Euler. With m the (guided) model output, x the sample and n the noise:

    x_hat = x + H * n;  x0 = clip(P_x * x_hat + P_m * m);  out = K_x * x_hat + K_0 * x0 + K_m * m
                                                               + K_p * prev_x0 + K_n * n

The kernel loads row ``step_index`` of the table itself: the launch never reads the index on the
host, so a CUDA graph captured once replays correctly for every step. An index outside the table
cannot be reported without a host sync; the kernel writes NaN to every output element instead
(visible, never a silent wrong answer). The C++ CPU op raises instead.

Bandwidth-bound: each element is read once from each input and written once; math in fp32.
"""
import torch
import triton
import triton.language as tl

from . import pointers, variant

# 16 elements per thread: four 16-byte loads per fp32 input (two for 16-bit dtypes) in flight.
BLOCK = 2048
NUM_WARPS = 4
NUM_STAGES = 1  # no loop to pipeline
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TL_INDEX = {torch.int64: "i64", torch.int32: "i32"}


# write_x0 is a runtime 0/1 int (the interpreter takes no bool arguments), never specialized as
# a constant so that both values run the same compiled kernel.
@triton.jit(do_not_specialize=["write_x0"])
def denoise_step(mo_ptr, x_ptr, noise_ptr, prev_ptr, coef_ptr, idx_ptr, out_ptr, x0_ptr,
                 numel, num_steps, guidance, clip_lo, clip_hi, write_x0,
                 GUIDED: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_PREV: tl.constexpr,
                 BLOCK: tl.constexpr):
    # 64-bit block start (numel may exceed 2**31), 32-bit offsets inside the block.
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < numel - start

    # The data loads do not depend on the coefficients: issue them first so that their latency
    # overlaps the dependent index -> row loads below.
    m = tl.load(mo_ptr + start + offs, mask=mask).to(tl.float32)
    if GUIDED:  # model_output = [uncond; cond]; diffusers' convention u + s * (c - u)
        c = tl.load(mo_ptr + numel + start + offs, mask=mask).to(tl.float32)
        m = m + guidance * (c - m)
    x = tl.load(x_ptr + start + offs, mask=mask).to(tl.float32)
    if HAS_NOISE:
        n = tl.load(noise_ptr + start + offs, mask=mask).to(tl.float32)
    if HAS_PREV:
        p = tl.load(prev_ptr + start + offs, mask=mask).to(tl.float32)

    # An index outside [0, num_steps) makes every coefficient NaN, hence every output NaN; the
    # where keeps even the masked-off address inside the table.
    idx = tl.load(idx_ptr).to(tl.int64)
    valid = (idx >= 0) & (idx < num_steps)
    row = coef_ptr + tl.where(valid, idx, 0) * 8
    nan = float("nan")
    H = tl.load(row + 0, mask=valid, other=nan)
    Px = tl.load(row + 1, mask=valid, other=nan)
    Pm = tl.load(row + 2, mask=valid, other=nan)
    Kx = tl.load(row + 3, mask=valid, other=nan)
    K0 = tl.load(row + 4, mask=valid, other=nan)
    Km = tl.load(row + 5, mask=valid, other=nan)
    Kp = tl.load(row + 6, mask=valid, other=nan)
    Kn = tl.load(row + 7, mask=valid, other=nan)

    if HAS_NOISE:
        x = x + H * n
    # Clipping is a runtime value (+-inf bounds when off): two min/max cost nothing here. NaN must
    # propagate as in torch.clamp; the GPU's default min/max would return the other operand.
    x0 = Px * x + Pm * m
    x0 = tl.minimum(tl.maximum(x0, clip_lo, propagate_nan=tl.PropagateNan.ALL), clip_hi,
                    propagate_nan=tl.PropagateNan.ALL)
    out = Kx * x + K0 * x0 + Km * m
    if HAS_NOISE:
        out += Kn * n
    if HAS_PREV:
        out += Kp * p
    tl.store(out_ptr + start + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    # A runtime flag: a store masked off costs no memory traffic, and it halves the configs.
    tl.store(x0_ptr + start + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask & (write_x0 != 0))


def _config(dtype, guided, has_noise, has_prev, index_dtype=torch.int64):
    """The configuration a call runs with: the launcher's only source of launch parameters.

    The signature is the one Triton's JIT picks for ordinary inputs (numel < 2**31). Prebuilt,
    it assumes 16-byte aligned pointers and numel % 16 == 0, as the JIT specializes them, so the
    cubin has the JIT's vectorized code; prebuilt_configs() adds a variant for any numel.
    """
    t = "*" + _TL_DTYPES[dtype]
    signature = {"mo_ptr": t, "x_ptr": t, "noise_ptr": t, "prev_ptr": t, "coef_ptr": "*fp32",
                 "idx_ptr": "*" + _TL_INDEX[index_dtype], "out_ptr": t, "x0_ptr": t,
                 "numel": "i32", "num_steps": "i32", "guidance": "fp32", "clip_lo": "fp32",
                 "clip_hi": "fp32", "write_x0": "i32"}
    constexprs = {"GUIDED": bool(guided), "HAS_NOISE": bool(has_noise),
                  "HAS_PREV": bool(has_prev), "BLOCK": BLOCK}
    cfg = {"fn": denoise_step, "signature": signature, "constexprs": constexprs,
           "num_warps": NUM_WARPS, "num_stages": NUM_STAGES}
    return variant(cfg, _vector_pointers(cfg) + ("numel",))


def _vector_pointers(cfg):
    """The pointers whose alignment the vectorized code uses: all but idx_ptr, whose one element
    is read alone, and which is often an element of an index table (idx[i], 8 bytes into it:
    the H200's first run refused the prebuilt kernel for that)."""
    return tuple(p for p in pointers(cfg) if p != "idx_ptr")


def prebuilt_configs():
    """Every configuration the launcher can choose: dtype x index dtype x the three flags that
    decide which inputs are read (clipping, write_x0 and the guidance scale are runtime values)."""
    return [v for dt in _TL_DTYPES for it in _TL_INDEX for g in (False, True)
            for n in (False, True) for p in (False, True)
            for c in [_config(dt, g, n, p, it)] for v in (c, variant(c, _vector_pointers(c)))]


def plan(model_output, sample, coeffs, step_index, noise, prev_x0, guidance_scale, clip_sample,
         clip_sample_range, write_x0, guided=None):
    """The launch of one sampler step, [(config, grid, args)], and its outputs.

    model_output: (N, ...) or, guided, (2N, ...) = [uncond; cond] (guided=None: guided when
    model_output has twice the batch of sample); sample, noise, prev_x0:
    (N, ...), contiguous, one dtype; coeffs: (S, 8) float32; step_index: one-element int32/int64
    tensor on the sample's device, never read on the host. Outputs: (next sample (N, ...), x0c
    (N, ...) or an empty tensor when write_x0 is False); NaN everywhere if step_index is not in
    [0, S).
    """
    out = torch.empty_like(sample)
    x0 = torch.empty_like(sample) if write_x0 else sample.new_empty(0)
    if sample.numel() == 0:
        return [], (out, x0)
    numel = sample.numel()
    if guided is None:
        guided = model_output.shape[0] == 2 * sample.shape[0]
    cfg = _config(sample.dtype, guided, noise is not None, prev_x0 is not None, step_index.dtype)
    r = float(clip_sample_range) if clip_sample else float("inf")
    # Absent inputs and x0 get a stand-in pointer that is never touched (constexpr flags, a
    # masked-off store) so that the argument types, hence the compiled kernel, stay the same.
    args = [model_output, sample, sample if noise is None else noise,
            sample if prev_x0 is None else prev_x0, coeffs, step_index, out,
            x0 if write_x0 else out, numel, coeffs.shape[0], float(guidance_scale), -r, r,
            int(bool(write_x0))]
    return [(cfg, (triton.cdiv(numel, BLOCK), 1, 1), args)], (out, x0)
