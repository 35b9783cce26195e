"""The ops' autograd formulas (fastdiff/ops.py) and group_norm_silu's fused backward op on every
backend, against autograd through the float64 references (fastdiff/reference.py)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, HAS_CUDA, assert_close_to_ref, run_op

from fastdiff import ops, reference, schedules

# gradcheck warns for float32 inputs; the ops take no float64, so the checks run in float32
# with tolerances to match (the float64 comparisons are against the references)
pytestmark = pytest.mark.filterwarnings("ignore:Input #.*double precision:UserWarning")

NAMES = ("x", "weight", "bias", "pre_bias", "scale", "shift")

DTYPES = [
    # (dtype, atol relative to the largest reference gradient)
    (torch.float32, 1e-5),
    (torch.float16, 2e-3),
    (torch.bfloat16, 2e-2),
]

SHAPES = [
    # (N, C, H, W, G)
    (2, 12, 5, 7, 4),      # C not a multiple of 8, odd spatial size, 3 channels per group
    (3, 6, 1, 1, 6),       # HW = 1 and one channel per group: xhat = 0, dx = 0
    (1, 10, 9, 3, 5),      # N = 1, two channels per group
    (2, 7, 4, 4, 7),       # one channel per group, C prime
    (2, 64, 16, 16, 32),   # several tiles per group (Triton: BLOCK_P < HW)
]

FUSIONS = [
    # (pre_bias, scale_shift, silu)
    (False, False, True),   # GroupNorm + SiLU (ResNet norm1)
    (True, False, True),    # diffusers 'default' time embedding
    (False, True, True),    # AdaGN 'scale_shift'
    (True, True, False),    # everything but SiLU
]


def _inputs(N, C, H, W, dtype, pre, ss, channels_last, small_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + N * 1000 + C * 10 + H)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = (r(N, C, H, W) * 2 + 0.5).to(dtype)
    dy = r(N, C, H, W).to(dtype)
    if channels_last:
        x, dy = (t.to(memory_format=torch.channels_last) for t in (x, dy))
    small = lambda *s: r(*s).to(small_dtype)  # noqa: E731
    return dy, (x, small(C), small(C), small(N, C) if pre else None,
                small(N, C) * 0.5 if ss else None, small(N, C) if ss else None)


def _ref_grads(dy, x, G, w, b, pre, sc, sh, silu, eps=1e-5):
    """Gradients by autograd through the float64 reference."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in
              (x, w, b, pre, sc, sh)]
    y = reference.group_norm_silu(leaves[0], G, *leaves[1:3], eps, *leaves[3:], silu)
    given = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, given, dy.double()))
    return [None if t is None else next(grads) for t in leaves]


