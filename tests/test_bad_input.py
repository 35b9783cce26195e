"""Every argument check of the ops: a clear ValueError naming the argument.

The checks live in csrc/<op>.cpp and run before any kernel on every backend (CPU, CUDA, and the
Meta kernels that torch.compile uses), so they are exercised here through the CPU dispatcher,
the Meta dispatcher, and the check functions the CUDA path calls.
"""
import functools

import pytest
import torch

import fastdiff  # noqa: F401
from fastdiff import ops
from fastdiff.schedules import ROW_LEN

# The quick CPU subset tests/test_wheel.py runs in a fresh install of the wheel.
pytestmark = pytest.mark.quick

gn = torch.ops.fastdiff.group_norm_silu
attn = torch.ops.fastdiff.attention
step = torch.ops.fastdiff.denoise_step
geglu = torch.ops.fastdiff.geglu
aln = torch.ops.fastdiff.add_layer_norm
lgeglu = torch.ops.fastdiff.linear_geglu
gnr = torch.ops.fastdiff.group_norm_silu_residual
lnlin = torch.ops.fastdiff.layer_norm_linear


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def gn_args(**over):
    a = dict(x=_x(2, 8, 3, 3), num_groups=4, weight=_x(8), bias=_x(8), eps=1e-5, pre_bias=None,
             scale=None, shift=None, apply_silu=True)
    a.update(over)
    return list(a.values())


GN_BAD = [
    # (overrides, message fragment) - one per check in check_group_norm_silu
    ({"x": _x(2, 8, 9)}, "'x' must be a 4-D tensor"),
    ({"x": _x(2, 8, 3, 3, dtype=torch.float64)}, "'x' must have dtype float32, float16 or bfloat16"),
    ({"x": _x(2, 8, 3, 6)[..., ::2]}, "'x' must be contiguous \\(NCHW\\) or channels_last"),
    ({"num_groups": 0}, "'num_groups' must be positive"),
    ({"num_groups": 3}, "C=8 of argument 'x' must be divisible by argument 'num_groups'=3"),
    ({"eps": float("nan")}, "'eps' must be 0 or within float32's normal range"),
    ({"eps": 1e-50}, "'eps' must be 0 or within float32's normal range .* got 1e-50"),
    ({"eps": -1e-5}, "'eps' must be 0 or within float32's normal range"),
    ({"weight": _x(7)}, "'weight' must have shape \\[8\\]"),
    ({"bias": _x(8, dtype=torch.float16)}, "'bias' must have dtype float32 \\(as x\\), got float16"),
    ({"pre_bias": _x(2, 8, 2)[..., 0]}, "'pre_bias' must be contiguous"),
    ({"scale": _x(1, 8)}, "'scale' must have shape \\[2, 8\\]"),
    ({"shift": _x(2, 4)}, "'shift' must have shape \\[2, 8\\]"),
    ({"weight": torch.randn(8, device="meta")}, "'weight' must be on the same device as 'x'"),
]


def attn_args(**over):
    a = dict(q=_x(2, 3, 5, 8), k=_x(2, 3, 7, 8), v=_x(2, 3, 7, 8), attn_mask=None, scale=None)
    a.update(over)
    return list(a.values())


