"""fastdiff::add_layer_norm on every backend against the float64 reference
(fastdiff.reference.add_layer_norm): the residual sum h = x + residual and the LayerNorm of h
over the last dim, with next_bias h + next_bias in place of h; its Meta kernel, torch.compile,
the Python entry point.

(tests/test_bad_input.py checks the argument checks; tests/test_prebuilt.py the C++ plan;
tests/test_prebuild.py the compiled kernels' machine code; tests/test_accelerate.py its place
in BasicTransformerBlock.)
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_close_to_ref, run_op

from fastdiff import ops, reference
from fastdiff.kernels import add_layer_norm as kernel

DTYPES = [
    # (dtype, atol): torch's own error (its LayerNorm of the rounded sum) sets the bound.
    (torch.float32, 1e-5),
    (torch.float16, 2e-3),
    (torch.bfloat16, 2e-2),
]

SHAPES = [
    (1, 1),              # C = 1: y is bias (variance 0), one row
    (3, 7),              # odd C, below a vector: scalar tails, VEC 1 on the GPU
    (2, 5, 40),          # C = 40: 16-byte rows in every dtype but not a power of two
    (2, 64, 320),        # SD1.5's first transformer width (BLOCK_C 512)
    (1, 3, 1280),        # SD1.5's widest (BLOCK_C 2048)
    (2, 4100),           # C > 4096: beyond the prebuilt blocks (the JIT's BLOCK_C 8192)
]


def _inputs(shape, dtype, seed=0, offset=0.0, affine=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 2 + offset).to(dtype)
    r = (torch.randn(*shape, generator=g) + offset).to(dtype)
    C = shape[-1]
    w = torch.randn(C, generator=g).to(dtype) if affine else None
    b = torch.randn(C, generator=g).to(dtype) if affine else None
    return x, r, w, b


def _torch(x, r, w, b, eps, nb=None):
    """What the op replaces, in x's dtype: diffusers' add, then nn.LayerNorm (and with next_bias
    the add of the feed-forward's bias, which the block's addmm would have done)."""
    h = x + r
    y = F.layer_norm(h, (x.shape[-1],), w, b, eps)
    return (h if nb is None else h + nb), y


def _bf16_interpreter_slack(got, want, *parts):
    """Whether got is within the interpreter's bfloat16 truncation of want: one unit in the
    last place of each rounded value it was made from (numpy has no bfloat16, so the interpreter
    truncates where the GPU rounds to nearest)."""
    ulp = sum(2.0 ** (torch.frexp(t.float())[1].float() - 8) for t in (want, *parts))
    return ((got.float() - want.float()).abs() <= ulp).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, atol, shape):
    x, r, w, b = _inputs(shape, dtype)
    h, y = run_op(backend, "add_layer_norm", x, r, w, b, 1e-5)
    ref_h, ref_y = reference.add_layer_norm(x, r, w, b, 1e-5)
    t_h, t_y = _torch(x, r, w, b, 1e-5)
    assert h.dtype == y.dtype == dtype
    assert torch.equal(ref_h, t_h)
    if backend == "triton" and dtype == torch.bfloat16:
        # the interpreter casts float32 to bfloat16 by truncation (numpy has no bfloat16), the
        # GPU rounds to nearest: one unit in the last place, no more
        ulp = 2.0 ** (torch.frexp(t_h.float())[1].float() - 8)
        assert ((h.float() - t_h.float()).abs() <= ulp).all()
        atol += 2.0 ** (torch.frexp(ref_y.abs().max())[1].item() - 8)   # and y's cast likewise
    else:
        assert torch.equal(h, t_h)   # the sum: exactly eager's
    assert_close_to_ref(y, ref_y, t_y, atol=atol, what=f"{backend} {dtype} y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_absent_weight_or_bias(backend, weight, bias):
    x, r, w, b = _inputs((3, 48), torch.float32, seed=1)
    w, b = (w if weight else None), (b if bias else None)
    _, y = run_op(backend, "add_layer_norm", x, r, w, b, 1e-6)
    assert_close_to_ref(y, reference.add_layer_norm(x, r, w, b, 1e-6)[1],
                        _torch(x, r, w, b, 1e-6)[1], atol=1e-5, what=f"w={weight} b={bias}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_small_spread(backend):
    """Rows with a mean of 1000 and a spread of 1e-2 (float32): the statistics keep it."""
    x, r, w, b = _inputs((4, 320), torch.float32, seed=2, offset=500.0)
    x = (x - x.mean()) * 1e-2 + 500.0
    _, y = run_op(backend, "add_layer_norm", x, r * 1e-2 + 500.0, w, b, 1e-5)
    ref = reference.add_layer_norm(x, r * 1e-2 + 500.0, w, b, 1e-5)[1]
    assert_close_to_ref(y, ref, _torch(x, r * 1e-2 + 500.0, w, b, 1e-5)[1], atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    x = torch.empty(0, 8)
    h, y = run_op(backend, "add_layer_norm", x, x, None, None, 1e-5)
    assert h.shape == y.shape == (0, 8)


def test_meta_kernel_gives_the_shapes_only():
    x = torch.empty(2, 4096, 320, dtype=torch.float16, device="meta")
    w = torch.empty(320, dtype=torch.float16, device="meta")
    h, y = torch.ops.fastdiff.add_layer_norm(x, x, w, w, 1e-5)
    assert h.device.type == y.device.type == "meta" and h.shape == y.shape == x.shape


def test_compiled_matches_eager():
    def fn(x, r, w, b):
        h, y = torch.ops.fastdiff.add_layer_norm(x, r, w, b, 1e-5)
        return h * 2, y + 1

    x, r, w, b = _inputs((3, 40), torch.float32)
    got = torch.compile(fn, fullgraph=True)(x, r, w, b)
    for a, e in zip(got, fn(x, r, w, b)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_entry_point():
    x, r, w, b = _inputs((6, 24), torch.float32)
    h, y = ops.add_layer_norm(x.t().contiguous().t(), r, w, b, 1e-5)   # x column-major
    t_h, t_y = _torch(x, r, w, b, 1e-5)
    torch.testing.assert_close(h, t_h, rtol=0, atol=0)
    torch.testing.assert_close(y, t_y, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="'residual' must be a torch.Tensor"):
        ops.add_layer_norm(x, 1.0)
    with pytest.raises(TypeError, match="'eps' must be a real number"):
        ops.add_layer_norm(x, r, eps="1e-5")


@pytest.mark.parametrize("C,block,vec", [(320, 512, 8), (1280, 2048, 8), (40, 64, 8),
                                         (7, 16, 1), (4104, 8192, 8)])
def test_plan_block_and_alignment(C, block, vec):
    x = torch.empty(3, C, dtype=torch.float16)
    (cfg, grid, args), = kernel.plan(x, x, None, None, 1e-5)[0]
    assert cfg["constexprs"] == {"VEC": vec, "BLOCK_C": block} and grid == (3, 1, 1)
    assert args[7] == C // vec
    prebuilt = vec > 1 and block in kernel.PREBUILT_BLOCKS
    assert (cfg in kernel.prebuilt_configs()) == prebuilt


# ---------------------------------------------------------------- next_bias

NB_SHAPES = [
    (1, 1),              # C = 1, one row: y is bias, h_out = h + next_bias
    (3, 7),              # C not a multiple of 8: scalar tails (C++), VEC 1 (GPU)
    (1, 40),             # one row of a 16-byte width that is not a power of two
    (2, 64, 320),        # SD1.5's first transformer width: the fused block's shape
    (2, 4100),           # C > 4096: beyond the prebuilt blocks (the JIT's BLOCK_C 8192)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", NB_SHAPES, ids=str)
def test_next_bias_matches_reference(backend, dtype, atol, shape):
    """h_out = (x + residual) + next_bias exactly as eager rounds each add; y unchanged: the
    LayerNorm of h, not of h_out (bitwise the call without next_bias)."""
    x, r, w, b = _inputs(shape, dtype, seed=3)
    nb = (torch.randn(shape[-1], generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    h, y = run_op(backend, "add_layer_norm", x, r, w, b, 1e-5, nb)
    ref_h, ref_y = reference.add_layer_norm(x, r, w, b, 1e-5, nb)
    t_h, t_y = _torch(x, r, w, b, 1e-5, nb)
    assert h.dtype == y.dtype == dtype
    assert torch.equal(ref_h, t_h)
    if backend == "triton" and dtype == torch.bfloat16:
        assert _bf16_interpreter_slack(h, t_h, x + r)
        atol += 2.0 ** (torch.frexp(ref_y.abs().max())[1].item() - 8)
    else:
        assert torch.equal(h, t_h)
    assert_close_to_ref(y, ref_y, t_y, atol=atol, what=f"{backend} {dtype} y")
    _, y_plain = run_op(backend, "add_layer_norm", x, r, w, b, 1e-5)
    assert torch.equal(y, y_plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_next_bias_without_weight_or_bias(backend):
    x, r, _, _ = _inputs((5, 24), torch.float16, seed=5)
    nb = torch.randn(24, generator=torch.Generator().manual_seed(6)).to(torch.float16)
    h, y = run_op(backend, "add_layer_norm", x, r, None, None, 1e-5, nb)
    t_h, t_y = _torch(x, r, None, None, 1e-5, nb)
    assert torch.equal(h, t_h)
    assert_close_to_ref(y, reference.add_layer_norm(x, r, None, None, 1e-5, nb)[1], t_y,
                        atol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_next_bias_keeps_negative_zero_and_nan(backend):
    """Without next_bias the kernels add -0.0 in its place: h keeps -0.0 and NaN as they are.
    With it, NaN and infinities propagate as eager's add does."""
    x = torch.tensor([[-0.0, float("nan"), 1.0, -2.0, float("inf")]])
    r = torch.tensor([[-0.0, 1.0, 2.0, 0.5, 1.0]])
    h, _ = run_op(backend, "add_layer_norm", x, r, None, None, 1e-5)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0, equal_nan=True)
    assert torch.signbit(h[0, 0])
    nb = torch.tensor([0.0, 1.0, float("inf"), 2.0, -1.0])
    h, _ = run_op(backend, "add_layer_norm", x, r, None, None, 1e-5, nb)
    torch.testing.assert_close(h, (x + r) + nb, rtol=0, atol=0, equal_nan=True)