def _torch_grads(dy, x, G, w, b, pre, sc, sh, silu, eps=1e-5):
    """torch's own GroupNorm(+SiLU) backward in x's dtype: the yardstick of the error bound."""
    leaves = [None if t is None else t.detach().to(x.dtype).requires_grad_() for t in
              (x, w, b, pre, sc, sh)]
    xl, wl, bl, pl, sl, shl = leaves
    h = xl if pl is None else xl + pl[:, :, None, None]
    y = F.group_norm(h, G, wl, bl, eps)
    if sl is not None:
        y = y * (1 + sl[:, :, None, None]) + shl[:, :, None, None]
    y = F.silu(y) if silu else y
    given = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, given, dy))
    return [None if t is None else next(grads) for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("pre,ss,silu", FUSIONS, ids=["silu", "temb", "adagn", "no-silu"])
def test_group_norm_silu_backward_matches_reference(backend, dtype, atol, shape, channels_last,
                                                    pre, ss, silu):
    N, C, H, W, G = shape
    if backend == "triton" and C * H * W > 4000 and (dtype != torch.float32 or channels_last):
        pytest.skip("interpreted Triton: the large shape runs in fp32 NCHW only")
    if backend == "triton" and shape != SHAPES[0] and not pre:
        pytest.skip("interpreted Triton: on this shape the fusions with a pre_bias only (with "
                    "and without scale/shift and SiLU: every branch of the backward; suite time)")
    dy, args = _inputs(N, C, H, W, dtype, pre, ss, channels_last)
    x, w, b, p, sc, sh = args
    out = run_op(backend, "group_norm_silu_backward", dy, x, G, w, b, 1e-5, p, sc, sh, silu)
    assert out[0].dtype == dtype and out[0].shape == x.shape
    if channels_last and C > 1 and H * W > 1:
        assert out[0].is_contiguous(memory_format=torch.channels_last)
    ref = _ref_grads(dy, *args[:1], G, *args[1:], silu)
    yard = _torch_grads(dy, *args[:1], G, *args[1:], silu)
    for name, o, r, t, given in zip(NAMES, out, ref, yard, args):
        if given is None:
            assert o.numel() == 0, name
            continue
        assert o.dtype == given.dtype, name
        scale = max(1.0, r.abs().max().item())
        assert_close_to_ref(o, r, t, atol * scale, what=f"{backend} {dtype} d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_silu_backward_small_tensors_in_x_dtype_and_no_affine(backend):
    """Half weight/bias/pre_bias/scale/shift give half gradients; no weight/bias gives none."""
    dy, (x, w, b, p, sc, sh) = _inputs(2, 8, 3, 5, torch.float16, True, True, False,
                                       torch.float16)
    out = run_op(backend, "group_norm_silu_backward", dy, x, 4, w, b, 1e-5, p, sc, sh, True)
    assert [o.dtype for o in out] == [torch.float16] * 6
    ref = _ref_grads(dy, x, 4, w, b, p, sc, sh, True)
    for o, r in zip(out, ref):
        assert_close_to_ref(o, r, atol=3e-3 * max(1.0, r.abs().max().item()))
    out = run_op(backend, "group_norm_silu_backward", dy, x, 4, None, None, 1e-5, None, None,
                 None, True)
    assert [o.numel() for o in out[1:]] == [0] * 5
    ref = _ref_grads(dy, x, 4, None, None, None, None, None, True)
    assert_close_to_ref(out[0], ref[0], atol=3e-3 * ref[0].abs().max().item())


def test_group_norm_silu_backward_checks_its_arguments():
    dy, (x, w, b, p, sc, sh) = _inputs(2, 8, 3, 5, torch.float32, True, True, False)
    op = torch.ops.fastdiff.group_norm_silu_backward
    with pytest.raises(ValueError, match="'grad_y' must have the shape of 'x'"):
        op(dy[:1], x, 4, w, b, 1e-5, p, sc, sh, True)
    with pytest.raises(ValueError, match="'grad_y' must have the dtype of 'x'"):
        op(dy.half(), x, 4, w, b, 1e-5, p, sc, sh, True)
    with pytest.raises(ValueError, match="'grad_y' must have the memory format of 'x'"):
        op(dy.to(memory_format=torch.channels_last), x, 4, w, b, 1e-5, p, sc, sh, True)
    with pytest.raises(ValueError, match="'num_groups'=3"):
        op(dy, x, 3, w, b, 1e-5, p, sc, sh, True)
    with pytest.raises(ValueError, match="argument 'scale' must have shape"):
        op(dy, x, 4, w, b, 1e-5, p, sc[:1], sh, True)


def test_group_norm_silu_backward_meta():
    """The Meta kernel gives every gradient's shape, dtype and layout (torch.compile, AOT)."""
    dy, (x, w, b, p, sc, sh) = _inputs(2, 8, 3, 5, torch.float16, True, True, True)
    meta = [None if t is None else t.to("meta") for t in (dy, x, w, b, p, sc, sh)]
    out = torch.ops.fastdiff.group_norm_silu_backward(*meta[:2], 4, *meta[2:4], 1e-5, *meta[4:],
                                                      True)
    assert [o.shape for o in out] == [x.shape, w.shape, b.shape, p.shape, sc.shape, sh.shape]
    assert out[0].is_contiguous(memory_format=torch.channels_last)
    assert [o.dtype for o in out] == [torch.float16] + [torch.float32] * 5


# ---------------------------------------------------------------- the registered formulas

def _ref_f64_grads(fn, ref_fn, inputs, seed=0):
    """Gradients of sum(out * r) through ``fn`` (the op) and ``ref_fn`` (the float64 reference)
    for the inputs that require grad, as (ours, reference) pairs."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
              else t for t in inputs]
    out = fn(*leaves)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    ours = torch.autograd.grad(out, wanted, r)
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad)
                if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    wanted64 = [t for t in leaves64 if isinstance(t, torch.Tensor) and t.requires_grad]
    ref = torch.autograd.grad(ref_fn(*leaves64), wanted64, r.double())
    return list(zip(ours, ref))


def _assert_rel(pairs, rtol, what=""):
    for i, (o, r) in enumerate(pairs):
        err = (o.double() - r).abs().max().item()
        assert err <= rtol * max(r.abs().max().item(), 1e-6), f"{what} grad {i}: {err:.3g}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_group_norm_silu_autograd_through_the_entry_point(channels_last):
    """Natural shapes ((N, C, 1, 1) scale/shift, (C,) pre_bias) and every input requiring grad."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 5, 3, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b, pre = torch.randn(12, generator=g), torch.randn(12, generator=g), torch.randn(12)
    sc, sh = torch.randn(2, 12, 1, 1, generator=g), torch.randn(2, 12, 1, 1, generator=g)
    inputs = [t.requires_grad_() for t in (x, w, b, pre, sc, sh)]

    def fused(x, w, b, pre, sc, sh):
        return ops.group_norm_silu(x, 4, w, b, 1e-5, pre_bias=pre, scale=sc, shift=sh)

    def ref(x, w, b, pre, sc, sh):
        n, c = x.shape[:2]
        return reference.group_norm_silu(x, 4, w, b, 1e-5, pre.expand(n, c), sc.flatten(1),
                                         sh.flatten(1))
    _assert_rel(_ref_f64_grads(fused, ref, inputs), 1e-5, "group_norm_silu")


def _entry_grads(args, G, silu, dy, channels_last_out, device="cpu"):
    """Gradients of every given input through fastdiff.ops.group_norm_silu (the registered
    formula), for dy as given (its layout included)."""
    leaves = [None if t is None else t.detach().to(device).requires_grad_() for t in args]
    x, w, b, pre, sc, sh = leaves
    y = ops.group_norm_silu(x, G, w, b, 1e-5, pre_bias=pre, scale=sc, shift=sh, silu=silu,
                            channels_last_out=channels_last_out)
    assert y.is_contiguous(memory_format=torch.channels_last) or not channels_last_out
    given = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, given, dy.to(device)))
    return [None if t is None else next(grads).cpu() for t in leaves]


