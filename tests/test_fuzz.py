"""Fuzzing the ops (issue 16): >= 1,000 random calls each, valid and invalid, on the CPU.

Each call is a random valid call (shapes from empty to odd, three dtypes, NCHW and
channels_last, optional tensors present or not, broadcast masks, state slots), then, for about
four in ten, one corruption drawn from a list whose exception type is known. A valid call must
return what the float64 reference returns (within a tolerance set by the dtype, relative to the
reference's scale); an invalid one must raise ValueError or TypeError, never anything else
(no RuntimeError from deep inside, no crash) and never return. Seeded: the same calls every
run; the whole file takes a few seconds.
"""
import math

import numpy as np
import pytest
import torch

from fastdiff import ops, reference
from fastdiff.schedules import NUM_V, ROW_LEN, ROW_O, ROW_P, ROW_S, ROW_W, SLOTS

CALLS = 1000
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _close(out, ref, dtype, what):
    out = out.detach().double()
    ref = ref.detach().double()
    assert out.shape == ref.shape, what
    if ref.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    scale = max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: error {err:.3g} (scale {scale:.3g})"


def _run(rng, make, corruptions, check):
    """CALLS calls: make(rng) -> (kwargs, call, dtype); a corruption, or none, then the check."""
    bad = 0
    for i in range(CALLS):
        kw, dtype = make(rng)
        name = None
        if rng.random() < 0.4:
            name, (corrupt, exc) = list(corruptions.items())[rng.integers(len(corruptions))]
            corrupt(kw, rng)
        what = f"call {i} ({name or 'valid'})"
        if name is None:
            check(kw, dtype, what)
        else:
            bad += 1
            try:
                check(kw, dtype, what, expect_error=True)
            except (ValueError, TypeError) as err:
                assert isinstance(err, exc), f"{what}: {type(err).__name__}: {err}"
            else:
                pytest.fail(f"{what}: no error for an invalid call")
    assert 200 < bad < 800


# ---------------------------------------------------------------- group_norm_silu

def _gn_make(rng):
    dtype = DTYPES[rng.integers(3)]
    G = int(rng.integers(1, 5))
    N, C = int(rng.integers(0, 3)), G * int(rng.integers(1, 4))
    H, W = int(rng.integers(1, 7)), int(rng.integers(1, 7))
    x = (torch.randn(N, C, H, W) * float(rng.choice([1.0, 3.0])) + float(rng.choice([0.0, 5.0])))
    x = x.to(dtype)
    if rng.random() < 0.5:
        x = x.to(memory_format=torch.channels_last)
    small = lambda *s: torch.randn(*s).to(dtype if rng.random() < 0.5 else torch.float32)  # noqa: E731
    kw = dict(x=x, num_groups=G, weight=small(C) if rng.random() < 0.7 else None,
              bias=small(C) if rng.random() < 0.7 else None, eps=float(rng.choice([1e-5, 1e-3])),
              pre_bias=small(N, C) if rng.random() < 0.3 else None,
              scale=small(N, C) * 0.3 if rng.random() < 0.3 else None,
              silu=bool(rng.random() < 0.7), channels_last_out=bool(rng.random() < 0.3))
    if kw["scale"] is not None:
        kw["shift"] = small(N, C)
    return kw, dtype


