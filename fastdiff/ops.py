"""The fused ops: their Python entry points.

Each op is one dispatcher op, ``torch.ops.fastdiff.<name>``, whose schema, argument checks, CPU
kernel (C++), Meta kernel (shapes only, for torch.compile and graph capture) and CUDA kernel
live in csrc/<name>.cpp. On CUDA the op launches the wheel's prebuilt cubins from C++
(csrc/prebuilt.cpp); where they cannot run (no wheel, another GPU architecture, an unaligned
tensor) it runs the Triton JIT (``fastdiff.kernels.launch``) and logs why, once per reason
(``log_once``). ``FASTDIFF_PREBUILT=0`` (or ``set_prebuilt("off")``) always takes the JIT;
``require`` raises instead of falling back. ``FASTDIFF_AOT`` is an older name of
``FASTDIFF_PREBUILT``.

Each op also gets a thin Python function that accepts the shapes models naturally have
((N, C, 1, 1) time embeddings, boolean or 2-D/3-D attention masks).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from fastdiff import prebuilt
from fastdiff import schedules as S

logger = logging.getLogger("fastdiff")
_logged: set[str] = set()


def log_once(reason: str) -> None:
    """Logs a fallback reason the first time it occurs (INFO, logger 'fastdiff'). The C++ ops
    call it when the prebuilt kernels cannot run a call."""
    if reason not in _logged:
        _logged.add(reason)
        logger.info("fastdiff: %s", reason)


def set_prebuilt(mode: str) -> str:
    """Whether the CUDA ops launch the prebuilt cubins: 'on' (when they can; the default),
    'off' (always the Triton JIT) or 'require' (raise where they cannot). Returns the previous
    mode. The initial mode comes from FASTDIFF_PREBUILT (0/off, 1/on, require)."""
    return prebuilt.set_mode(mode)


prebuilt.load_if_cuda()


def check(op: str, *args) -> None:
    """The argument checks of op ``op`` alone, on its schema's positional arguments (trailing
    optional ones may be left out): the ValueError the op raises for them, on any device. The
    Triton launchers of fastdiff.kernels assume them (``fastdiff::_check_<op>``, csrc/ops.h)."""
    getattr(torch.ops.fastdiff, f"_check_{op}")(*args)


def _jit_kernel(op: str):
    """The Triton JIT of op ``op``, the kernel of ``fastdiff::_jit_<op>``: what the C++ CUDA
    kernel calls, through the dispatcher, where the prebuilt cubins cannot run a call (``why``:
    the reason, logged once; empty when FASTDIFF_PREBUILT=off asked for the JIT). Python, so
    that the extension needs no Python or libtorch C++ API to reach fastdiff.kernels.launch."""
    schema = getattr(torch.ops.fastdiff, f"_jit_{op}").default._schema
    names = [a.name for a in schema.arguments]
    defaults = [a.default_value for a in schema.arguments]

    def run(*args, **kwargs):
        # The dispatcher leaves out trailing arguments equal to their defaults: put them back,
        # since plan() takes every schema argument.
        args = list(args) + [kwargs.get(n, d) for n, d in
                             zip(names[len(args):], defaults[len(args):])]
        *args, why = args
        if why:
            log_once(f"{op}: prebuilt kernels not used ({why}); the Triton JIT compiles it")
        from fastdiff import kernels
        out = kernels.launch(op, *args)
        return tuple(out) if isinstance(out, list) else out
    return run


# Every op's _jit_<op> (defined by the extension, csrc/ops.h FASTDIFF_REGISTER_OP), on every device.
_jit_lib = torch.library.Library("fastdiff", "IMPL")
for _name in torch._C._dispatch_get_all_op_names():
    if _name.startswith("fastdiff::_jit_"):
        _jit_lib.impl(_name.split("::")[1], _jit_kernel(_name[len("fastdiff::_jit_"):]),
                      "CompositeExplicitAutograd")


def _per_channel(t: torch.Tensor | None, n: int, c: int) -> torch.Tensor | None:
    """(N, C), (N, C, 1, 1) or (C,) -> contiguous (N, C)."""
    if t is None:
        return None
    if t.dim() == 4 and t.shape[2:] == (1, 1):
        t = t.flatten(1)
    elif t.dim() == 1 and t.shape[0] == c:
        t = t.expand(n, c)
    return t.contiguous() if t.dim() == 2 else t  # wrong shapes are reported by the op


def check_types(op: str, tensors: dict | None = None, ints: dict | None = None,
                reals: dict | None = None, bools: dict | None = None) -> None:
    """TypeError naming the argument for a value of the wrong kind (a list where a tensor goes, a
    float where an int goes), before any of it is used; None passes (optional arguments)."""
    def fail(name, want, v):
        raise TypeError(f"fastdiff.{op}: argument '{name}' must be {want}, got "
                        f"{type(v).__name__} {v!r:.60}")
    for name, v in (tensors or {}).items():
        if v is not None and not isinstance(v, torch.Tensor):
            fail(name, "a torch.Tensor", v)
    for name, v in (ints or {}).items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            fail(name, "an int", v)
    for name, v in (reals or {}).items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            fail(name, "a real number (int or float)", v)
    for name, v in (bools or {}).items():
        if not isinstance(v, bool):
            fail(name, "a bool", v)


def _refuse_forward_ad(name: str, args) -> None:
    """The ops have backward formulas only: a dual tensor (forward-mode AD, torch.func.jvp)
    would come out with no tangent, silently. Refused instead."""
    if forward_ad._current_level < 0:
        return
    for a in args:
        if isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None:
            raise NotImplementedError(
                f"fastdiff.{name}: forward-mode AD (a dual tensor) is not supported; the op "
                "has a backward formula only (use reverse mode, or the torch code it replaces)")


def _run(op, *args):
    """op(*args); with grad mode off (pipelines run under no_grad), no forward-mode AD level
    open and no torch.compile tracing, below the dispatcher's Autograd key: the autograd
    formulas below are Python kernels there, ~5 us a call on a CPU that no gradient needs.
    (denoise_step's own Autograd kernel does the same redispatch when no gradient is wanted, so
    skipping it changes nothing but its cost: a fused scheduler step runs under no_grad.)"""
    if (torch.is_grad_enabled() or forward_ad._current_level >= 0
            or torch.compiler.is_compiling()):
        _refuse_forward_ad(op.__name__, args)
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5, *,
                    pre_bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                    shift: torch.Tensor | None = None, silu: bool = True,
                    channels_last_out: bool = False) -> torch.Tensor:
    """GroupNorm with fp32 statistics, optional fusions, then SiLU.

    ``silu(norm(x + pre_bias) * (1 + scale) + shift)`` where ``norm`` is GroupNorm with affine
    ``weight``/``bias``. x: (N, C, H, W), contiguous or channels_last; pre_bias, scale, shift:
    (N, C) or (N, C, 1, 1). Returns x's dtype and memory format; with ``channels_last_out``,
    channels_last whatever x's (the same values): the (N, H*W, C) token layout a transformer
    reads after its norm, so that no copy makes it (diffusers' Transformer2DModel).
    """
    check_types("group_norm_silu",
                dict(x=x, weight=weight, bias=bias, pre_bias=pre_bias, scale=scale, shift=shift),
                dict(num_groups=num_groups), dict(eps=eps),
                dict(channels_last_out=channels_last_out))
    n, c = (x.shape[0], x.shape[1]) if x.dim() >= 2 else (0, 0)
    return _run(torch.ops.fastdiff.group_norm_silu, x, num_groups, weight, bias, eps,
                _per_channel(pre_bias, n, c), _per_channel(scale, n, c),
                _per_channel(shift, n, c), silu, channels_last_out)


def group_norm_silu_residual(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float,
                             residual_bias: torch.Tensor, *, silu: bool = True,
                             channels_last_out: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, r)``: y exactly ``group_norm_silu(x, num_groups, weight, bias, eps, silu=silu,
    channels_last_out=channels_last_out)``, and from the same read of x
    ``r = x + residual_bias[c]`` (float32 add, rounded to x's dtype) in x's memory format.

    residual_bias: (C,), x's dtype. diffusers' Transformer2DModel ends with ``x + proj_out(t)``:
    with proj_out's bias in r, it can end with one in-place GEMM into r (``r.view(B, C, HW)
    .baddbmm_(W.expand(B, C, Cin), t.transpose(1, 2))``) instead of an addmm and an add. No
    pre_bias, scale or shift (group_norm_silu has them).
    """
    check_types("group_norm_silu_residual",
                dict(x=x, weight=weight, bias=bias, residual_bias=residual_bias),
                dict(num_groups=num_groups), dict(eps=eps),
                dict(silu=silu, channels_last_out=channels_last_out))
    if residual_bias is None:
        raise TypeError("fastdiff.group_norm_silu_residual: argument 'residual_bias' must be a "
                        "torch.Tensor of shape (C,), got None (group_norm_silu is the op without)")
    return _run(torch.ops.fastdiff.group_norm_silu_residual, x, num_groups, weight, bias, eps,
                residual_bias, silu, channels_last_out)


def group_norm_scale_shift(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, eps: float = 1e-5,
                           x2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A GroupNorm's statistics as a per-(n, c) affine: ``(scale, shift)``, two (N, C) float32
    tensors with ``F.group_norm(a, num_groups, weight, bias, eps) == a * scale + shift``
    (broadcast over space), a = ``cat([x, x2], 1)`` (x2 None: x), the cat never made: the op
    that reads a next applies the affine while loading it (norm_conv2d), so the normalized
    tensor is never written.

    x, x2: (N, C1, *spatial) and (N, C2, *spatial), one dtype, each contiguous or channels-last
    (channels_last, channels_last_3d); a group may straddle x and x2. weight, bias: (C1 + C2,),
    x's dtype or float32. Statistics in float32 around the group's first value (a large mean
    with a small spread keeps its digits); rstd = 1 / sqrt(var + eps), scale = rstd * weight,
    shift = bias - mean * scale.

    Backward: the statistics recomputed with torch ops in float32 and differentiated (not
    fused; accelerate runs the op at inference only), so gradients reach x, x2, weight and
    bias as through F.group_norm.
    """
    check_types("group_norm_scale_shift", dict(x=x, weight=weight, bias=bias, x2=x2),
                dict(num_groups=num_groups), dict(eps=eps))
    return _run(torch.ops.fastdiff.group_norm_scale_shift, x, num_groups, weight, bias, eps, x2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v``, as ``F.scaled_dot_product_attention`` (non-causal).

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); D <= 256. attn_mask: additive (float) or boolean
    (True = attend), broadcastable to (B, H, Lq, Lk); fewer than 4 dims are aligned right, as in
    SDPA. scale defaults to 1/sqrt(D). Any strides work; the kernels read rows with a unit
    stride in the head dim, so only tensors without one (e.g. a transposed (B, C, L) view) are
    copied.
    """
    check_types("attention", dict(q=q, k=k, v=v, attn_mask=attn_mask), reals=dict(scale=scale))
    q, k, v = (t.contiguous() if t.dim() == 4 and t.stride(-1) != 1 else t for t in (q, k, v))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=attn_mask.device
                                    ).masked_fill_(~attn_mask, float("-inf"))
        while attn_mask.dim() < 4:
            attn_mask = attn_mask.unsqueeze(0)
    return _run(torch.ops.fastdiff.attention, q, k, v, attn_mask, scale)


def denoise_step(model_output: torch.Tensor, sample: torch.Tensor, coeffs: torch.Tensor,
                 step_index: torch.Tensor, noise: torch.Tensor | None = None,
                 state: torch.Tensor | None = None, guidance_scale: float = 1.0,
                 clip_sample: bool = False, clip_sample_range: float = 1.0,
                 write_x0: bool = False, guided: bool | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused sampler step: guidance combine, solver update, noise and the solver's state
    (the row of ``fastdiff.schedules``, "the step row, version 2").

    model_output: like ``sample`` (N, ...) or, guided, (2N, ...) = [uncond; cond] combined as
    ``u + guidance_scale * (c - u)``; ``guided`` says which (None: guided when model_output has
    twice the batch of sample). coeffs: (S, ROW_LEN) float32 table from ``fastdiff.schedules``;
    step_index: one-element int tensor on the sample's device (no host sync). A missing
    ``noise`` counts as zeros. state: (K, *sample.shape), 1 <= K <= 5 slots in sample's dtype
    (a table's ``slots``; zeros before the first step), updated in place where the row writes
    them; None when the rows use no slot. Returns (next sample, predicted x0 or empty).
    """
    check_types("denoise_step", dict(model_output=model_output, sample=sample, coeffs=coeffs,
                                     step_index=step_index, noise=noise, state=state),
                reals=dict(guidance_scale=guidance_scale, clip_sample_range=clip_sample_range))
    return _run(torch.ops.fastdiff.denoise_step, model_output, sample, coeffs, step_index, noise,
                state, guidance_scale, clip_sample, clip_sample_range, write_x0, guided)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """diffusers' GEGLU after its projection: ``x[..., :F] * gelu(x[..., F:])`` (exact GELU, the
    math in fp32) in one pass. x: (..., 2F), the projection's output; returns (..., F). A
    non-contiguous x is copied first."""
    if not isinstance(x, torch.Tensor):   # (check_types lets None through: optional arguments)
        raise TypeError(f"fastdiff.geglu: argument 'x' must be a torch.Tensor, got "
                        f"{type(x).__name__} {x!r:.60}")
    if x.dim() >= 1 and not x.is_contiguous():
        x = x.contiguous()
    return _run(torch.ops.fastdiff.geglu, x)


def linear_geglu(x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' GEGLU, projection and activation in one op: with ``h, g = F.linear(x, weight,
    bias).chunk(2, -1)``, returns ``h * gelu(g)`` (exact GELU), fp32 accumulation and math, one
    rounding to x's dtype; on CUDA one GEMM whose epilogue applies the bias and the gate, so the
    (..., 2F) projection is never written. x: (..., K); weight: (2F, K), nn.Linear's layout
    (value rows, then gate rows), contiguous; bias: (2F,) or None; one dtype. Returns (..., F).
    A non-contiguous x (or bias) is copied first; weight is not (a parameter is contiguous: a
    strided one is refused rather than copied at every call)."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        bad, v = ("x", x) if not isinstance(x, torch.Tensor) else ("weight", weight)
        raise TypeError(f"fastdiff.linear_geglu: argument '{bad}' must be a torch.Tensor, got "
                        f"{type(v).__name__} {v!r:.60}")
    check_types("linear_geglu", dict(bias=bias))
    if x.dim() >= 1 and not x.is_contiguous():
        x = x.contiguous()
    if bias is None:   # the schema's default: the dispatcher sees the call it always saw
        return _run(torch.ops.fastdiff.linear_geglu, x, weight)
    return _run(torch.ops.fastdiff.linear_geglu, x, weight, bias.contiguous())


def fold_layer_norm(ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                    weight: torch.Tensor, bias: torch.Tensor | None = None,
                    shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensors ``layer_norm_linear`` takes for ``Linear(LayerNorm(x + shift))``: returns
    ``(weight', fold)`` with weight' = weight * ln_weight[None, :] (weight's dtype) and fold
    (3, N) float32: colsum[n] = sum_k weight'[n, k] and d[n] = sum_k weight'[n, k] shift[k] (of
    weight' as rounded, in float64; zeros without shift), b'[n] = bias[n] + sum_k weight[n, k]
    ln_bias[k] (float64). ln_weight, ln_bias: (K,) or None (a LayerNorm without affine); weight:
    (N, K), the Linear's; bias: (N,) or None; shift: (K,) or None. Torch ops: differentiable."""
    check_types("fold_layer_norm", dict(ln_weight=ln_weight, ln_bias=ln_bias, weight=weight,
                                        bias=bias, shift=shift))
    if weight is None or weight.dim() != 2:
        raise ValueError("fastdiff.fold_layer_norm: argument 'weight' must be a (N, K) tensor, "
                         f"got {None if weight is None else list(weight.shape)}")
    N, K = weight.shape
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias), ("shift", shift)):
        if t is not None and t.shape != (K,):
            raise ValueError(f"fastdiff.fold_layer_norm: argument '{name}' must have shape "
                             f"({K},) (weight's K), got {list(t.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"fastdiff.fold_layer_norm: argument 'bias' must have shape ({N},) "
                         f"(weight's N), got {list(bias.shape)}")
    w64 = weight.double()
    wf = weight.contiguous() if ln_weight is None else \
        (w64 * ln_weight.double()[None, :]).to(weight.dtype).contiguous()
    wf64 = wf.double()
    colsum = wf64.sum(1)
    d = wf64 @ shift.double() if shift is not None else torch.zeros_like(colsum)
    b = bias.double() if bias is not None else torch.zeros_like(colsum)
    if ln_bias is not None:
        b = b + w64 @ ln_bias.double()
    return wf, torch.stack([colsum, d, b]).float().contiguous()