ATTN_BAD = [
    ({"q": _x(2, 5, 8)}, "'q' must be a 4-D tensor"),
    ({"k": _x(2, 3, 7, 8, dtype=torch.float64)}, "'k' must have dtype float32, float16"),
    ({"v": _x(2, 3, 7, 8, dtype=torch.float16)}, "'v' must have the dtype of 'q'"),
    ({"k": torch.randn(2, 3, 7, 8, device="meta")}, "'k' must be on the same device as 'q'"),
    ({"q": _x(2, 3, 8, 5).transpose(-1, -2)}, "'q' must have stride 1 in its last dimension"),
    ({"k": _x(1, 3, 7, 8)}, "must share the batch size"),
    ({"v": _x(2, 2, 7, 8)}, "must share the head count"),
    ({"v": _x(2, 3, 7, 6)}, "must share the head dim"),
    ({"v": _x(2, 3, 6, 8)}, "'k' and 'v' must have the same length"),
    ({"q": _x(1, 1, 2, 300), "k": _x(1, 1, 2, 300), "v": _x(1, 1, 2, 300)},
     "head dim \\(dim 3 of 'q'\\) must be in \\[1, 256\\], got 300"),
    ({"k": _x(2, 3, 0, 8), "v": _x(2, 3, 0, 8)}, "'k' must have at least one key"),
    ({"attn_mask": torch.zeros(2, 1, 1, 7, dtype=torch.bool)}, "'attn_mask' must be an additive mask"),
    ({"attn_mask": _x(2, 1, 7)}, "'attn_mask' must be 4-D and broadcastable"),
    ({"attn_mask": _x(2, 1, 1, 6)}, "'attn_mask' must be 4-D and broadcastable"),
    ({"attn_mask": torch.zeros(2, 1, 1, 7, device="meta")}, "'attn_mask' must be on the same device"),
    ({"scale": -1.0}, "'scale' must be positive and, times log2\\(e\\), within float32"),
    ({"scale": 1e39}, "'scale' must be positive .* got 1e\\+39"),
    ({"scale": 1e-50}, "'scale' must be positive .* \\(it is used in float32\\)"),
    ({"attn_mask": torch.zeros(2, 1, 1, 7, dtype=torch.uint8)}, "got uint8"),
    ({"q": _x(2, 3, 5, 8).to(torch.complex64)}, "'q' must have dtype float32, float16 or bfloat16, got complex64"),
]


def step_args(**over):
    c = torch.zeros(4, ROW_LEN)
    a = dict(model_output=_x(2, 3, 4), sample=_x(2, 3, 4), coeffs=c, step_index=torch.tensor(1),
             noise=None, state=None, guidance_scale=1.0, clip_sample=False,
             clip_sample_range=1.0, write_x0=False)
    a.update(over)
    return list(a.values())


STEP_BAD = [
    ({"sample": torch.tensor(1.0), "model_output": torch.tensor(1.0)}, "'sample' must have a batch"),
    ({"sample": _x(2, 3, 4, dtype=torch.float64)}, "'sample' must have dtype float32"),
    ({"sample": _x(2, 4, 3).transpose(1, 2)}, "'sample' must be contiguous"),
    ({"model_output": torch.randn(2, 3, 4, device="meta")}, "'model_output' must be on the same"),
    ({"model_output": _x(2, 3, 4, dtype=torch.float16)}, "'model_output' must have the dtype"),
    ({"model_output": _x(2, 4, 3).transpose(1, 2)}, "'model_output' must be contiguous"),
    ({"model_output": _x(3, 3, 4)}, "'model_output' must have the shape of 'sample'"),
    ({"model_output": _x(4, 3, 5)}, "'model_output' must have the shape of 'sample'"),
    ({"guidance_scale": float("inf"), "model_output": _x(4, 3, 4)}, "'guidance_scale' must be finite"),
    ({"guidance_scale": 7.5}, "'guidance_scale'=7.5 needs 'model_output' with batch 2\\*N=4"),
    ({"noise": _x(2, 3, 5)}, "'noise' must have the shape of 'sample'"),
    ({"noise": _x(2, 3, 4, dtype=torch.float16)}, "'noise' must have the dtype of 'sample'"),
    ({"noise": _x(2, 4, 3).transpose(1, 2)}, "'noise' must be contiguous"),
    ({"noise": torch.randn(2, 3, 4, device="meta")}, "'noise' must be on the same device"),
    ({"state": _x(2, 3, 4)}, "'state' must have shape \\(K, \\*sample.shape\\) = "
                             "\\(K, 2, 3, 4\\), got \\[2, 3, 4\\]"),
    ({"state": _x(1, 2, 3, 5)}, "'state' must have shape \\(K, \\*sample.shape\\)"),
    ({"state": _x(6, 2, 3, 4)}, "'state' must hold 1 to 5 slots .*got 6"),
    ({"state": _x(0, 2, 3, 4)}, "'state' must hold 1 to 5 slots .*got 0"),
    ({"state": _x(1, 2, 3, 4, dtype=torch.float16)}, "'state' must have the dtype of 'sample'"),
    ({"state": _x(1, 2, 4, 3).transpose(2, 3)}, "'state' must be contiguous"),
    ({"state": torch.randn(1, 2, 3, 4, device="meta")}, "'state' must be on the same device"),
    ({"coeffs": torch.zeros(4, 8)},
     f"'coeffs' must have shape \\(num_steps, {ROW_LEN}\\) \\(fastdiff.schedules' version-2"),
    ({"coeffs": torch.zeros(4, ROW_LEN, dtype=torch.float64)}, "'coeffs' must have dtype float32"),
    ({"coeffs": torch.zeros(ROW_LEN, 4).t()}, "'coeffs' must be contiguous"),
    ({"coeffs": torch.zeros(4, ROW_LEN, device="meta")}, "'coeffs' must be on the same device"),
    ({"step_index": torch.tensor(1.0)}, "'step_index' must be an int64 or int32 tensor"),
    ({"step_index": torch.tensor([1, 2])}, "'step_index' must hold one element"),
    ({"step_index": torch.tensor(1, device="meta")}, "'step_index' must be on the same device"),
    ({"clip_sample": True, "clip_sample_range": 0.0}, "'clip_sample_range' must be positive and finite"),
    ({"clip_sample": True, "clip_sample_range": 1e39}, "'clip_sample_range' must be positive and finite in float32"),
    ({"guidance_scale": 1e38, "model_output": _x(4, 3, 4)}, "'guidance_scale' must be finite and within \\[-1e6, 1e6\\]"),
]