@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("pre,ss,silu", FUSIONS, ids=["silu", "temb", "adagn", "no-silu"])
def test_group_norm_silu_channels_last_out_gradients(dtype, atol, shape, channels_last, pre, ss,
                                                     silu):
    """channels_last_out=True: dy comes back channels_last (the tokens' layout) whatever x's
    layout; the formula makes it x's layout for the backward op, so every gradient is exactly
    that of channels_last_out=False, and meets the reference's rule."""
    N, C, H, W, G = shape
    dy, args = _inputs(N, C, H, W, dtype, pre, ss, channels_last)
    got = _entry_grads(args, G, silu, dy.contiguous(memory_format=torch.channels_last), True)
    plain = _entry_grads(args, G, silu, dy, False)
    ref = _ref_grads(dy, *args[:1], G, *args[1:], silu)
    yard = _torch_grads(dy, *args[:1], G, *args[1:], silu)
    for name, o, p, r, t, given in zip(NAMES, got, plain, ref, yard, args):
        if given is None:
            continue
        assert o.stride() == given.stride() and torch.equal(o, p), name
        scale = max(1.0, r.abs().max().item())
        assert_close_to_ref(o, r, t, atol * scale, what=f"{dtype} d{name}")


def test_group_norm_silu_gradcheck():
    """torch.autograd.gradcheck: float64 finite differences of the float64 reference against
    the fused backward op (float32 inside: atol set for that), and the registered formula in
    float32 end to end."""
    g = torch.Generator().manual_seed(2)
    x64 = torch.randn(2, 6, 3, 2, generator=g, dtype=torch.float64)
    small = [torch.randn(*s, generator=g, dtype=torch.float64) for s in
             ((6,), (6,), (2, 6), (2, 6), (2, 6))]

    class RefForwardOpBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b, pre, sc, sh):
            ctx.save_for_backward(x, w, b, pre, sc, sh)
            return reference.group_norm_silu(x, 3, w, b, 1e-5, pre, sc, sh, True)

        @staticmethod
        def backward(ctx, grad):
            x, *rest = (t.float() for t in ctx.saved_tensors)
            out = torch.ops.fastdiff.group_norm_silu_backward(grad.float(), x, 3, rest[0],
                                                              rest[1], 1e-5, *rest[2:], True)
            return tuple(o.double() for o in out)

    inputs = [t.requires_grad_() for t in (x64, *small)]
    assert torch.autograd.gradcheck(RefForwardOpBackward.apply, inputs, atol=2e-5, rtol=1e-4)

    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(
        lambda x, w, b, p, s, sh: ops.group_norm_silu(x, 3, w, b, pre_bias=p, scale=s, shift=sh),
        inputs32, eps=1e-3, atol=3e-3, rtol=3e-3)