def layer_norm_linear(x: torch.Tensor, weight: torch.Tensor, fold: torch.Tensor,
                      shift: torch.Tensor | None = None, eps: float = 1e-5,
                      geglu: bool = False) -> torch.Tensor:
    """``Linear(LayerNorm(x + shift))`` as one GEMM: the LayerNorm folded into the Linear that
    reads it (``fold_layer_norm`` makes weight and fold), the row statistics of h = x + shift
    taken in the GEMM's K loop and applied in its epilogue, so no normalized tensor is written.
    x: (..., K), float32/float16/bfloat16; weight: (N, K), x's dtype, contiguous; fold: (3, N)
    float32; shift: (K,) float32 or None. Per row, mean = sum(h)/K, var = max(sum(h^2)/K -
    mean^2, 0), rstd = 1/sqrt(var + eps); z = rstd (x W'^T + d - mean colsum) + b'. Returns z
    (..., N), or with ``geglu`` z[..., :N/2] * gelu(z[..., N/2:]) (exact GELU), fp32
    accumulation and math, one rounding to x's dtype. A non-contiguous x is copied first."""
    for name, v in (("x", x), ("weight", weight), ("fold", fold)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"fastdiff.layer_norm_linear: argument '{name}' must be a "
                            f"torch.Tensor, got {type(v).__name__} {v!r:.60}")
    check_types("layer_norm_linear", dict(shift=shift), reals=dict(eps=eps),
                bools=dict(geglu=geglu))
    if x.dim() >= 1 and not x.is_contiguous():
        x = x.contiguous()
    return _run(torch.ops.fastdiff.layer_norm_linear, x, weight, fold, shift, eps, geglu)


