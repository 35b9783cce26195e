"""Triton kernel for fastdiff::denoise_step: guidance combine + solver update + noise, one pass.

The solver is not known here: it lives in the per-step table of version-2 rows (layout and
meaning: fastdiff/schedules.py, "the step row, version 2"; float64 definition:
fastdiff/reference.py), so one kernel serves every solver. With v = (x, m, n, s_0..s_{K-1}) the
sample, the (guided) model output, the noise and the K state slots of this call:

    x0  = clip(sum_k P_k v_k);   out = sum_k O_k v_k + O_x0 x0
    s_j <- sum_k S_jk v_k + S_j,x0 x0      for each slot j < K with W_j != 0

Every slot is read before any is written (each element is independent: a thread reads all of
its elements' inputs, then writes), so a row may shift a history (s_0 <- s_1, s_1 <- x0).

The kernel loads row ``step_index`` of the table itself: the launch never reads the index on the
host, so a CUDA graph captured once replays correctly for every step. An index outside the table
cannot be reported without a host sync; the kernel writes NaN to every output element and every
state slot instead (visible, never a silent wrong answer). The C++ CPU op raises instead.

Bandwidth-bound: each element is read once from each input and written once; math in fp32. The
number of slots K is a compile-time constant (NUM_SLOTS: only the K slots and the row's
coefficients for them are touched); guidance, noise and write_x0 are runtime flags, whose
masked-off loads and stores cost no memory traffic and spare the wheel a cubin per combination.
"""
import torch
import triton
import triton.language as tl

from . import pointers, variant

# 16 elements per thread: four 16-byte loads per fp32 input (two for 16-bit dtypes) in flight.
BLOCK = 2048
NUM_WARPS = 4
# Five slots: at 4 warps a thread holds 16 elements of 5 more tensors, and sm_80 spilled (40 B
# of stack); 8 warps halve what a thread holds.
FIVE_SLOT_WARPS = 8
NUM_STAGES = 1  # no loop to pipeline

# The row layout of fastdiff.schedules, as literals for the C++ (setup.py's kernel_config.h);
# tests/test_denoise_step_kernel.py holds them to schedules'. Inputs v = (x, m, n, s_0..s_4);
# index NUM_V of an O or S row is x0.
SLOTS = 5
NUM_V = 8
ROW_P = 0
ROW_O = 8
ROW_W = 17
ROW_S = 22
ROW_LEN = 67

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TL_INDEX = {torch.int64: "i64", torch.int32: "i32"}
# The kernels read the layout through these (a @triton.jit function reads only constexpr globals).
_P, _O, _W, _S, _NV, _LEN = (tl.constexpr(v) for v in (ROW_P, ROW_O, ROW_W, ROW_S, NUM_V,
                                                         ROW_LEN))


@triton.jit
def _affine(c, valid, x, m, n, s0, s1, s2, s3, s4, x0, K: tl.constexpr,
            WITH_X0: tl.constexpr):
    """sum_k c[k] v_k over v = (x, m, n, s_0..s_{K-1}), plus c[NUM_V] x0 when WITH_X0: one map
    of a row. Each coefficient is loaded once (per program); NaN when the row is not valid."""
    nan = float("nan")
    y = tl.load(c + 0, mask=valid, other=nan) * x
    y += tl.load(c + 1, mask=valid, other=nan) * m
    y += tl.load(c + 2, mask=valid, other=nan) * n
    if K > 0:
        y += tl.load(c + 3, mask=valid, other=nan) * s0
    if K > 1:
        y += tl.load(c + 4, mask=valid, other=nan) * s1
    if K > 2:
        y += tl.load(c + 5, mask=valid, other=nan) * s2
    if K > 3:
        y += tl.load(c + 6, mask=valid, other=nan) * s3
    if K > 4:
        y += tl.load(c + 7, mask=valid, other=nan) * s4
    if WITH_X0:
        y += tl.load(c + _NV, mask=valid, other=nan) * x0
    return y