ATTN_CASES = [
    # (B, H, Lq, Lk, D, mask): mask None, "bias" (learned additive, broadcast over B and H),
    # "bool" (padding), "rows" (a query row with every key masked: its gradient is 0)
    (2, 3, 5, 7, 8, None),
    (1, 2, 9, 77, 40, "bias"),      # a 77-token context, SD's head dim 40
    (2, 1, 4, 6, 16, "bool"),
    (2, 2, 3, 5, 8, "rows"),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"{c[:5]}-{c[5]}")
def test_attention_autograd_matches_reference(case):
    B, H, Lq, Lk, D, kind = case
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, L, D, generator=g).requires_grad_() for L in (Lq, Lk, Lk))
    mask = None
    if kind == "bias":
        mask = torch.randn(1, 1, Lq, Lk, generator=g).requires_grad_()
    elif kind in ("bool", "rows"):
        keep = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
        keep[..., 0] = True
        if kind == "rows":
            keep[0, 0, 1] = False
        mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    inputs = [q, k, v] + ([mask] if mask is not None else [])

    def fused(q, k, v, m=None):
        return ops.attention(q, k, v, m)

    def ref(q, k, v, m=None):
        if kind == "rows":
            # The op's fully masked row is a constant 0; the reference's softmax there is NaN,
            # whose gradient spreads NaN. Its gradient is the reference's with that row unmasked
            # and cut from the output.
            m = m.clone()
            m[0, 0, 1] = 0
            out = reference.attention(q, k, v, m).clone()
            out[0, :, 1] = 0
            return out
        return reference.attention(q, k, v, m)
    pairs = _ref_f64_grads(fused, ref, inputs)
    _assert_rel(pairs, 1e-5, f"attention {case}")
    if kind == "rows":  # the fully masked row contributes nothing
        assert pairs[0][0][0, :, 1].abs().max() == 0


def test_attention_autograd_fp16_and_gradcheck():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    pairs = _ref_f64_grads(lambda q, k, v: ops.attention(q, k, v),
                           lambda q, k, v: reference.attention(q, k, v),
                           [t.half().requires_grad_() for t in (q, k, v)])
    assert all(o.dtype == torch.float16 for o, _ in pairs)
    _assert_rel(pairs, 5e-3, "attention fp16")
    mask = torch.randn(1, 1, 6, 6, generator=g)
    assert torch.autograd.gradcheck(lambda q, k, v, m: ops.attention(q, k, v, m),
                                    [t.requires_grad_() for t in (q, k, v, mask)],
                                    eps=1e-3, atol=2e-3, rtol=2e-3)