GN_BAD = {
    "groups not dividing C": (lambda kw, r: kw.update(num_groups=kw["x"].shape[1] + 1), ValueError),
    "groups 0": (lambda kw, r: kw.update(num_groups=0), ValueError),
    "groups float": (lambda kw, r: kw.update(num_groups=2.0), TypeError),
    "eps nan": (lambda kw, r: kw.update(eps=float("nan")), ValueError),
    "eps 1e-50": (lambda kw, r: kw.update(eps=1e-50), ValueError),
    "x 3-D": (lambda kw, r: kw.update(x=kw["x"][:, :, 0]), ValueError),
    "x float64": (lambda kw, r: kw.update(x=kw["x"].double()), ValueError),
    "x int": (lambda kw, r: kw.update(x=kw["x"].to(torch.int32)), ValueError),
    "x list": (lambda kw, r: kw.update(x=kw["x"].tolist()), TypeError),
    "weight wrong size": (lambda kw, r: kw.update(weight=torch.randn(kw["x"].shape[1] + 1)),
                          ValueError),
    "bias float64": (lambda kw, r: kw.update(bias=torch.randn(kw["x"].shape[1]).double()),
                     ValueError),
    "weight list": (lambda kw, r: kw.update(weight=[1.0]), TypeError),
    "channels_last_out int": (lambda kw, r: kw.update(channels_last_out=1), TypeError),
    "pre_bias wrong batch": (lambda kw, r: kw.update(pre_bias=torch.randn(kw["x"].shape[0] + 1,
                                                                          kw["x"].shape[1])),
                             ValueError),
}


def _gn_check(kw, dtype, what, expect_error=False):
    out = ops.group_norm_silu(**kw)
    if expect_error:
        return
    x = kw["x"]
    want = (torch.empty(x.shape, memory_format=torch.channels_last).stride()
            if kw["channels_last_out"] else x.stride())
    assert out.stride() == want, what
    if x.numel() == 0:
        assert out.shape == x.shape and out.dtype == dtype, what
        return
    r = lambda t: None if t is None else t.reshape(t.shape[0], -1)  # noqa: E731
    ref = reference.group_norm_silu(x.double(), kw["num_groups"], kw["weight"], kw["bias"],
                                    kw["eps"], r(kw["pre_bias"]), r(kw["scale"]),
                                    r(kw.get("shift")), kw["silu"])
    assert out.dtype == dtype, what
    _close(out, ref, dtype, what)


def test_group_norm_silu_fuzz():
    _run(np.random.default_rng(16), _gn_make, GN_BAD, _gn_check)


# ---------------------------------------------------------------- attention

def _attn_make(rng):
    dtype = DTYPES[rng.integers(3)]
    B, H = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    Lq, Lk = int(rng.integers(1, 10)), int(rng.integers(1, 10))
    D = int(rng.choice([1, 3, 8, 16, 24, 40, 64]))
    q, k, v = (torch.randn(B, H, n, D).to(dtype) for n in (Lq, Lk, Lk))
    mask = None
    u = rng.random()
    if u < 0.25:                                   # boolean, True = attend (some key kept)
        mask = torch.rand(B, 1, 1, Lk) < 0.7
        mask[..., 0] = True
    elif u < 0.5:                                  # additive, broadcast over heads
        mask = torch.randn(1, H, Lq, Lk).to(dtype if rng.random() < 0.5 else torch.float32)
    scale = None if rng.random() < 0.6 else float(rng.uniform(0.05, 1.0))
    return dict(q=q, k=k, v=v, attn_mask=mask, scale=scale), dtype