GEGLU_BAD = [
    # (x, message fragment) - one per check in csrc/geglu.cpp
    (torch.tensor(1.0), "'x' must have a last dimension \\(..., 2F\\), got a 0-d tensor"),
    (_x(3, 4, dtype=torch.float64), "'x' must have dtype float32, float16 or bfloat16, got fl"),
    (torch.ones(3, 4, dtype=torch.int32), "'x' must have dtype float32, float16 .* got int32"),
    (_x(3, 5), "'x' must have an even last dimension \\(..., 2F\\).* got shape \\[3, 5\\]"),
    (_x(4, 6).t(), "'x' must be contiguous, got strides \\[1, 6\\]"),
    (_x(3, 8)[:, ::2], "'x' must be contiguous"),
]


def lgeglu_args(**over):
    a = dict(x=_x(2, 3, 8), weight=_x(2 * 5, 8), bias=_x(2 * 5))
    a.update(over)
    return list(a.values())


LGEGLU_BAD = [
    # (overrides, message fragment) - one per check in csrc/linear_geglu.cpp
    ({"x": torch.tensor(1.0)}, "'x' must have a last dimension \\(..., K\\), got a 0-d"),
    ({"x": _x(2, 8, dtype=torch.float64)}, "'x' must have dtype float32, float16 or bfloat16"),
    ({"x": _x(3, 0)}, "'x' must have a last dimension K >= 1, got shape \\[3, 0\\]"),
    ({"x": _x(8, 3).t()}, "'x' must be contiguous, got strides \\[1, 3\\]"),
    ({"weight": _x(10)}, "'weight' must have shape \\(2F, K\\) .* got shape \\[10\\]"),
    ({"weight": _x(9, 8)}, "'weight' must have shape \\(2F, K\\) .* got shape \\[9, 8\\]"),
    ({"weight": _x(0, 8)}, "'weight' must have shape \\(2F, K\\) with F >= 1"),
    ({"weight": _x(10, 7)}, "'weight' must have shape .*K = x.shape\\[-1\\] = 8"),
    ({"weight": _x(10, 8, dtype=torch.float16)}, "'weight' must have x's dtype \\(float32\\)"),
    ({"weight": _x(8, 10).t()}, "'weight' must be contiguous \\(nn.Linear's"),
    ({"weight": torch.randn(10, 8, device="meta")}, "'weight' must be on the same device as 'x'"),
    ({"bias": _x(8)}, "'bias' must have shape \\(10,\\) \\(weight's rows\\), got shape \\[8\\]"),
    ({"bias": _x(10, dtype=torch.bfloat16)}, "'bias' must have x's dtype \\(float32\\), got bf"),
    ({"bias": _x(20)[::2]}, "'bias' must be contiguous"),
    ({"bias": torch.randn(10, device="meta")}, "'bias' must be on the same device as 'x'"),
]