# guided, has_noise and write_x0 are runtime 0/1 ints (the interpreter takes no bool arguments),
# never specialized as constants so that every value runs the same compiled kernel.
@triton.jit(do_not_specialize=["guided", "has_noise", "write_x0"])
def denoise_step(mo_ptr, x_ptr, noise_ptr, state_ptr, coef_ptr, idx_ptr, out_ptr, x0_ptr,
                 numel, num_steps, guidance, clip_lo, clip_hi, guided, has_noise, write_x0,
                 NUM_SLOTS: tl.constexpr, BLOCK: tl.constexpr):
    # 64-bit block start (numel may exceed 2**31), 32-bit offsets inside the block.
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < numel - start

    # The data loads do not depend on the coefficients: issue them first so that their latency
    # overlaps the dependent index -> row loads below. A flag off masks its load off entirely.
    m = tl.load(mo_ptr + start + offs, mask=mask).to(tl.float32)
    # guided: model_output = [uncond; cond]; diffusers' convention u + s * (c - u)
    c = tl.load(mo_ptr + numel + start + offs, mask=mask & (guided != 0), other=0.0)
    m = tl.where(guided != 0, m + guidance * (c.to(tl.float32) - m), m)
    x = tl.load(x_ptr + start + offs, mask=mask).to(tl.float32)
    n = tl.load(noise_ptr + start + offs, mask=mask & (has_noise != 0), other=0.0).to(tl.float32)
    # Slot j of the state is (N, ...) at state_ptr + j * numel; absent slots are never read.
    stride = tl.cast(numel, tl.int64)  # numel == 1 is a Python int (the JIT specializes 1)
    s0, s1, s2, s3, s4 = x, x, x, x, x
    if NUM_SLOTS > 0:
        s0 = tl.load(state_ptr + start + offs, mask=mask).to(tl.float32)
    if NUM_SLOTS > 1:
        s1 = tl.load(state_ptr + stride + start + offs, mask=mask).to(tl.float32)
    if NUM_SLOTS > 2:
        s2 = tl.load(state_ptr + 2 * stride + start + offs, mask=mask).to(tl.float32)
    if NUM_SLOTS > 3:
        s3 = tl.load(state_ptr + 3 * stride + start + offs, mask=mask).to(tl.float32)
    if NUM_SLOTS > 4:
        s4 = tl.load(state_ptr + 4 * stride + start + offs, mask=mask).to(tl.float32)

    # An index outside [0, num_steps) makes every coefficient NaN, hence every output and every
    # slot NaN (W_j = NaN counts as written); the where keeps even the masked-off address inside
    # the table.
    idx = tl.load(idx_ptr).to(tl.int64)
    valid = (idx >= 0) & (idx < num_steps)
    row = coef_ptr + tl.where(valid, idx, 0) * _LEN

    x0 = _affine(row + _P, valid, x, m, n, s0, s1, s2, s3, s4, x, NUM_SLOTS, False)
    # Clipping is a runtime value (+-inf bounds when off): two min/max cost nothing here. NaN must
    # propagate as in torch.clamp; the GPU's default min/max would return the other operand.
    x0 = tl.minimum(tl.maximum(x0, clip_lo, propagate_nan=tl.PropagateNan.ALL), clip_hi,
                    propagate_nan=tl.PropagateNan.ALL)
    out = _affine(row + _O, valid, x, m, n, s0, s1, s2, s3, s4, x0, NUM_SLOTS, True)
    tl.store(out_ptr + start + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    # A runtime flag: a store masked off costs no memory traffic, and it halves the configs.
    tl.store(x0_ptr + start + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask & (write_x0 != 0))
    # The new slots, from the old values already in registers; W_j = 0 leaves slot j untouched.
    for j in tl.static_range(NUM_SLOTS):
        w = tl.load(row + _W + j, mask=valid, other=float("nan"))
        s = _affine(row + _S + j * (_NV + 1), valid, x, m, n, s0, s1, s2, s3, s4, x0,
                    NUM_SLOTS, True)
        tl.store(state_ptr + j * stride + start + offs, s.to(state_ptr.dtype.element_ty),
                 mask=tl.where(w != 0, mask, False))  # (mask & (w != 0) fails interpreted)


def _config(dtype, num_slots, index_dtype=torch.int64):
    """The configuration a call runs with: the launcher's only source of launch parameters.

    The signature is the one Triton's JIT picks for ordinary inputs (numel < 2**31). Prebuilt,
    it assumes 16-byte aligned pointers and numel % 16 == 0, as the JIT specializes them, so the
    cubin has the JIT's vectorized code; prebuilt_configs() adds a variant for any numel.
    """
    t = "*" + _TL_DTYPES[dtype]
    signature = {"mo_ptr": t, "x_ptr": t, "noise_ptr": t, "state_ptr": t, "coef_ptr": "*fp32",
                 "idx_ptr": "*" + _TL_INDEX[index_dtype], "out_ptr": t, "x0_ptr": t,
                 "numel": "i32", "num_steps": "i32", "guidance": "fp32", "clip_lo": "fp32",
                 "clip_hi": "fp32", "guided": "i32", "has_noise": "i32", "write_x0": "i32"}
    constexprs = {"NUM_SLOTS": int(num_slots), "BLOCK": BLOCK}
    cfg = {"fn": denoise_step, "signature": signature, "constexprs": constexprs,
           "num_warps": FIVE_SLOT_WARPS if num_slots > 4 else NUM_WARPS,
           "num_stages": NUM_STAGES}
    return variant(cfg, _vector_pointers(cfg) + ("numel",))


def _vector_pointers(cfg):
    """The pointers whose alignment the vectorized code uses: all but idx_ptr, whose one element
    is read alone, and which is often an element of an index table (idx[i], 8 bytes into it:
    the H200's first run refused the prebuilt kernel for that)."""
    return tuple(p for p in pointers(cfg) if p != "idx_ptr")


def prebuilt_configs():
    """Every configuration the launcher can choose: dtype x index dtype x the number of state
    slots, 0..SLOTS (guidance, noise, clipping and write_x0 are runtime values), each assuming
    numel % 16 == 0 or not; neither assumes the step index aligned (_vector_pointers)."""
    return [v for dt in _TL_DTYPES for it in _TL_INDEX for k in range(SLOTS + 1)
            for c in [_config(dt, k, it)] for v in (c, variant(c, _vector_pointers(c)))]


def plan(model_output, sample, coeffs, step_index, noise, state, guidance_scale, clip_sample,
         clip_sample_range, write_x0, guided=None):
    """The launch of one sampler step, [(config, grid, args)], and its outputs.

    model_output: (N, ...) or, guided, (2N, ...) = [uncond; cond] (guided=None: guided when
    model_output has twice the batch of sample); sample, noise: (N, ...); state: (K, N, ...),
    1 <= K <= SLOTS, updated in place, or None; all contiguous, one dtype. coeffs: (S, ROW_LEN)
    float32; step_index: one-element int32/int64 tensor on the sample's device, never read on
    the host. Outputs: (next sample (N, ...), x0c (N, ...) or an empty tensor when write_x0 is
    False); NaN everywhere, state included, if step_index is not in [0, S).
    """
    out = torch.empty_like(sample)
    x0 = torch.empty_like(sample) if write_x0 else sample.new_empty(0)
    if sample.numel() == 0:
        return [], (out, x0)
    numel = sample.numel()
    if guided is None:
        guided = model_output.shape[0] == 2 * sample.shape[0]
    k = 0 if state is None else state.shape[0]
    cfg = _config(sample.dtype, k, step_index.dtype)
    r = float(clip_sample_range) if clip_sample else float("inf")
    # Absent inputs and x0 get a stand-in pointer that is never touched (masked off, or no slot
    # read) so that the argument types, hence the compiled kernel, stay the same.
    args = [model_output, sample, sample if noise is None else noise,
            sample if state is None else state, coeffs, step_index, out,
            x0 if write_x0 else out, numel, coeffs.shape[0], float(guidance_scale), -r, r,
            int(bool(guided)), int(noise is not None), int(bool(write_x0))]
    return [(cfg, (triton.cdiv(numel, BLOCK), 1, 1), args)], (out, x0)