ATTN_BAD = {
    "head dims differ": (lambda kw, r: kw.update(v=torch.randn(*kw["v"].shape[:3],
                                                               kw["v"].shape[3] + 1)
                                                 .to(kw["q"].dtype)), ValueError),
    "k and v lengths differ": (lambda kw, r: kw.update(v=torch.cat([kw["v"], kw["v"]], 2)),
                               ValueError),
    "batch differs": (lambda kw, r: kw.update(k=torch.cat([kw["k"], kw["k"]], 0)), ValueError),
    "q 3-D": (lambda kw, r: kw.update(q=kw["q"][0]), ValueError),
    "k float64": (lambda kw, r: kw.update(k=kw["k"].double()), ValueError),
    "v other dtype": (lambda kw, r: kw.update(
        v=kw["v"].to(torch.float16 if kw["q"].dtype != torch.float16 else torch.float32)),
        ValueError),
    "mask not broadcastable": (lambda kw, r: kw.update(
        attn_mask=torch.zeros(1, 1, 1, kw["k"].shape[2] + 1)), ValueError),
    "mask uint8": (lambda kw, r: kw.update(attn_mask=torch.zeros(1, 1, 1, kw["k"].shape[2],
                                                                  dtype=torch.uint8)),
                   ValueError),
    "scale negative": (lambda kw, r: kw.update(scale=-0.5), ValueError),
    "scale 1e39": (lambda kw, r: kw.update(scale=1e39), ValueError),
    "scale str": (lambda kw, r: kw.update(scale="0.1"), TypeError),
    "q list": (lambda kw, r: kw.update(q=kw["q"].tolist()), TypeError),
    "head dim 300": (lambda kw, r: kw.update(**{n: torch.randn(1, 1, 2, 300) for n in "qkv"},
                                             attn_mask=None), ValueError),
}


def _attn_check(kw, dtype, what, expect_error=False):
    out = ops.attention(**kw)
    if expect_error:
        return
    m = kw["attn_mask"]
    if m is not None and m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=torch.float64).masked_fill(~m, float("-inf"))
    ref = reference.attention(kw["q"], kw["k"], kw["v"], m, kw["scale"])
    assert out.dtype == dtype, what
    _close(out, ref, dtype, what)


def test_attention_fuzz():
    _run(np.random.default_rng(17), _attn_make, ATTN_BAD, _attn_check)


# ---------------------------------------------------------------- denoise_step

def _row(rng, k):
    """A random version-2 row that uses k slots (absent slots' columns zero)."""
    row = np.zeros(ROW_LEN)
    nv = 3 + k
    row[ROW_P:ROW_P + nv] = rng.normal(size=nv) * 0.5
    row[ROW_O:ROW_O + nv] = rng.normal(size=nv) * 0.5
    row[ROW_O + NUM_V] = rng.normal() * 0.5
    for j in range(k):
        if rng.random() < 0.6:
            row[ROW_W + j] = 1.0
            base = ROW_S + j * (NUM_V + 1)
            row[base:base + nv] = rng.normal(size=nv) * 0.5
            row[base + NUM_V] = rng.normal() * 0.5
    return row


def _step_make(rng):
    dtype = DTYPES[rng.integers(3)]
    N = int(rng.integers(0, 3))
    shape = (N, *[int(s) for s in rng.integers(1, 6, size=int(rng.integers(1, 4)))])
    guided = bool(rng.random() < 0.5)
    k = int(rng.integers(0, SLOTS + 1))
    S = int(rng.integers(1, 5))
    coeffs = torch.tensor(np.stack([_row(rng, k) for _ in range(S)]), dtype=torch.float32)
    kw = dict(model_output=torch.randn(2 * N if guided else N, *shape[1:]).to(dtype),
              sample=torch.randn(shape).to(dtype), coeffs=coeffs,
              step_index=torch.tensor(int(rng.integers(0, S)),
                                      dtype=torch.int64 if rng.random() < 0.5 else torch.int32),
              noise=torch.randn(shape).to(dtype) if rng.random() < 0.5 else None,
              state=torch.randn(k, *shape).to(dtype) if k else None,
              guidance_scale=float(rng.uniform(1.0, 9.0)) if guided else 1.0,
              clip_sample=bool(rng.random() < 0.3), clip_sample_range=float(rng.uniform(0.5, 2)),
              # None infers it from the batches; an empty batch says nothing: say it
              write_x0=True, guided=guided if N == 0 or rng.random() < 0.5 else None)
    return kw, dtype


def _set_row_of_absent_slot(kw, r):
    k = 0 if kw["state"] is None else kw["state"].shape[0]
    if k < SLOTS:
        kw["coeffs"][:, ROW_P + 3 + k] = 1.0     # reads slot k, which is not passed
    else:
        kw["state"] = kw["state"][:-1]
        kw["coeffs"][:, ROW_P + 3 + SLOTS - 1] = 1.0