def lnlin_args(**over):
    a = dict(x=_x(2, 3, 8), weight=_x(6, 8), fold=_x(3, 6), shift=_x(8), eps=1e-5, geglu=True)
    a.update(over)
    return list(a.values())


LNLIN_BAD = [
    # (overrides, message fragment) - one per check in csrc/layer_norm_linear.cpp
    ({"x": torch.tensor(1.0)}, "'x' must have a last dimension \\(..., K\\), got a 0-d"),
    ({"x": _x(2, 8, dtype=torch.float64)}, "'x' must have dtype float32, float16 or bfloat16"),
    ({"x": _x(3, 0)}, "'x' must have a last dimension K >= 1, got shape \\[3, 0\\]"),
    ({"x": _x(8, 3).t()}, "'x' must be contiguous, got strides \\[1, 3\\]"),
    ({"weight": _x(6)}, "'weight' must have shape \\(N, K\\) .* got shape \\[6\\]"),
    ({"weight": _x(0, 8)}, "'weight' must have shape \\(N, K\\) with N >= 1"),
    ({"weight": _x(6, 7)}, "'weight' must have shape .*K = x.shape\\[-1\\] = 8"),
    ({"weight": _x(6, 8, dtype=torch.float16)}, "'weight' must have x's dtype \\(float32\\)"),
    ({"weight": _x(8, 6).t()}, "'weight' must be contiguous \\(nn.Linear's"),
    ({"weight": torch.randn(6, 8, device="meta")}, "'weight' must be on the same device as 'x'"),
    ({"weight": _x(5, 8), "fold": _x(3, 5)}, "'geglu'=True needs an even number of weight rows "
     "N \\(value rows, then gate rows\\), got N = 5"),
    ({"fold": _x(2, 6)}, "'fold' must have shape \\(3, N\\) = \\[3, 6\\] .* got shape \\[2, 6\\]"),
    ({"fold": _x(18)}, "'fold' must have shape \\(3, N\\)"),
    ({"fold": _x(3, 6, dtype=torch.float16)}, "'fold' must have dtype float32, got float16"),
    ({"fold": _x(6, 3).t()}, "'fold' must be contiguous"),
    ({"fold": torch.randn(3, 6, device="meta")}, "'fold' must be on the same device as 'x'"),
    ({"shift": _x(7)}, "'shift' must have shape \\(K,\\) = \\[8\\]"),
    ({"shift": _x(8, dtype=torch.bfloat16)}, "'shift' must have dtype float32, got bfloat16"),
    ({"shift": _x(16)[::2]}, "'shift' must be contiguous"),
    ({"shift": torch.randn(8, device="meta")}, "'shift' must be on the same device as 'x'"),
    ({"eps": -1.0}, "'eps' must be 0 or within float32's normal range"),
    ({"eps": float("nan")}, "'eps' must be 0 or within float32's normal range"),
]


def aln_args(**over):
    a = dict(x=_x(2, 3, 8), residual=_x(2, 3, 8), weight=_x(8), bias=_x(8), eps=1e-5,
             next_bias=None)
    a.update(over)
    return list(a.values())