def test_next_bias_meta_and_compiled():
    x = torch.empty(2, 4096, 320, dtype=torch.float16, device="meta")
    w = torch.empty(320, dtype=torch.float16, device="meta")
    h, y = torch.ops.fastdiff.add_layer_norm(x, x, w, w, 1e-5, w)
    assert h.device.type == y.device.type == "meta" and h.shape == y.shape == x.shape

    def fn(x, r, w, b, nb):
        h, y = torch.ops.fastdiff.add_layer_norm(x, r, w, b, 1e-5, nb)
        return h * 2, y + 1

    x, r, w, b = _inputs((3, 40), torch.float32)
    got = torch.compile(fn, fullgraph=True)(x, r, w, b, b * 0.5)
    for a, e in zip(got, fn(x, r, w, b, b * 0.5)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_next_bias_ends_the_block_in_one_addmm():
    """The fusion it is for: BasicTransformerBlock's ``ff(norm3(h2)) + h2`` as
    ``h2b.addmm_(g, Wf.T)`` on the op's h_out (h2 + bf): equal to eager's addmm and residual
    add up to float rounding, and differentiable through the in-place addmm_ (the op saves x
    and residual, not h_out)."""
    g = torch.Generator().manual_seed(7)
    C, F_ = 24, 40
    x, r = (torch.randn(2, 5, C, generator=g).requires_grad_() for _ in range(2))
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    wf = (torch.randn(C, F_, generator=g) * 0.2).requires_grad_()   # feed-forward's last Linear
    bf = torch.randn(C, generator=g).requires_grad_()
    gin = torch.randn(2, 5, F_, generator=g)

    h2b, n3 = ops.add_layer_norm(x, r, w, b, 1e-5, next_bias=bf)
    out = h2b.view(-1, C).addmm_(gin.view(-1, F_) * n3.view(-1, C).sum(-1, keepdim=True),
                                 wf.T).view(2, 5, C)
    h2 = x + r
    n3_e = F.layer_norm(h2, (C,), w, b, 1e-5)
    want = F.linear(gin * n3_e.sum(-1, keepdim=True), wf, bf) + h2
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out.square().sum(), [x, r, wf, bf])
    exp = torch.autograd.grad(want.square().sum(), [x, r, wf, bf])
    for a, e, name in zip(got, exp, ["x", "residual", "wf", "next_bias"]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)


def test_next_bias_entry_point_and_plan():
    x, r, w, b = _inputs((4, 48), torch.float16)
    h, _ = ops.add_layer_norm(x, r, w, b, next_bias=b)
    assert torch.equal(h, (x + r) + b)
    with pytest.raises(TypeError, match="'next_bias' must be a torch.Tensor"):
        ops.add_layer_norm(x, r, next_bias=[1.0] * 48)
    # one configuration (one cubin) with and without next_bias: a runtime flag, like has_w/has_b
    (cfg, _, args), = kernel.plan(x, r, w, b, 1e-5, b)[0]
    (cfg0, _, args0), = kernel.plan(x, r, w, b, 1e-5)[0]
    assert cfg == cfg0 and args[4] is b and args[-1] == 1 and args0[-1] == 0
