"""The three fused ops: their Python entry points.

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

import torch

from fastdiff import _C, prebuilt

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
    return _C._prebuilt_set_mode(mode)


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


# Every op's _jit_<op> (defined by the extension, csrc/ops.cpp define_op), on every device.
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
                reals: dict | None = None) -> None:
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


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5, *,
                    pre_bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                    shift: torch.Tensor | None = None, silu: bool = True) -> torch.Tensor:
    """GroupNorm with fp32 statistics, optional fusions, then SiLU.

    ``silu(norm(x + pre_bias) * (1 + scale) + shift)`` where ``norm`` is GroupNorm with affine
    ``weight``/``bias``. x: (N, C, H, W), contiguous or channels_last; pre_bias, scale, shift:
    (N, C) or (N, C, 1, 1). Returns x's dtype and memory format.
    """
    check_types("group_norm_silu",
                dict(x=x, weight=weight, bias=bias, pre_bias=pre_bias, scale=scale, shift=shift),
                dict(num_groups=num_groups), dict(eps=eps))
    n, c = (x.shape[0], x.shape[1]) if x.dim() >= 2 else (0, 0)
    return torch.ops.fastdiff.group_norm_silu(
        x, num_groups, weight, bias, eps, _per_channel(pre_bias, n, c),
        _per_channel(scale, n, c), _per_channel(shift, n, c), silu)


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
    return torch.ops.fastdiff.attention(q, k, v, attn_mask, scale)


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
    ``noise`` counts as zeros. state: (K, *sample.shape), 1 <= K <= 4 slots in sample's dtype
    (a table's ``slots``; zeros before the first step), updated in place where the row writes
    them; None when the rows use no slot. Returns (next sample, predicted x0 or empty).
    """
    check_types("denoise_step", dict(model_output=model_output, sample=sample, coeffs=coeffs,
                                     step_index=step_index, noise=noise, state=state),
                reals=dict(guidance_scale=guidance_scale, clip_sample_range=clip_sample_range))
    return torch.ops.fastdiff.denoise_step(model_output, sample, coeffs, step_index, noise, state,
                                           guidance_scale, clip_sample, clip_sample_range, write_x0,
                                           guided)