ALN_BAD = [
    # (overrides, message fragment) - one per check in csrc/add_layer_norm.cpp
    ({"x": torch.tensor(1.0), "residual": torch.tensor(1.0)}, "'x' must have a last dimension"),
    ({"x": _x(2, 3, 8, dtype=torch.float64)}, "'x' must have dtype float32, float16 or bf"),
    ({"x": _x(2, 8, 3).transpose(1, 2)}, "'x' must be contiguous"),
    ({"residual": _x(2, 3, 7)}, "'residual' must have the shape of 'x' \\[2, 3, 8\\]"),
    ({"residual": _x(2, 3, 8, dtype=torch.float16)}, "'residual' must have the dtype of 'x'"),
    ({"residual": _x(2, 8, 3).transpose(1, 2)}, "'residual' must be contiguous"),
    ({"residual": torch.randn(2, 3, 8, device="meta")}, "'residual' must be on the same device"),
    ({"eps": -1.0}, "'eps' must be 0 or within float32's normal range"),
    ({"eps": float("inf")}, "'eps' must be 0 or within float32's normal range"),
    ({"weight": _x(7)}, "'weight' must have shape \\[8\\] \\(the last dim of 'x'\\)"),
    ({"bias": _x(1, 8)}, "'bias' must have shape \\[8\\]"),
    ({"weight": _x(8, dtype=torch.float16)}, "'weight' must have the dtype of 'x' \\(float32\\)"),
    ({"bias": _x(16)[::2]}, "'bias' must be contiguous"),
    ({"weight": torch.randn(8, device="meta")}, "'weight' must be on the same device as 'x'"),
    ({"next_bias": _x(2, 8)}, "'next_bias' must have shape \\[8\\] \\(the last dim of 'x'\\)"),
    ({"next_bias": _x(9)}, "'next_bias' must have shape \\[8\\]"),
    ({"next_bias": _x(8, dtype=torch.bfloat16)},
     "'next_bias' must have the dtype of 'x' \\(float32\\), got bfloat16"),
    ({"next_bias": _x(16)[::2]}, "'next_bias' must be contiguous"),
    ({"next_bias": torch.randn(8, device="meta")},
     "'next_bias' must be on the same device as 'x'"),
]


def gnr_args(**over):
    a = dict(x=_x(2, 8, 3, 3), num_groups=4, weight=_x(8), bias=_x(8), eps=1e-5,
             residual_bias=_x(8), apply_silu=False, channels_last_out=True)
    a.update(over)
    return list(a.values())


GNR_BAD = [
    # (overrides, message fragment): group_norm_silu's checks under this op's name, and one per
    # check of residual_bias in csrc/group_norm_silu.cpp
    ({"x": _x(2, 8, 9)}, "group_norm_silu_residual: argument 'x' must be a 4-D tensor"),
    ({"x": _x(2, 8, 3, 6)[..., ::2]}, "_residual: argument 'x' must be contiguous \\(NCHW\\) or"),
    ({"num_groups": 3}, "_residual: the channel count C=8 of argument 'x' must be divisible"),
    ({"eps": -1.0}, "_residual: argument 'eps' must be 0 or within float32's normal range"),
    ({"weight": _x(7)}, "_residual: argument 'weight' must have shape \\[8\\]"),
    ({"bias": _x(16)[::2]}, "_residual: argument 'bias' must be contiguous"),
    ({"residual_bias": _x(7)}, "'residual_bias' must have shape \\[8\\] \\(the channels of 'x'\\)"),
    ({"residual_bias": _x(1, 8)}, "'residual_bias' must have shape \\[8\\]"),
    ({"residual_bias": _x(8, dtype=torch.float16)},
     "'residual_bias' must have the dtype of 'x' \\(float32\\), got float16"),
    ({"residual_bias": _x(16)[::2]}, "'residual_bias' must be contiguous"),
    ({"residual_bias": torch.randn(8, device="meta")},
     "'residual_bias' must be on the same device as 'x'"),
]


def _cases(bad):
    return [pytest.param(over, msg, id=msg.split("'")[1] if "'" in msg else msg[:20])
            for over, msg in bad]


def _all_paths(op, check, args, msg):
    """The CPU kernel, the Meta kernel (shape inference) and the check the CUDA path runs."""
    with pytest.raises(ValueError, match=msg):
        op(*args)
    meta = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
            if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a for a in args]
    if any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
        meta = args  # the device mismatch itself is the case: keep it
    with pytest.raises(ValueError, match=msg):
        op(*meta)
    with pytest.raises(ValueError, match=msg):
        check(*args)


@pytest.mark.parametrize("over,msg", _cases(GN_BAD))
def test_group_norm_silu_rejects(over, msg):
    _all_paths(gn, functools.partial(ops.check, "group_norm_silu"), gn_args(**over), msg)


@pytest.mark.parametrize("over,msg", _cases(GNR_BAD))
def test_group_norm_silu_residual_rejects(over, msg):
    _all_paths(gnr, functools.partial(ops.check, "group_norm_silu_residual"), gnr_args(**over),
               msg)