STEP_BAD = {
    "index out of range": (lambda kw, r: kw.update(step_index=torch.tensor(kw["coeffs"].shape[0])),
                           ValueError),
    "index negative": (lambda kw, r: kw.update(step_index=torch.tensor(-1)), ValueError),
    "index int": (lambda kw, r: kw.update(step_index=0), TypeError),
    "coeffs 8 columns": (lambda kw, r: kw.update(coeffs=torch.zeros(2, 8)), ValueError),
    "coeffs float64": (lambda kw, r: kw.update(coeffs=kw["coeffs"].double()), ValueError),
    "noise wrong shape": (lambda kw, r: kw.update(noise=torch.randn(3, 2).to(kw["sample"].dtype)),
                          ValueError),
    "noise other dtype": (lambda kw, r: kw.update(noise=kw["sample"].double()), ValueError),
    "model output batch 2N+1": (lambda kw, r: kw.update(model_output=torch.randn(
        2 * kw["sample"].shape[0] + 1, *kw["sample"].shape[1:]).to(kw["sample"].dtype),
        guided=None), ValueError),
    "guidance 1e38": (lambda kw, r: kw.update(model_output=torch.cat([kw["sample"]] * 2),
                                              guided=True, guidance_scale=1e38), ValueError),
    "guidance nan": (lambda kw, r: kw.update(model_output=torch.cat([kw["sample"]] * 2),
                                             guided=True, guidance_scale=float("nan")),
                     ValueError),
    "clip range 0": (lambda kw, r: kw.update(clip_sample=True, clip_sample_range=0.0),
                     ValueError),
    "state SLOTS + 1 slots": (lambda kw, r: kw.update(
        state=torch.zeros(SLOTS + 1, *kw["sample"].shape).to(kw["sample"].dtype)), ValueError),
    "state is the sample": (lambda kw, r: kw.update(
        state=kw["sample"].unsqueeze(0) if kw["sample"].numel()             # shares its memory
        else torch.zeros(SLOTS + 1, *kw["sample"].shape).to(kw["sample"].dtype)),  # (empty)
        ValueError),
    "row reads an absent slot": (_set_row_of_absent_slot, ValueError),
    "sample list": (lambda kw, r: kw.update(sample=kw["sample"].tolist()), TypeError),
}


def _step_check(kw, dtype, what, expect_error=False):
    state0 = None if kw["state"] is None else kw["state"].clone()
    out, x0 = ops.denoise_step(**{k: v for k, v in kw.items()})
    if expect_error:
        return
    r_out, r_x0, r_state = reference.denoise_step_v2(
        kw["model_output"], kw["sample"], kw["coeffs"], kw["step_index"], kw["noise"], state0,
        kw["guidance_scale"], kw["clip_sample"], kw["clip_sample_range"], kw["guided"])
    _close(out, r_out, dtype, what + " out")
    _close(x0, r_x0, dtype, what + " x0")
    if state0 is not None:
        _close(kw["state"], r_state, dtype, what + " state")


def test_denoise_step_fuzz():
    _run(np.random.default_rng(18), _step_make, STEP_BAD, _step_check)


# ---------------------------------------------------------------- geglu

def _geglu_make(rng):
    dtype = DTYPES[rng.integers(3)]
    lead = [int(rng.integers(0, 4)) for _ in range(int(rng.integers(0, 3)))]
    F = int(rng.choice([1, 3, 8, 13, 64, 1030]))
    return dict(x=(torch.randn(*lead, 2 * F) * 3).to(dtype)), dtype