def test_attention_backward_chunks_the_batch(monkeypatch):
    """The backward bounds its score memory by walking the batch: chunks give the same result."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 2, 4, 8, generator=g).requires_grad_() for _ in range(3))
    mask = torch.randn(1, 2, 4, 4, generator=g).requires_grad_()
    whole = torch.autograd.grad(ops.attention(q, k, v, mask).sum(), (q, k, v, mask))
    monkeypatch.setattr(ops, "_ATTENTION_BACKWARD_BYTES", 1)
    chunked = torch.autograd.grad(ops.attention(q, k, v, mask).sum(), (q, k, v, mask))
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _row_table(p, o, s_rows=None, w=None):
    """A one-row table: P and O coefficients (and slot rows) given as {input index: value}."""
    row = torch.zeros(1, schedules.ROW_LEN)
    for i, c in p.items():
        row[0, schedules.ROW_P + i] = c
    for i, c in o.items():
        row[0, schedules.ROW_O + i] = c
    for j, r in (s_rows or {}).items():
        row[0, schedules.ROW_W + j] = 1.0
        for i, c in r.items():
            row[0, schedules.ROW_S + j * (schedules.NUM_V + 1) + i] = c
    return row


X, M, NOISE, X0 = 0, 1, 2, schedules.NUM_V   # indices into a row's v (and O's x0c entry)


@pytest.mark.parametrize("guided,clip,write_x0", [(False, False, False), (True, False, True),
                                                  (True, True, True), (False, True, False)],
                         ids=["plain", "guided", "guided-clip", "clip"])
def test_denoise_step_autograd_matches_reference(guided, clip, write_x0):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, 4, generator=g) * 2
    m = torch.randn(4 if guided else 2, 3, 4, 4, generator=g)
    n = torch.randn(2, 3, 4, 4, generator=g)
    # a DDPM-like row: x0 = 1.3 x - 0.6 m, out = 0.4 x + 0.2 m + 0.5 n + 0.7 x0c; slot 0 is read
    coeffs = _row_table({X: 1.3, M: -0.6, 3: 0.25}, {X: 0.4, M: 0.2, NOISE: 0.5, X0: 0.7})
    idx = torch.zeros(1, dtype=torch.int64)
    state = torch.randn(1, 2, 3, 4, 4, generator=g)
    gs = 3.0 if guided else 1.0
    r1, r2 = torch.randn(2, 2, 3, 4, 4, generator=g)

    def loss(out, x0):   # x0 enters only where the op writes it
        return (out * r1).sum() + ((x0 * r2).sum() if write_x0 else 0)

    leaves = [t.clone().requires_grad_() for t in (m, x, n)]
    out, x0 = ops.denoise_step(leaves[0], leaves[1], coeffs, idx, leaves[2], state.clone(), gs,
                               clip, 1.0, write_x0, guided)
    ours = torch.autograd.grad(loss(out, x0), leaves)
    leaves64 = [t.double().requires_grad_() for t in (m, x, n)]
    out, x0, _ = reference.denoise_step_v2(leaves64[0], leaves64[1], coeffs, idx, leaves64[2],
                                           state, gs, clip, 1.0, guided)
    ref = torch.autograd.grad(loss(out, x0), leaves64)
    _assert_rel(list(zip(ours, ref)), 1e-5, "denoise_step")
    if clip:   # the case clips: some x0 lie beyond the range
        x0 = reference.denoise_step_v2(m, x, coeffs, idx, n, state, gs, False, 1.0, guided)[1]
        assert (x0.abs() > 1).any() and (x0.abs() < 1).any()


def test_denoise_step_state_is_not_differentiated():
    """Gradients through the in-place state are refused with a clear error, not dropped."""
    g = torch.Generator().manual_seed(7)
    x, m = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g).requires_grad_()
    idx = torch.zeros(1, dtype=torch.int64)
    writes = _row_table({X: 1.0, M: -0.5}, {X: 0.9, X0: 0.1}, {0: {X0: 1.0}})
    with pytest.raises(ValueError, match="writes state slot 0 from an input that requires grad"):
        ops.denoise_step(m, x, writes, idx, state=torch.zeros(1, 2, 3))
    with torch.no_grad():   # the same call without autograd runs
        ops.denoise_step(m, x, writes, idx, state=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="argument 'state' requires grad"):
        ops.denoise_step(m.detach(), x, writes, idx, state=torch.zeros(1, 2, 3).requires_grad_())
    with pytest.raises(ValueError, match="argument 'coeffs' requires grad"):
        ops.denoise_step(m, x, writes.clone().requires_grad_(), idx)
    # a row that only reads the slot (and writes one from x, which needs no gradient) is fine
    reads = _row_table({X: 1.0, 3: 0.5}, {X: 0.9, M: 0.2}, {0: {X: 1.0}})
    state = torch.ones(1, 2, 3)
    out, _ = ops.denoise_step(m, x, reads, idx, state=state)
    (gm,) = torch.autograd.grad(out.sum(), m)
    torch.testing.assert_close(gm, torch.full((2, 3), 0.2))
    torch.testing.assert_close(state[0], x)   # the slot was still written in place


def test_denoise_step_without_grad_is_untouched():
    """No input requiring grad: the op as before (outputs without grad_fn, state in place)."""
    x, m = torch.randn(2, 3), torch.randn(2, 3)
    row = _row_table({X: 1.0}, {X: 0.5}, {0: {M: 1.0}})
    state = torch.zeros(1, 2, 3)
    out, _ = ops.denoise_step(m, x, row, torch.zeros(1, dtype=torch.int64), state=state)
    assert out.grad_fn is None
    torch.testing.assert_close(state[0], m)


def test_double_backward():
    """attention's backward is differentiable again (gradgradcheck); group_norm_silu's fused
    backward is first order and says so instead of giving a wrong second derivative."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g).requires_grad_() for _ in range(3))
    assert torch.autograd.gradgradcheck(lambda q, k, v: ops.attention(q, k, v), (q, k, v),
                                        eps=1e-3, atol=5e-3, rtol=5e-3)
    x = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    (gx,) = torch.autograd.grad(ops.group_norm_silu(x, 2).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_opcheck_autograd_registration_and_fake_tensors():
    """torch.library.opcheck: the schema, the autograd registration and the Meta kernels."""
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default,
                          (x, 4, w, b, 1e-5, None, None, None, True), test_utils=tests)
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    for xi in (x, x.detach().to(memory_format=torch.channels_last).requires_grad_()):
        torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default,
                              (xi, 4, w, b, 1e-5, None, None, None, False, True),
                              test_utils=tests)
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, q.detach(), q.detach()),
                          test_utils=tests)
    dy = torch.randn(2, 8, 3, 3)
    torch.library.opcheck(torch.ops.fastdiff.group_norm_silu_backward.default,
                          (dy, x.detach(), 4, w.detach(), b.detach(), 1e-5, None, None, None,
                           True), test_utils=("test_schema", "test_faketensor"))
    h = torch.randn(2, 3, 8, requires_grad=True)
    for nb in (None, torch.randn(8, requires_grad=True)):
        torch.library.opcheck(torch.ops.fastdiff.add_layer_norm.default,
                              (h, h.detach() * 2, w, b, 1e-5, nb), test_utils=tests)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_group_norm_silu_autograd(dtype):
    """The CUDA backward (Triton JIT: the backward has no prebuilt cubins, so 'require' would
    refuse it) through the registered formula, against the CPU kernel's gradients."""
    dy, args = _inputs(2, 64, 16, 16, dtype, True, True, True)
    prev = ops.set_prebuilt("on")
    try:
        cpu = torch.autograd.grad(ops.group_norm_silu(*[a.requires_grad_() if a is not None
                                                        else None for a in args[:1]], 32,
                                                      *args[1:3], pre_bias=args[3],
                                                      scale=args[4], shift=args[5]), args[0], dy)
        xg = args[0].detach().cuda().requires_grad_()
        small = [a.cuda() for a in args[1:]]
        y = ops.group_norm_silu(xg, 32, small[0], small[1], pre_bias=small[2], scale=small[3],
                                shift=small[4])
        (gx,) = torch.autograd.grad(y, xg, dy.cuda())
    finally:
        ops.set_prebuilt(prev)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(gx.cpu().float(), cpu[0].float(), rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_group_norm_silu_channels_last_out(dtype):
    """SD1.5's transformer norm on CUDA (NCHW x, channels_last out, no SiLU: the prebuilt
    cubin where installed) and a fused call (SiLU, scale/shift: the JIT): outputs equal to
    channels_last_out=False, gradients to the CPU kernel's."""
    for pre, ss, silu in ((False, False, False), (True, True, True)):
        dy, args = _inputs(2, 320, 16, 16, dtype, pre, ss, False)
        prev = ops.set_prebuilt("on")
        try:
            xg, *small = (None if a is None else a.cuda() for a in args)
            kw = dict(pre_bias=small[2], scale=small[3], shift=small[4], silu=silu)
            y = ops.group_norm_silu(xg, 32, *small[:2], channels_last_out=True, **kw)
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(y, ops.group_norm_silu(xg, 32, *small[:2], **kw))
            dy_cl = dy.contiguous(memory_format=torch.channels_last)
            gpu = _entry_grads(args, 32, silu, dy_cl, True, device="cuda")
        finally:
            ops.set_prebuilt(prev)
        cpu = _entry_grads(args, 32, silu, dy_cl, True)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for g, c in zip(gpu, cpu):
            if c is not None:
                torch.testing.assert_close(g.float(), c.float(), rtol=tol, atol=tol)


# ---------------------------------------------------------------- geglu, add_layer_norm

@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
def test_geglu_autograd_matches_reference(dtype, atol):
    """accelerate runs every GEGLU on the op: training needs its gradient (torch ops, float32)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 5, 2 * 13, generator=g) * 3).to(dtype).requires_grad_()
    dy = torch.randn(2, 5, 13, generator=g).to(dtype)
    (gx,) = torch.autograd.grad(ops.geglu(x), x, dy)
    x64 = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(reference.geglu(x64), x64, dy.double())
    assert gx.dtype == dtype
    err = (gx.double() - ref).abs().max().item()
    assert err <= atol * ref.abs().max().item(), err


def test_geglu_gradcheck_and_double_backward():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2 * 4, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(ops.geglu, (x,), eps=1e-3, atol=2e-3, rtol=2e-3)
    assert torch.autograd.gradgradcheck(ops.geglu, (x,), eps=1e-3, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("affine,next_bias", [(True, False), (False, False), (True, True),
                                               (False, True)])
def test_add_layer_norm_autograd_matches_torch(affine, next_bias):
    """Gradients of (h, y) for x, residual, weight, bias and next_bias equal eager's add +
    layer_norm (+ the add of next_bias to h)."""
    g = torch.Generator().manual_seed(5)
    C = 12
    x, r = (torch.randn(2, 7, C, generator=g).requires_grad_() for _ in range(2))
    w = (torch.randn(C, generator=g) if affine else None)
    b = (torch.randn(C, generator=g) if affine else None)
    nb = (torch.randn(C, generator=g) if next_bias else None)
    params = [p.requires_grad_() for p in (w, b, nb) if p is not None]
    dh, dy = torch.randn(2, 7, C, generator=g), torch.randn(2, 7, C, generator=g)
    h, y = ops.add_layer_norm(x, r, w, b, 1e-5, nb)
    got = torch.autograd.grad((h * dh).sum() + (y * dy).sum(), [x, r, *params])
    h2 = x + r
    y2 = F.layer_norm(h2, (C,), w, b, 1e-5)
    h2 = h2 if nb is None else h2 + nb
    want = torch.autograd.grad((h2 * dh).sum() + (y2 * dy).sum(), [x, r, *params])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_add_layer_norm_next_bias_grad_in_low_precision(dtype):
    """d next_bias = the sum of d h_out over every row, accumulated in float32 (many rows of
    fp16/bf16 gradients), in next_bias's dtype; y alone leaves it no gradient."""
    g = torch.Generator().manual_seed(8)
    C = 40
    x, r = (torch.randn(3, 257, C, generator=g).to(dtype) for _ in range(2))
    nb = torch.randn(C, generator=g).to(dtype).requires_grad_()
    dh = torch.randn(3, 257, C, generator=g).to(dtype)
    h, y = ops.add_layer_norm(x, r, None, None, 1e-5, nb)
    (gnb,) = torch.autograd.grad(h, nb, dh)
    assert gnb.dtype == dtype
    ref = dh.double().sum((0, 1))
    torch.testing.assert_close(gnb.double(), ref, rtol=1e-2, atol=1e-2)
    h, y = ops.add_layer_norm(x, r, None, None, 1e-5, nb)
    (gnb,) = torch.autograd.grad(y, nb, torch.ones_like(y), allow_unused=True)
    assert gnb is None or not gnb.any()


@pytest.mark.parametrize("next_bias", [False, True], ids=["plain", "next_bias"])
def test_add_layer_norm_gradcheck(next_bias):
    g = torch.Generator().manual_seed(6)
    x, r, w, b, nb = (torch.randn(*s, generator=g, requires_grad=True)
                      for s in ((2, 3, 6), (2, 3, 6), (6,), (6,), (6,)))
    if next_bias:
        fn = lambda x, r, w, b, nb: ops.add_layer_norm(x, r, w, b, 1e-5, nb)  # noqa: E731
        args = (x, r, w, b, nb)
    else:
        fn = lambda *a: ops.add_layer_norm(*a, 1e-5)  # noqa: E731
        args = (x, r, w, b)
    assert torch.autograd.gradcheck(fn, args, eps=1e-3, atol=5e-3, rtol=5e-3)


def test_no_grad_calls_skip_the_autograd_kernels_and_grad_calls_keep_them():
    """Under no_grad (pipelines) the entry points call below the Autograd key (the formulas'
    Python kernels cost ~5 us a call); with grad mode on they do not: the outputs are the same
    and the gradients still flow."""
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    h = torch.randn(2, 5, 12, requires_grad=True)
    with torch.no_grad():
        y0, g0 = ops.group_norm_silu(x, 4), ops.geglu(h)
    assert y0.grad_fn is None and g0.grad_fn is None
    y1, g1 = ops.group_norm_silu(x, 4), ops.geglu(h)
    assert y1.grad_fn is not None and g1.grad_fn is not None
    torch.testing.assert_close(y1.detach(), y0, rtol=0, atol=0)
    torch.testing.assert_close(g1.detach(), g0, rtol=0, atol=0)
    (y1.sum() + g1.sum()).backward()
    assert x.grad is not None and h.grad is not None


# torch's forward_ad module scripts its jvp decompositions on first use (torch's warning)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["group_norm_silu", "attention", "geglu", "add_layer_norm",
                                  "denoise_step", "layer_norm_linear"])
def test_forward_mode_ad_is_refused_not_silently_dropped(name):
    """The ops have backward formulas only; a dual tensor came out with a None tangent (a
    silent wrong answer for torch.func.jvp users). Now a NotImplementedError naming the op."""
    import torch.autograd.forward_ad as fwAD
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 3, 3, generator=g)
    calls = {
        "group_norm_silu": lambda d: ops.group_norm_silu(d, 2),
        "attention": lambda d: ops.attention(d, d, d),
        "geglu": lambda d: ops.geglu(d),
        "add_layer_norm": lambda d: ops.add_layer_norm(d, d),
        "denoise_step": lambda d: ops.denoise_step(
            d, d, torch.zeros(1, schedules.ROW_LEN), torch.zeros(1, dtype=torch.long)),
        "layer_norm_linear": lambda d: ops.layer_norm_linear(d, torch.ones(4, 3),
                                                             torch.zeros(3, 4)),
    }
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
            dual = fwAD.make_dual(x, torch.ones_like(x))
            with pytest.raises(NotImplementedError, match=f"fastdiff.{name}: forward-mode AD"):
                calls[name](dual)