def test_group_norm_silu_residual_entry_point_rejects():
    """Python-side: kinds of value (TypeError naming the argument), no residual_bias, and the
    fusions this op does not take (pre_bias, scale, shift: group_norm_silu's)."""
    x, b = _x(2, 8, 3, 3), _x(8)
    for args, kw, msg in [
            ((x, 4, None, None, 1e-5, None), {}, "'residual_bias' must be a torch.Tensor .*None"),
            ((x, 4, None, None, 1e-5, [0.0] * 8), {}, "'residual_bias' must be a torch.Tensor"),
            ((x, 4.0, None, None, 1e-5, b), {}, "'num_groups' must be an int"),
            ((x, 4, None, None, 1e-5, b), {"silu": 1}, "'silu' must be a bool"),
            ((x, 4, None, None, 1e-5, b), {"channels_last_out": None},
             "'channels_last_out' must be a bool"),
            ((x, 4, None, None, 1e-5, b), {"pre_bias": _x(2, 8)}, "pre_bias"),
            ((x, 4, None, None, 1e-5, b), {"scale": _x(2, 8)}, "scale")]:
        with pytest.raises(TypeError, match=msg):
            ops.group_norm_silu_residual(*args, **kw)


@pytest.mark.parametrize("over,msg", _cases(ATTN_BAD))
def test_attention_rejects(over, msg):
    _all_paths(attn, functools.partial(ops.check, "attention"), attn_args(**over), msg)


@pytest.mark.parametrize("over,msg", _cases(STEP_BAD))
def test_denoise_step_rejects(over, msg):
    _all_paths(step, functools.partial(ops.check, "denoise_step"), step_args(**over), msg)


@pytest.mark.parametrize("mo_batch,guided", [(2, True), (4, False)])
def test_denoise_step_explicit_guided_must_match_the_batch(mo_batch, guided):
    """guided=True needs model_output = [uncond; cond] (batch 2N), guided=False batch N."""
    args = step_args(model_output=_x(mo_batch, 3, 4)) + [guided]
    msg = f"got \\[{mo_batch}, 3, 4\\] with guided={guided}"
    _all_paths(step, functools.partial(ops.check, "denoise_step"), args, msg)


@pytest.mark.parametrize("name", ["sample", "model_output", "noise", "coeffs"])
def test_denoise_step_state_must_not_alias_what_it_reads(name):
    """The state is written in place: sharing memory with an input (all of it, or part) would
    race on a GPU. Checked on the CPU op and in the check the CUDA path runs (a Meta tensor has
    no memory to share)."""
    base = _x(3, 2, 3, 4)
    over = {"noise": _x(2, 3, 4)}
    if name == "coeffs":
        over["coeffs"] = torch.zeros(4, ROW_LEN)
        over["state"] = over["coeffs"].view(-1)[:24].view(1, 2, 3, 4)  # part of the table
    else:
        over[name] = base[1]               # slot 0 of the state, or (model_output) slot 1
        over["state"] = base[1:3] if name != "model_output" else base[:2]
    args = step_args(**over)
    msg = f"argument 'state' must not share memory with '{name}' \\(it is written in place\\)"
    for run in (step, functools.partial(ops.check, "denoise_step")):
        with pytest.raises(ValueError, match=msg):
            run(*args)
    # a separate buffer of the same values is fine
    over["state"] = over["state"].clone()
    step(*step_args(**over))


@pytest.mark.parametrize("x,msg", [pytest.param(x, m, id=m.split("must ")[1][:16])
                                   for x, m in GEGLU_BAD])
def test_geglu_rejects(x, msg):
    _all_paths(geglu, functools.partial(ops.check, "geglu"), [x], msg)


@pytest.mark.parametrize("over,msg", _cases(ALN_BAD))
def test_add_layer_norm_rejects(over, msg):
    _all_paths(aln, functools.partial(ops.check, "add_layer_norm"), aln_args(**over), msg)


@pytest.mark.parametrize("over,msg", [pytest.param(o, m, id=f"{next(iter(o))}-{i}")
                                      for i, (o, m) in enumerate(LGEGLU_BAD)])