GEGLU_BAD = {
    "odd last dim": (lambda kw, r: kw.update(x=kw["x"][..., :-1]), ValueError),
    "x 0-d": (lambda kw, r: kw.update(x=torch.tensor(1.0)), ValueError),
    "x float64": (lambda kw, r: kw.update(x=kw["x"].double()), ValueError),
    "x int": (lambda kw, r: kw.update(x=kw["x"].to(torch.int32)), ValueError),
    "x list": (lambda kw, r: kw.update(x=kw["x"].tolist()), TypeError),
    "x None": (lambda kw, r: kw.update(x=None), TypeError),
}


def _geglu_check(kw, dtype, what, expect_error=False):
    out = ops.geglu(**kw)
    if expect_error:
        return
    assert out.dtype == dtype, what
    _close(out, reference.geglu(kw["x"]), dtype, what)


def test_geglu_fuzz():
    _run(np.random.default_rng(19), _geglu_make, GEGLU_BAD, _geglu_check)


# ---------------------------------------------------------------- add_layer_norm

def _aln_make(rng):
    dtype = DTYPES[rng.integers(3)]
    lead = [int(rng.integers(0, 4)) for _ in range(int(rng.integers(1, 3)))]
    C = int(rng.choice([1, 2, 7, 40, 320, 1030]))
    x = (torch.randn(*lead, C) * 2 + float(rng.choice([0.0, 5.0]))).to(dtype)
    affine = rng.random() < 0.7
    kw = dict(x=x, residual=torch.randn(*lead, C).to(dtype),
              weight=torch.randn(C).to(dtype) if affine else None,
              bias=torch.randn(C).to(dtype) if affine and rng.random() < 0.8 else None,
              eps=float(rng.choice([1e-5, 1e-6, 1e-3])),
              next_bias=torch.randn(C).to(dtype) if rng.random() < 0.5 else None)
    return kw, dtype


ALN_BAD = {
    "residual wrong shape": (lambda kw, r: kw.update(residual=kw["residual"][..., :-1]),
                             ValueError),
    "residual other dtype": (lambda kw, r: kw.update(
        residual=kw["residual"].to(torch.float16 if kw["x"].dtype != torch.float16
                                   else torch.float32)), ValueError),
    "weight wrong size": (lambda kw, r: kw.update(weight=torch.randn(kw["x"].shape[-1] + 1)
                                                  .to(kw["x"].dtype)), ValueError),
    "bias float64": (lambda kw, r: kw.update(bias=torch.randn(kw["x"].shape[-1]).double()),
                     ValueError),
    "next_bias wrong size": (lambda kw, r: kw.update(next_bias=torch.randn(kw["x"].shape[-1] + 1)
                                                     .to(kw["x"].dtype)), ValueError),
    "next_bias float64": (lambda kw, r: kw.update(next_bias=torch.randn(kw["x"].shape[-1])
                                                  .double()), ValueError),
    "eps negative": (lambda kw, r: kw.update(eps=-1e-5), ValueError),
    "eps string": (lambda kw, r: kw.update(eps="1e-5"), TypeError),
    "x int": (lambda kw, r: kw.update(x=kw["x"].to(torch.int32)), ValueError),
    "residual list": (lambda kw, r: kw.update(residual=kw["residual"].tolist()), TypeError),
}


def _aln_check(kw, dtype, what, expect_error=False):
    h, y = ops.add_layer_norm(**kw)
    if expect_error:
        return
    r_h, r_y = reference.add_layer_norm(kw["x"], kw["residual"], kw["weight"], kw["bias"],
                                        kw["eps"], kw["next_bias"])
    assert h.dtype == y.dtype == dtype, what
    assert torch.equal(h, r_h), what + ": h is not (x + residual) + next_bias as eager rounds it"
    _close(y, r_y, dtype, what)


def test_add_layer_norm_fuzz():
    _run(np.random.default_rng(20), _aln_make, ALN_BAD, _aln_check)


def test_fuzz_sizes_are_what_the_issue_asks():
    assert CALLS >= 1000 and math.isfinite(TOL[torch.float32])