def pack_conv_weight(weight: torch.Tensor,
                     shortcut_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The (O, K) matrix ``norm_conv2d`` reads: weight (O, C, k, k) tap-major, K = k*k*C + S,
    ``packed[o, (kh*k + kw)*C + c] = weight[o, c, kh, kw]``, then the shortcut's columns
    ``packed[o, k*k*C + s] = shortcut_weight[o, s]`` (shortcut_weight: (O, S, 1, 1), (O, S) or
    None). Contiguous, weight's dtype. Torch ops: differentiable."""
    check_types("pack_conv_weight", dict(weight=weight, shortcut_weight=shortcut_weight))
    if weight is None or weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError("fastdiff.pack_conv_weight: argument 'weight' must be a (O, C, k, k) "
                         f"tensor, got {None if weight is None else list(weight.shape)}")
    O, C, k, _ = weight.shape
    packed = weight.permute(0, 2, 3, 1).reshape(O, k * k * C)
    if shortcut_weight is not None:
        sw = shortcut_weight
        if sw.dim() == 4 and sw.shape[2:] == (1, 1):
            sw = sw.flatten(1)
        if sw.dim() != 2 or sw.shape[0] != O:
            raise ValueError("fastdiff.pack_conv_weight: argument 'shortcut_weight' must have "
                             f"shape ({O}, S, 1, 1) or ({O}, S) (weight's O), got "
                             f"{list(shortcut_weight.shape)}")
        packed = torch.cat([packed, sw.to(weight.dtype)], 1)
    return packed.contiguous()


def norm_conv2d(x: torch.Tensor, packed: torch.Tensor, kernel_size: int,
                bias: torch.Tensor | None = None, *, x2: torch.Tensor | None = None,
                scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                silu: bool = False, temb: torch.Tensor | None = None,
                residual: torch.Tensor | None = None, shortcut: torch.Tensor | None = None,
                shortcut2: torch.Tensor | None = None,
                channels_last_out: bool = False) -> torch.Tensor:
    """A 3x3 or 1x1 convolution (stride 1, padding k//2) of ``a = cat([x, x2], 1)`` normalized
    on the fly, as one implicit GEMM (csrc/norm_conv2d.cpp):
    ``a = silu(a * scale + shift)`` (float32; each part optional), rounded to x's dtype, then
    ``conv2d(a, weight) + shortcut_weight @ cat([shortcut, shortcut2], 1) + bias + temb[n] +
    residual``, float32 accumulation, one rounding. packed: ``pack_conv_weight(weight,
    shortcut_weight)``; scale, shift: (N, C) or (N, C, 1, 1) float32 (a GroupNorm as a
    per-(n, channel) affine); temb: (N, O) or (N, O, 1, 1); bias (O,) and temb in another float
    dtype are converted to float32 (small). x, x2, shortcut, shortcut2, residual: NCHW or
    channels_last, any strides. Returns (N, O, H, W), NCHW, or channels_last memory with
    ``channels_last_out`` (the (N, H*W, O) tokens of a transformer)."""
    for name, v in (("x", x), ("packed", packed)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"fastdiff.norm_conv2d: argument '{name}' must be a torch.Tensor, "
                            f"got {type(v).__name__} {v!r:.60}")
    check_types("norm_conv2d", dict(bias=bias, x2=x2, scale=scale, shift=shift, temb=temb,
                                    residual=residual, shortcut=shortcut, shortcut2=shortcut2),
                ints=dict(kernel_size=kernel_size),
                bools=dict(silu=silu, channels_last_out=channels_last_out))
    n = x.shape[0] if x.dim() >= 1 else 0
    c = (x.shape[1] if x.dim() >= 2 else 0) + (x2.shape[1] if x2 is not None and x2.dim() >= 2
                                                else 0)
    o = packed.shape[0] if packed.dim() >= 1 else 0

    def table(t, n, c):
        t = _per_channel(t, n, c)
        return t.float() if t is not None and t.is_floating_point() else t
    bias = bias.float().contiguous() if bias is not None and bias.is_floating_point() else bias
    return _run(torch.ops.fastdiff.norm_conv2d, x, packed, kernel_size, bias, x2,
                _per_channel(scale, n, c), _per_channel(shift, n, c), silu, table(temb, n, o),
                residual, shortcut, shortcut2, channels_last_out)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5,
                   next_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the LayerNorm after it in one pass: returns ``(h, y)`` with
    ``h = x + residual`` (x's dtype: the next residual) and ``y = layer_norm(h) * weight + bias``
    over the last dim (fp32 statistics of h as rounded). x, residual: (..., C), one dtype;
    weight, bias: (C,) in that dtype, or None. Non-contiguous inputs are copied first.

    ``next_bias`` ((C,), x's dtype): the returned h is ``h + next_bias`` (while y is still the
    LayerNorm of h), so the bias of the Linear whose output is added to h next rides along: a
    transformer block can end with ``h.addmm_(g, W.T)`` (no bias) instead of
    ``addmm(b, g, W.T) + h``."""
    if not isinstance(x, torch.Tensor) or not isinstance(residual, torch.Tensor):
        bad, v = ("x", x) if not isinstance(x, torch.Tensor) else ("residual", residual)
        raise TypeError(f"fastdiff.add_layer_norm: argument '{bad}' must be a torch.Tensor, got "
                        f"{type(v).__name__} {v!r:.60}")
    check_types("add_layer_norm", dict(weight=weight, bias=bias, next_bias=next_bias),
                reals=dict(eps=eps))
    x, residual = (t.contiguous() if t.dim() >= 1 else t for t in (x, residual))
    if next_bias is None:   # the schema's default: the dispatcher sees the call it always saw
        return _run(torch.ops.fastdiff.add_layer_norm, x, residual, weight, bias, eps)
    return _run(torch.ops.fastdiff.add_layer_norm, x, residual, weight, bias, eps, next_bias)


# ---- Autograd ----
#
# Each op's formula is registered on the dispatcher's Autograd key, so every caller (these entry
# points, torch.ops.fastdiff.* directly, torch.compile's traced graphs) gets it. group_norm_silu
# and attention use torch.library.register_autograd. denoise_step cannot: it updates ``state``
# in place and register_autograd refuses non-functional schemas, so its Autograd kernel is
# registered by hand (_denoise_step_autograd). attention's and denoise_step's backwards are torch
# ops, differentiable again (double backward works); group_norm_silu's fused backward op is
# first order: a gradient of its gradient raises (once_differentiable) rather than be wrong.

def _group_norm_silu_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu, _ = inputs
    ctx.save_for_backward(x, weight, bias, pre_bias, scale, shift)
    ctx.args = (num_groups, eps, apply_silu)


def _gn_backward(dy, x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu):
    """The fused backward op's gradients (dx, dw, db, dpre, dscale, dshift); it takes dy in x's
    layout, so a dy in another (a channels_last output's) is copied to it first."""
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    dy = dy.to(x.dtype).contiguous(memory_format=fmt)
    return torch.ops.fastdiff.group_norm_silu_backward(dy, x, num_groups, weight, bias, eps,
                                                       pre_bias, scale, shift, apply_silu)


@once_differentiable
def _group_norm_silu_backward(ctx, grad):
    """The fused backward (csrc/group_norm_silu_backward.cpp; on CUDA its Triton kernels): one
    call for the gradients of x and of every tensor the forward was given. The backward op takes
    dy in x's layout: a channels_last dy (channels_last_out, or any caller's) is copied to it."""
    x, weight, bias, pre_bias, scale, shift = ctx.saved_tensors
    num_groups, eps, apply_silu = ctx.args
    dx, dw, db, dpre, dscale, dshift = _gn_backward(grad, x, num_groups, weight, bias, eps,
                                                    pre_bias, scale, shift, apply_silu)

    def given(g, t):  # absent inputs have no gradient
        return None if t is None else g
    return (dx, None, given(dw, weight), given(db, bias), None, given(dpre, pre_bias),
            given(dscale, scale), given(dshift, shift), None, None)


torch.library.register_autograd("fastdiff::group_norm_silu", _group_norm_silu_backward,
                                setup_context=_group_norm_silu_setup)

def _group_norm_silu_residual_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps, residual_bias, apply_silu, _ = inputs
    # Not r: the transformer accumulates its proj_out into r in place.
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (num_groups, eps, apply_silu)
    ctx.rb_dtype = residual_bias.dtype


@once_differentiable
def _group_norm_silu_residual_backward(ctx, dy, dr):
    """y's gradient as group_norm_silu's (its fused backward op); r = x + residual_bias adds dr
    to x's and gives residual_bias dr summed over N, H and W (float32)."""
    x, weight, bias = ctx.saved_tensors
    num_groups, eps, apply_silu = ctx.args
    dx = dw = db = drb = None
    if dy is not None:
        dx, dw, db, *_ = _gn_backward(dy, x, num_groups, weight, bias, eps, None, None, None,
                                      apply_silu)
        dw = None if weight is None else dw
        db = None if bias is None else db
    if dr is not None:
        dx = dr.to(x.dtype) if dx is None else (dx.float() + dr.float()).to(x.dtype)
        drb = dr.float().sum((0, 2, 3)).to(ctx.rb_dtype)
    return dx, None, dw, db, None, drb, None, None


torch.library.register_autograd("fastdiff::group_norm_silu_residual",
                                _group_norm_silu_residual_backward,
                                setup_context=_group_norm_silu_residual_setup)

# Score memory per chunk of the attention backward (float32 S, P and dS for a few rows of batch).
_ATTENTION_BACKWARD_BYTES = 256 << 20


def _attention_setup(ctx, inputs, output):
    q, k, v, attn_mask, scale = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.scale = scale


def _attention_backward(ctx, grad):
    """Recomputes the probabilities in float32 and applies the softmax-attention gradient
    (dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = s dS K, dK = s dS^T Q, dmask = dS
    summed over broadcast dims), batch by batch so the (Lq, Lk) matrices stay bounded. Not
    fused: a first version (ARCHITECTURE.md)."""
    q, k, v, mask = ctx.saved_tensors
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    s = ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(D)
    want = ctx.needs_input_grad
    dq, dk, dv = (torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    dmask = None
    if mask is not None and want[3]:
        dmask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    step = max(1, _ATTENTION_BACKWARD_BYTES // max(1, 3 * 4 * H * Lq * Lk))
    for b0 in range(0, B, step):
        b = slice(b0, min(B, b0 + step))
        qf, kf, vf, gf = (t[b].float() for t in (q, k, v, grad))
        scores = (qf @ kf.transpose(-1, -2)) * s
        mb = None
        if mask is not None:
            mb = mask if mask.shape[0] == 1 else mask[b]
            scores = scores + mb.float()
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows of all -inf: 0, as the op
        del scores
        dv[b] = p.transpose(-1, -2) @ gf
        dp = gf @ vf.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        del p, dp
        dq[b] = (ds @ kf) * s
        dk[b] = (ds.transpose(-1, -2) @ qf) * s
        if dmask is not None:
            dims = [d for d in range(4) if mb.shape[d] == 1 and ds.shape[d] != 1]
            part = ds.sum(dims, keepdim=True) if dims else ds
            if mask.shape[0] == 1:
                dmask += part
            else:
                dmask[b] = part
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            None if dmask is None else dmask.to(mask.dtype), None)


torch.library.register_autograd("fastdiff::attention", _attention_backward,
                                setup_context=_attention_setup)


class _DenoiseStepFunction(torch.autograd.Function):
    """denoise_step with gradients for model_output, sample and noise. Per element the step is
    affine in them given the row: x0 = sum_k P_k v_k (clipped: the clip's mask),
    out = sum_k O_k v_k + O_x0 x0c; guided, m = u + g (c - u). The row is gathered on the device
    (no host sync). The slots are read, not differentiated (_denoise_step_autograd refuses
    calls whose state would need a gradient)."""

    @staticmethod
    def forward(ctx, model_output, sample, noise, coeffs, step_index, state, guidance_scale,
                clip_sample, clip_sample_range, write_x0, guided):
        # With clipping, the backward recomputes x0 for the clip's mask from the slots as read.
        read_state = state.clone() if clip_sample and state is not None else None
        with torch._C._AutoDispatchBelowAutograd():
            out, x0 = torch.ops.fastdiff.denoise_step.default(
                model_output, sample, coeffs, step_index, noise, state, guidance_scale,
                clip_sample, clip_sample_range, write_x0, guided)
        saved = (model_output, sample, noise) if clip_sample else (None, None, None)
        ctx.save_for_backward(coeffs, step_index, read_state, *saved)
        ctx.guided = model_output.shape[0] == 2 * sample.shape[0] if guided is None else guided
        ctx.args = (guidance_scale, clip_sample, clip_sample_range, write_x0)
        ctx.dtypes = (model_output.dtype, sample.dtype, None if noise is None else noise.dtype)
        if not write_x0:
            ctx.mark_non_differentiable(x0)
        return out, x0

    @staticmethod
    def backward(ctx, d_out, d_x0c):
        coeffs, step_index, state, m_in, x_in, n_in = ctx.saved_tensors
        g, clip, r, write_x0 = ctx.args
        row = coeffs.index_select(0, step_index.reshape(-1).long()).reshape(-1).float()
        P = row[S.ROW_P:S.ROW_P + S.NUM_V]
        Q = row[S.ROW_O:S.ROW_O + S.NUM_V + 1]    # the O coefficients
        d_out = d_out.float()
        dx0 = Q[S.NUM_V] * d_out
        if write_x0 and d_x0c is not None and d_x0c.numel():
            dx0 = dx0 + d_x0c.float()
        if clip:
            m = m_in.float()
            if ctx.guided:
                u, c = m.chunk(2)
                m = u + g * (c - u)
            v = [x_in.float(), m, None if n_in is None else n_in.float()]
            v += [None if state is None or j >= state.shape[0] else state[j].float()
                  for j in range(S.SLOTS)]
            x0 = sum(P[i] * t for i, t in enumerate(v) if t is not None)
            dx0 = dx0 * ((x0 >= -r) & (x0 <= r))
        dv = [Q[i] * d_out + P[i] * dx0 for i in range(3)]
        m_dtype, x_dtype, n_dtype = ctx.dtypes
        dm = torch.cat([(1 - g) * dv[1], g * dv[1]]) if ctx.guided else dv[1]
        return (dm.to(m_dtype), dv[0].to(x_dtype), None if n_dtype is None else dv[2].to(n_dtype),
                None, None, None, None, None, None, None, None)


def _denoise_step_autograd(model_output, sample, coeffs, step_index, noise=None, state=None,
                           guidance_scale=1.0, clip_sample=False, clip_sample_range=1.0,
                           write_x0=False, guided=None):
    """denoise_step's Autograd kernel: the op itself unless a gradient is wanted."""
    args = (model_output, sample, coeffs, step_index, noise, state, guidance_scale, clip_sample,
            clip_sample_range, write_x0, guided)
    grads = [t is not None and t.requires_grad for t in (model_output, sample, noise)]
    if not (torch.is_grad_enabled() and (any(grads) or coeffs.requires_grad
                                         or (state is not None and state.requires_grad))):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.fastdiff.denoise_step.default(*args)
    if coeffs.requires_grad:
        raise ValueError("fastdiff.denoise_step: argument 'coeffs' requires grad; gradients flow "
                         "to model_output, sample and noise only (detach the table)")
    if state is not None:
        if state.requires_grad:
            raise ValueError("fastdiff.denoise_step: argument 'state' requires grad; the op "
                             "updates it in place and does not differentiate through it (run "
                             "the step under torch.no_grad(), or detach the state)")
        # The slots the row writes would carry a gradient of model_output/sample/noise that an
        # in-place update cannot record: refused, not silently dropped (reads the row: a sync).
        row = coeffs[int(step_index.reshape(-1)[0])].double()
        dep = [i for i, w in zip((S.V_M, S.V_X, S.V_N), grads) if w]  # their places in v
        for j in range(state.shape[0]):
            r = row[S.ROW_S + j * (S.NUM_V + 1):S.ROW_S + (j + 1) * (S.NUM_V + 1)]
            from_x0 = r[S.NUM_V] != 0 and any(row[S.ROW_P + i] != 0 for i in dep)
            if row[S.ROW_W + j] != 0 and (from_x0 or any(r[i] != 0 for i in dep)):
                raise ValueError(
                    f"fastdiff.denoise_step: this step writes state slot {j} from an input "
                    "that requires grad; the op does not differentiate through its in-place "
                    "'state' (run the step under torch.no_grad(), or use a solver without "
                    "state slots)")
    return _DenoiseStepFunction.apply(model_output, sample, noise, coeffs, step_index, state,
                                      guidance_scale, clip_sample, clip_sample_range, write_x0,
                                      guided)


_autograd_lib = torch.library.Library("fastdiff", "IMPL")
_autograd_lib.impl("denoise_step", _denoise_step_autograd, "Autograd")


def _geglu_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _geglu_backward(ctx, grad):
    """d value = grad * gelu(gate), d gate = grad * value * gelu'(gate), gelu'(g) =
    Phi(g) + g phi(g), in float32 torch ops (differentiable again). Not fused."""
    (x,) = ctx.saved_tensors
    a, g = x.float().chunk(2, dim=-1)
    return _geglu_grad(a, g, grad.float()).to(x.dtype)


def _geglu_grad(a, g, grad):
    """float32 ``[d value, d gate]`` of ``value * gelu(gate)`` at (a, g) for the output's
    gradient ``grad``: gelu'(g) = Phi(g) + g phi(g)."""
    cdf = 0.5 * (1 + torch.erf(g * (1 / math.sqrt(2))))
    pdf = torch.exp(-0.5 * g * g) * (1 / math.sqrt(2 * math.pi))
    return torch.cat([grad * g * cdf, grad * a * (cdf + g * pdf)], dim=-1)


torch.library.register_autograd("fastdiff::geglu", _geglu_backward, setup_context=_geglu_setup)


def _linear_geglu_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, bias)


def _linear_geglu_backward(ctx, grad):
    """The projection recomputed in float32 torch ops (h, g = x W^T + b), then dh = dy gelu(g),
    dg = dy h gelu'(g) (gelu'(g) = Phi(g) + g phi(g)) and the Linear's gradients: dx = [dh dg] W,
    dW = [dh dg]^T x, db = [dh dg] summed over rows. Differentiable again. Not fused."""
    x, weight, bias = ctx.saved_tensors
    want = ctx.needs_input_grad
    K = weight.shape[1]
    x2 = x.reshape(-1, K).float()
    wf = weight.float()
    proj = F.linear(x2, wf, None if bias is None else bias.float())
    h, g = proj.chunk(2, dim=-1)
    dproj = _geglu_grad(h, g, grad.reshape(h.shape).float())   # (M, 2F)
    dx = (dproj @ wf).reshape(x.shape).to(x.dtype) if want[0] else None
    dw = (dproj.t() @ x2).to(weight.dtype) if want[1] else None
    db = dproj.sum(0).to(bias.dtype) if bias is not None and want[2] else None
    return dx, dw, db


torch.library.register_autograd("fastdiff::linear_geglu", _linear_geglu_backward,
                                setup_context=_linear_geglu_setup)


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, next_bias = inputs
    ctx.has_nb = next_bias is not None
    if ctx.has_nb:
        # The returned h is h + next_bias, which the block then updates in place (addmm_): save
        # what h is made of, not it (autograd would refuse a saved tensor changed in place).
        ctx.save_for_backward(x, residual, weight, bias)
        ctx.nb_dtype = next_bias.dtype
    else:
        ctx.save_for_backward(output[0], weight, bias)
    ctx.eps = eps
    ctx.dtypes = (x.dtype, residual.dtype)


def _add_layer_norm_backward(ctx, dh, dy):
    """h = x + residual, y = layer_norm(h), h_out = h + next_bias (or h): the LayerNorm's
    gradient recomputed from h (saved, or with next_bias the sum of the saved x and residual
    again) through torch's own layer_norm (float32), plus dh; x and residual both get the sum,
    next_bias the sum of dh over all rows. Not fused."""
    if ctx.has_nb:
        x, residual, weight, bias = ctx.saved_tensors
        h = (x.detach().float() + residual.detach().float()).to(x.dtype)  # as the op rounded it
    else:
        h, weight, bias = ctx.saved_tensors
    hf = h.detach().float().requires_grad_(True)
    params = [None if p is None else p.detach().float().requires_grad_(True)
              for p in (weight, bias)]
    with torch.enable_grad():
        y = F.layer_norm(hf, hf.shape[-1:], params[0], params[1], ctx.eps)
        wanted = [hf] + [p for p in params if p is not None]
        dyf = dy.float() if dy is not None else torch.zeros_like(y)
        grads = torch.autograd.grad(y, wanted, dyf, create_graph=torch.is_grad_enabled())
    dsum = grads[0] + (dh.float() if dh is not None else 0)
    rest = iter(grads[1:])
    dw, db = (None if p is None else next(rest).to(t.dtype)
              for p, t in zip(params, (weight, bias)))
    dnb = None
    if ctx.has_nb and dh is not None:
        dnb = dh.float().reshape(-1, dh.shape[-1]).sum(0).to(ctx.nb_dtype)
    return dsum.to(ctx.dtypes[0]), dsum.to(ctx.dtypes[1]), dw, db, None, dnb


torch.library.register_autograd("fastdiff::add_layer_norm", _add_layer_norm_backward,
                                setup_context=_add_layer_norm_setup)


def _layer_norm_linear_setup(ctx, inputs, output):
    x, weight, fold, shift, eps, geglu = inputs
    ctx.save_for_backward(x, weight, fold, shift)
    ctx.eps, ctx.geglu = eps, geglu


def _layer_norm_linear_backward(ctx, grad):
    """The forward recomputed in float32 torch ops from the saved inputs (statistics as the op
    takes them: var = mean(h^2) - mean^2, clamped at 0), then closed-form gradients: with
    dz the output's gradient before GEGLU (geglu's formula), u = p + d - mean colsum (p = x W'^T)
    and z = rstd u + b': d b' = sum_rows dz, d d = sum_rows rstd dz, d colsum = -sum_rows
    rstd mean dz, dp = rstd dz (dx = dp W', dW' = dp^T x); through the statistics, d rstd =
    sum_n dz u, d var = -rstd^3 / 2 d rstd (0 where clamped), d mean = -rstd dz colsum -
    2 mean d var, dh = d mean / K + 2 h d var / K, into dx and, summed over rows, d shift.
    Differentiable again. Not fused."""
    x, weight, fold, shift = ctx.saved_tensors
    want = ctx.needs_input_grad
    N, K = weight.shape
    x2 = x.reshape(-1, K).float()
    wf = weight.float()
    h = x2 if shift is None else x2 + shift
    mean = h.mean(1, keepdim=True)
    var_raw = (h * h).mean(1, keepdim=True) - mean * mean
    rstd = torch.rsqrt(var_raw.clamp_min(0) + ctx.eps)
    colsum, d = fold[0], fold[1]
    u = x2 @ wf.t() + d - mean * colsum                       # (M, N)
    g = grad.reshape(x2.shape[0], -1).float()
    if ctx.geglu:
        z = rstd * u + fold[2]
        zv, zg = z.chunk(2, dim=-1)
        dz = _geglu_grad(zv, zg, g)
    else:
        dz = g
    dp = dz * rstd
    dvar = (-0.5 * rstd ** 3 * (dz * u).sum(1, keepdim=True)) * (var_raw > 0)
    dmean = -(dp @ colsum)[:, None] - 2 * mean * dvar
    dh = (dmean + 2 * h * dvar) / K
    dx = (dp @ wf + dh).reshape(x.shape).to(x.dtype) if want[0] else None
    dw = (dp.t() @ x2).to(weight.dtype) if want[1] else None
    dfold = torch.stack([-(dp * mean).sum(0), dp.sum(0), dz.sum(0)]) if want[2] else None
    dshift = dh.sum(0) if shift is not None and want[3] else None
    return dx, dw, dfold, dshift, None, None


torch.library.register_autograd("fastdiff::layer_norm_linear", _layer_norm_linear_backward,
                                setup_context=_layer_norm_linear_setup)


def _norm_conv2d_setup(ctx, inputs, output):
    (x, packed, k, bias, x2, scale, shift, silu, temb, residual, shortcut, shortcut2,
     _) = inputs
    ctx.save_for_backward(x, packed, bias, x2, scale, shift, temb, residual, shortcut,
                          shortcut2)
    ctx.k, ctx.silu = k, silu


def _norm_conv2d_backward(ctx, grad):
    """The forward recomputed with plain torch ops in float32 from the saved inputs (the
    prologue's rounding to x's dtype left out: its gradient is the identity's), then
    torch.autograd.grad for every input that wants one (x, packed, bias, x2, scale, shift,
    temb, residual, shortcut, shortcut2). Differentiable again. Not fused."""
    saved = ctx.saved_tensors
    want = ctx.needs_input_grad
    names = ("x", "packed", "bias", "x2", "scale", "shift", "temb", "residual", "shortcut",
             "shortcut2")
    index = (0, 1, 3, 4, 5, 6, 8, 9, 10, 11)  # their places in the schema
    with torch.enable_grad():
        leaves = {}
        for name, t, i in zip(names, saved, index):
            if t is None:
                leaves[name] = None
                continue
            leaves[name] = t.detach().float().requires_grad_(bool(want[i]))
        v = leaves
        a = v["x"] if v["x2"] is None else torch.cat([v["x"], v["x2"]], 1)
        if v["scale"] is not None:
            a = a * v["scale"][:, :, None, None] + v["shift"][:, :, None, None]
        if ctx.silu:
            a = F.silu(a)
        k = ctx.k
        C = a.shape[1]
        O = v["packed"].shape[0]
        wconv = v["packed"][:, :k * k * C].reshape(O, k, k, C).permute(0, 3, 1, 2)
        y = F.conv2d(a, wconv, v["bias"], padding=k // 2)
        if v["shortcut"] is not None:
            s = v["shortcut"] if v["shortcut2"] is None else torch.cat([v["shortcut"],
                                                                        v["shortcut2"]], 1)
            y = y + torch.einsum("os,nshw->nohw", v["packed"][:, k * k * C:], s)
        if v["temb"] is not None:
            y = y + v["temb"][:, :, None, None]
        if v["residual"] is not None:
            y = y + v["residual"]
        wanted = [n for n in names if v[n] is not None and v[n].requires_grad]
        grads = torch.autograd.grad(y, [v[n] for n in wanted], grad.float(),
                                    create_graph=torch.is_grad_enabled())
    got = dict(zip(wanted, grads))
    out = [None] * 13
    for name, t, i in zip(names, saved, index):
        if name in got:
            out[i] = got[name].to(t.dtype)
    return tuple(out)


torch.library.register_autograd("fastdiff::norm_conv2d", _norm_conv2d_backward,
                                setup_context=_norm_conv2d_setup)


def _group_norm_scale_shift_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps, x2 = inputs
    ctx.save_for_backward(x, weight, bias, x2)
    ctx.num_groups, ctx.eps = num_groups, eps


def _group_norm_scale_shift_backward(ctx, grad_scale, grad_shift):
    """The statistics recomputed with plain torch ops in float32 from the saved inputs, then
    torch.autograd.grad for x, weight, bias and x2 (a use that trains through the affine, e.g.
    with norm_conv2d, gets the gradients F.group_norm would give). Differentiable again. Not
    fused."""
    x, weight, bias, x2 = ctx.saved_tensors
    want = ctx.needs_input_grad
    with torch.enable_grad():
        leaf = lambda t, i: (None if t is None else  # noqa: E731
                             t.detach().float().requires_grad_(bool(want[i])))
        vx, vw, vb, vx2 = leaf(x, 0), leaf(weight, 2), leaf(bias, 3), leaf(x2, 5)
        a = vx if vx2 is None else torch.cat([vx, vx2], 1)
        n, c = a.shape[:2]
        var, mean = torch.var_mean(a.reshape(n, ctx.num_groups, -1), dim=2, unbiased=False)
        rstd = torch.rsqrt(var + ctx.eps).repeat_interleave(c // ctx.num_groups, 1)
        mean = mean.repeat_interleave(c // ctx.num_groups, 1)
        scale = rstd if vw is None else rstd * vw
        shift = -mean * scale if vb is None else vb - mean * scale
        leaves = [(t, i) for t, i in ((vx, 0), (vw, 2), (vb, 3), (vx2, 5))
                  if t is not None and t.requires_grad]
        outs, grads = [], []
        for out, g in ((scale, grad_scale), (shift, grad_shift)):
            if g is not None:
                outs.append(out)
                grads.append(g.float())
        got = (torch.autograd.grad(outs, [t for t, _ in leaves], grads,
                                   create_graph=torch.is_grad_enabled(), allow_unused=True)
               if outs and leaves else ())
    result = [None] * 6
    saved = (x, None, weight, bias, None, x2)
    for (_, i), g in zip(leaves, got):
        result[i] = None if g is None else g.to(saved[i].dtype)
    return tuple(result)


torch.library.register_autograd("fastdiff::group_norm_scale_shift",
                                _group_norm_scale_shift_backward,
                                setup_context=_group_norm_scale_shift_setup)