def test_linear_geglu_rejects(over, msg):
    _all_paths(lgeglu, functools.partial(ops.check, "linear_geglu"), lgeglu_args(**over), msg)


def test_linear_geglu_entry_point_rejects_non_tensors():
    for over, name in (({"x": None}, "x"), ({"weight": [1.0]}, "weight"), ({"bias": 1.0}, "bias")):
        msg = f"fastdiff.linear_geglu: argument '{name}' must be a torch.Tensor"
        with pytest.raises(TypeError, match=msg):
            ops.linear_geglu(*lgeglu_args(**over))


@pytest.mark.parametrize("over,msg", [pytest.param(o, m, id=f"{next(iter(o))}-{i}")
                                      for i, (o, m) in enumerate(LNLIN_BAD)])
def test_layer_norm_linear_rejects(over, msg):
    _all_paths(lnlin, functools.partial(ops.check, "layer_norm_linear"), lnlin_args(**over), msg)


def test_layer_norm_linear_entry_point_rejects_non_tensors():
    for over, name in (({"x": None}, "x"), ({"weight": [1.0]}, "weight"), ({"fold": 1.0}, "fold"),
                       ({"shift": 1.0}, "shift")):
        msg = f"fastdiff.layer_norm_linear: argument '{name}' must be a torch.Tensor"
        with pytest.raises(TypeError, match=msg):
            ops.layer_norm_linear(*lnlin_args(**over))


def test_geglu_entry_point_rejects_non_tensors():
    with pytest.raises(TypeError, match="fastdiff.geglu: argument 'x' must be a torch.Tensor"):
        ops.geglu(None)


@pytest.mark.parametrize("value", [1, 0, "yes", None, torch.tensor(True)],
                         ids=["int 1", "int 0", "str", "None", "tensor"])
def test_group_norm_silu_channels_last_out_must_be_a_bool(value):
    """A truthy non-bool would silently pick a layout (and None would pick the default)."""
    with pytest.raises(TypeError, match="fastdiff.group_norm_silu: argument 'channels_last_out' "
                                        "must be a bool, got"):
        ops.group_norm_silu(_x(2, 8, 3, 3), 4, channels_last_out=value)


def test_step_index_out_of_range_on_cpu():
    for idx in (-1, 4):
        with pytest.raises(ValueError, match=f"'step_index'={idx} is out of range for 'coeffs' with 4"):
            step(*step_args(step_index=torch.tensor(idx)))


def test_valid_arguments_pass_the_checks():
    ops.check("group_norm_silu", *gn_args())
    ops.check("group_norm_silu", *gn_args(x=_x(2, 8, 3, 3).to(memory_format=torch.channels_last),
                                      pre_bias=_x(2, 8), scale=_x(2, 8), shift=_x(2, 8)))
    ops.check("group_norm_silu", *gn_args(), True)  # channels_last_out
    ops.check("attention", *attn_args(attn_mask=_x(2, 1, 1, 7)))
    ops.check("denoise_step", *step_args(model_output=_x(4, 3, 4), guidance_scale=3.0,
                                         noise=_x(2, 3, 4)))
    ops.check("geglu", _x(3, 2, 8))
    ops.check("geglu", _x(0, 2))
    ops.check("linear_geglu", *lgeglu_args(bias=None))
    ops.check("linear_geglu", *lgeglu_args(x=_x(0, 8)))
    ops.check("add_layer_norm", *aln_args(weight=None, bias=None, eps=0.0))
    ops.check("add_layer_norm", *aln_args(next_bias=_x(8)))
    ops.check("group_norm_silu_residual", *gnr_args())
    ops.check("layer_norm_linear", *lnlin_args(shift=None, geglu=False, weight=_x(5, 8),
                                               fold=_x(3, 5)))
    ops.check("layer_norm_linear", *lnlin_args(x=_x(0, 8), eps=0.0))
    ops.check("group_norm_silu_residual",
              *gnr_args(x=_x(2, 8, 3, 3).to(memory_format=torch.channels_last), weight=None,
                        bias=None, apply_silu=True, channels_last_out=False))
