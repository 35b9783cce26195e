"""Plain-torch float64 references for the fused ops: what every kernel is tested against.

Each takes the op's arguments (any dtype, any device) and returns float64 results computed with
unfused torch operations, following the definitions in csrc/<op>.cpp. They are differentiable
(inputs are converted, not detached): autograd through them is the float64 reference of the ops'
backward formulas (tests/test_autograd.py).
"""
from __future__ import annotations

import math

import torch

from fastdiff import schedules as S


def _f64(t):
    return None if t is None else t.to(torch.float64)


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, pre_bias=None, scale=None,
                    shift=None, apply_silu=True, channels_last_out=False):
    """Two-pass GroupNorm in float64 with the optional fusions; returns (N, C, H, W) float64,
    channels_last with ``channels_last_out`` (the values do not depend on it)."""
    h = _f64(x)
    n, c = h.shape[:2]
    if pre_bias is not None:
        h = h + _f64(pre_bias).reshape(n, c, 1, 1)
    g = h.reshape(n, num_groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(h.shape)
    if weight is not None:
        y = y * _f64(weight).reshape(1, c, 1, 1)
    if bias is not None:
        y = y + _f64(bias).reshape(1, c, 1, 1)
    if scale is not None:
        y = y * (1 + _f64(scale).reshape(n, c, 1, 1))
    if shift is not None:
        y = y + _f64(shift).reshape(n, c, 1, 1)
    y = y * torch.sigmoid(y) if apply_silu else y
    return y.contiguous(memory_format=torch.channels_last) if channels_last_out else y


def group_norm_silu_residual(x, num_groups, weight, bias, eps, residual_bias, apply_silu=True,
                             channels_last_out=False):
    """(y, r): y as group_norm_silu (float64); r = x + residual_bias[c] rounded to x's dtype, in
    x's memory format (the float64 sum of two values of x's dtype rounds as their float32 sum
    does: float32 holds more than twice their digits)."""
    y = group_norm_silu(x, num_groups, weight, bias, eps, apply_silu=apply_silu,
                        channels_last_out=channels_last_out)
    r = _f64(x) + _f64(residual_bias).reshape(1, -1, 1, 1)
    return y, r.to(x.dtype)


def group_norm_scale_shift(x, num_groups, weight=None, bias=None, eps=1e-5, x2=None):
    """(scale, shift), (N, C) float64, of a = cat([x, x2], 1): two-pass group mean and biased
    variance, rstd = 1 / sqrt(var + eps), scale = rstd * weight, shift = bias - mean * scale."""
    a = _f64(x) if x2 is None else torch.cat([_f64(x), _f64(x2)], 1)
    n, c = a.shape[:2]
    g = a.reshape(n, num_groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    rstd = 1 / torch.sqrt(var + eps)
    cg = c // num_groups
    scale = rstd.expand(n, num_groups, cg).reshape(n, c)
    if weight is not None:
        scale = scale * _f64(weight)
    shift = -mean.expand(n, num_groups, cg).reshape(n, c) * scale
    if bias is not None:
        shift = shift + _f64(bias)
    return scale, shift


def attention(q, k, v, attn_mask=None, scale=None):
    """softmax(q k^T * scale + attn_mask) v in float64; rows with every key at -inf give 0."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if attn_mask is not None:
        s = s + _f64(attn_mask)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def denoise_step_v2(model_output, sample, coeffs, step_index, noise=None, state=None,
                    guidance_scale=1.0, clip_sample=False, clip_sample_range=1.0, guided=None):
    """The version-2 row of fastdiff.schedules (ROW_*) in float64: returns (out, x0c, new state);
    state is (K, *sample.shape) with K <= SLOTS (None: no slots), returned updated, not changed
    in place. (x0c is always returned: the op's write_x0 only decides whether it is stored.)"""
    c = coeffs.detach().to(torch.float64).cpu()[int(step_index.reshape(-1)[0])]
    m, x = _f64(model_output), _f64(sample)
    if guided is None:
        guided = m.shape[0] == 2 * x.shape[0]
    if guided:
        u, cond = m.chunk(2)
        m = u + guidance_scale * (cond - u)
    zero = torch.zeros_like(x)
    slots = [zero] * S.SLOTS
    k = 0 if state is None else state.shape[0]
    for j in range(k):
        slots[j] = _f64(state[j])
    v = [x, m, _f64(noise) if noise is not None else zero, *slots]
    x0 = sum(c[S.ROW_P + i] * v[i] for i in range(S.NUM_V))
    if clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    out = sum(c[S.ROW_O + i] * v[i] for i in range(S.NUM_V)) + c[S.ROW_O + S.NUM_V] * x0
    new = None if state is None else _f64(state).clone()
    for j in range(k):
        if c[S.ROW_W + j] != 0:
            r = c[S.ROW_S + j * (S.NUM_V + 1):S.ROW_S + (j + 1) * (S.NUM_V + 1)]
            new[j] = sum(r[i] * v[i] for i in range(S.NUM_V)) + r[S.NUM_V] * x0
    return out, x0, new


def geglu(x):
    """x[..., :F] * gelu(x[..., F:]) in float64 (exact GELU: g / 2 * (1 + erf(g / sqrt 2)))."""
    a, g = _f64(x).chunk(2, dim=-1)
    return a * (0.5 * g * (1 + torch.erf(g / math.sqrt(2))))


def linear_geglu(x, weight, bias=None):
    """(x W[:F]^T + b[:F]) * gelu(x W[F:]^T + b[F:]) in float64 (exact GELU): diffusers' GEGLU
    with its projection. x: (..., K); weight: (2F, K); bias: (2F,) or None."""
    return geglu(torch.nn.functional.linear(_f64(x), _f64(weight),
                                            None if bias is None else _f64(bias)))


def layer_norm_linear(x, ln_weight, ln_bias, eps, weight, bias=None, shift=None, geglu=False):
    """Linear(LayerNorm(x + shift)) in float64, unfolded: F.layer_norm of h = x + shift over the
    last dim with ln_weight, ln_bias (either may be None), then F.linear with weight (N, K) and
    bias (N,) or None; with ``geglu`` the GEGLU of the result (value half first). What
    fastdiff.layer_norm_linear computes from fastdiff.ops.fold_layer_norm's tensors."""
    h = _f64(x)
    if shift is not None:
        h = h + _f64(shift)
    n = torch.nn.functional.layer_norm(h, h.shape[-1:], _f64(ln_weight), _f64(ln_bias), eps)
    z = torch.nn.functional.linear(n, _f64(weight), _f64(bias))
    return _geglu(z) if geglu else z


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, next_bias=None):
    """(h_out, y): h = x + residual rounded to x's dtype (as the op returns it), y = LayerNorm of
    that h over the last dim in float64 (two-pass variance), times weight, plus bias; h_out =
    h + next_bias (the rounded h plus next_bias in float32, rounded to x's dtype: eager's
    ``(x + residual) + next_bias``), or h without it."""
    h = (x.detach().float() + residual.detach().float()).to(x.dtype)
    v = _f64(h)
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    y = (v - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * _f64(weight)
    if bias is not None:
        y = y + _f64(bias)
    if next_bias is not None:
        h = (h.float() + next_bias.detach().float()).to(x.dtype)
    return h, y


# The reference of torch.ops.fastdiff.denoise_step, whose rows are version 2.
denoise_step = denoise_step_v2


_geglu = geglu   # layer_norm_linear's argument 'geglu' shadows the function there


def norm_conv2d(x, weight, bias=None, x2=None, scale=None, shift=None, silu=False, temb=None,
                residual=None, shortcut=None, shortcut2=None, shortcut_weight=None):
    """fastdiff.norm_conv2d in float64 from the UNPACKED weights: a = cat([x, x2], 1), times
    scale plus shift (per (n, channel)), SiLU, rounded to x's dtype as the unfused path
    materializes it (only when scale or SiLU is applied; the rounding through float32 first,
    the op's math); then conv2d(a, weight, padding=k//2) + shortcut_weight @ cat([shortcut,
    shortcut2], 1) (1x1, raw) + bias[o] + temb[n, o] + residual. weight: (O, C, k, k);
    shortcut_weight: (O, S, 1, 1) or (O, S). Returns (N, O, H, W) float64 (NCHW)."""
    a = x if x2 is None else torch.cat([x, x2], 1)
    if scale is not None or silu:
        # float32 as the op (float64 inputs: float64, for gradcheck)
        ft = torch.float64 if a.dtype == torch.float64 else torch.float32
        f = a.to(ft)
        if scale is not None:
            f = f * scale.to(ft)[:, :, None, None] + shift.to(ft)[:, :, None, None]
        if silu:
            f = f * torch.sigmoid(f)
        a = f.to(x.dtype)
    k = weight.shape[-1]
    y = torch.nn.functional.conv2d(_f64(a), _f64(weight), padding=k // 2)
    if shortcut is not None:
        s = shortcut if shortcut2 is None else torch.cat([shortcut, shortcut2], 1)
        sw = _f64(shortcut_weight).reshape(shortcut_weight.shape[0], -1)
        y = y + torch.einsum("os,nshw->nohw", sw, _f64(s))
    if bias is not None:
        y = y + _f64(bias)[None, :, None, None]
    if temb is not None:
        y = y + _f64(temb)[:, :, None, None]
    if residual is not None:
        y = y + _f64(residual)
    return y.contiguous()
