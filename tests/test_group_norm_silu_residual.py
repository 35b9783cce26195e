"""group_norm_silu_residual: group_norm_silu's y and r = x + residual_bias[c] from one read of x,
on every backend, against the float64 reference and against group_norm_silu itself."""
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_close_to_ref, run_op

from fastdiff import ops, reference

DTYPES = [
    # (dtype, atol)
    (torch.float32, 1e-5),
    (torch.float16, 2e-3),
    (torch.bfloat16, 2e-2),
]

SHAPES = [
    # (N, C, H, W, G)
    (2, 12, 5, 7, 4),      # odd H*W (no 16-byte rows), 3 channels per group
    (3, 6, 1, 1, 6),       # 1x1, one channel per group: NCHW and channels_last the same memory
    (1, 10, 9, 3, 5),      # N = 1, odd sizes
    (1, 1, 3, 5, 1),       # C = 1
    (2, 64, 4, 4, 32),     # H*W = 16: 16-byte rows (SD1.5's cubin configuration with NCHW x)
]


def _inputs(N, C, H, W, dtype, channels_last, small_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + N * 1000 + C * 10 + H)
    x = (torch.randn(N, C, H, W, generator=g) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(C, generator=g).to(small_dtype)
    b = torch.randn(C, generator=g).to(small_dtype)
    rb = torch.randn(C, generator=g).to(dtype)
    return x, w, b, rb


def _truncated_bf16(t):
    return (t.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


def _torch_same_dtype(x, G, w, b, eps, silu):
    y = F.group_norm(x, G, w.to(x.dtype), b.to(x.dtype), eps)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("cl_out", [False, True], ids=["y-x-layout", "y-cl"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_matches_group_norm_silu_and_reference(backend, dtype, atol, shape, channels_last, cl_out,
                                               silu):
    """y is exactly group_norm_silu's (values and strides); r is exactly torch's x + rb in x's
    dtype and memory format, and the reference's."""
    if backend == "triton" and dtype != torch.float32 and (channels_last or not cl_out):
        pytest.skip("the interpreter (slow) runs 16-bit dtypes on SD1.5's layouts only (NCHW "
                    "x, channels_last y); fp32 covers every layout there, cpp every combination")
    if backend == "triton" and shape == SHAPES[-1] and not cl_out:
        pytest.skip("the interpreter runs the 16-byte-row shape with a channels_last y only "
                    "(3-4 s a call; the smaller shapes take both y layouts)")
    N, C, H, W, G = shape
    x, w, b, rb = _inputs(N, C, H, W, dtype, channels_last)
    y, r = run_op(backend, "group_norm_silu_residual", x, G, w, b, 1e-5, rb, silu, cl_out)
    y0 = run_op(backend, "group_norm_silu", x, G, w, b, 1e-5, None, None, None, silu, cl_out)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == y0.stride()
    assert torch.equal(y, y0)
    assert r.dtype == dtype and r.shape == x.shape and r.stride() == x.stride()
    y_ref, r_ref = reference.group_norm_silu_residual(x, G, w, b, 1e-5, rb, silu, cl_out)
    assert torch.equal(r_ref, x + rb[:, None, None])
    if backend == "triton" and dtype == torch.bfloat16:
        # The interpreter converts float32 to bfloat16 by dropping the low 16 bits (numpy has no
        # bfloat16); a GPU rounds to nearest, as the other backends do.
        r_ref = _truncated_bf16(x.float() + rb.float()[:, None, None])
    assert torch.equal(r, r_ref)
    assert_close_to_ref(y, y_ref, _torch_same_dtype(x, G, w, b, 1e-5, silu), atol,
                        what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_tensors_in_x_dtype_and_no_affine(backend):
    x, w, b, rb = _inputs(2, 8, 4, 6, torch.float16, False, small_dtype=torch.float16)
    for wb in ((w, b), (None, None), (w, None)):
        y, r = run_op(backend, "group_norm_silu_residual", x, 4, *wb, 1e-6, rb, False, True)
        y0 = run_op(backend, "group_norm_silu", x, 4, *wb, 1e-6, None, None, None, False, True)
        assert torch.equal(y, y0)
        assert torch.equal(r, x + rb[:, None, None])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter
def test_special_values_of_x_and_residual_bias(backend):
    """r follows IEEE addition: -0.0 + -0.0 stays -0.0, inf and NaN pass through (only r's
    elements; y's group goes NaN as group_norm_silu's does)."""
    x = torch.zeros(1, 4, 2, 4)
    x[0, 0] = -0.0
    x[0, 2, 0, 0] = float("inf")
    x[0, 3, 1, 1] = float("nan")
    rb = torch.tensor([-0.0, 1.0, 2.0, 3.0])
    _, r = run_op(backend, "group_norm_silu_residual", x, 4, None, None, 1e-5, rb, False, True)
    want = x + rb[:, None, None]
    assert torch.equal(torch.signbit(r), torch.signbit(want))
    torch.testing.assert_close(r, want, equal_nan=True, rtol=0, atol=0)


def test_entry_point_meta_and_empty():
    x, w, b, rb = _inputs(2, 8, 3, 5, torch.float32, False)
    y, r = ops.group_norm_silu_residual(x, 4, w, b, 1e-5, rb, silu=False, channels_last_out=True)
    assert torch.equal(y, ops.group_norm_silu(x, 4, w, b, 1e-5, silu=False,
                                              channels_last_out=True))
    assert torch.equal(r, x + rb[:, None, None])
    y, r = ops.group_norm_silu_residual(x, 4, w, b, 1e-5, rb)  # defaults: silu, x's layout
    assert torch.equal(y, ops.group_norm_silu(x, 4, w, b, 1e-5))
    for xc in (x, x.to(memory_format=torch.channels_last)):
        for cl_out in (False, True):
            want = [t.stride() for t in torch.ops.fastdiff.group_norm_silu_residual(
                xc, 4, w, b, 1e-5, rb, True, cl_out)]
            ym, rm = torch.ops.fastdiff.group_norm_silu_residual(
                xc.to("meta"), 4, w.to("meta"), b.to("meta"), 1e-5, rb.to("meta"), True, cl_out)
            assert [ym.stride(), rm.stride()] == want and rm.stride() == xc.stride()
    for shape in [(0, 4, 2, 2), (2, 4, 0, 3)]:
        for dev in ("cpu", "meta"):
            xe = torch.empty(shape, device=dev)
            y, r = torch.ops.fastdiff.group_norm_silu_residual(
                xe, 2, None, None, 1e-5, torch.zeros(4, device=dev), False, True)
            assert y.shape == r.shape == shape
            assert y.stride() == torch.empty(shape, memory_format=torch.channels_last).stride()
            assert r.stride() == xe.stride()


def test_compiles():
    def f(x, rb):
        y, r = ops.group_norm_silu_residual(x, 2, None, None, 1e-5, rb, silu=False,
                                            channels_last_out=True)
        return y * 2, r

    x, _, _, rb = _inputs(1, 4, 3, 3, torch.float32, False)
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, rb)
    for a, b in zip(out, f(x, rb)):
        torch.testing.assert_close(a, b)
        assert a.stride() == b.stride()


# ---- gradients ----

def _grads(fn, tensors, gy, gr):
    """Gradients of sum(y * gy) + sum(r * gr) (a None cotangent: that output unused)."""
    y, r = fn(*tensors)
    loss = sum((o.double() * g).sum() for o, g in ((y, gy), (r, gr)) if g is not None)
    wrt = [t for t in tensors if t is not None]
    got = torch.autograd.grad(loss, wrt, allow_unused=True)  # residual_bias when r is unused
    return [torch.zeros_like(t, dtype=torch.float64) if g is None else g.double()
            for g, t in zip(got, wrt)]


@pytest.mark.parametrize("shape", [(2, 12, 5, 7, 4), (1, 6, 1, 1, 6), (2, 16, 4, 4, 8)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("cl_out", [False, True], ids=["y-x-layout", "y-cl"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("used", ["both", "y", "r"])
def test_gradients_match_the_reference(shape, channels_last, cl_out, silu, used):
    """x gets y's gradient (group_norm_silu's formula) plus r's; residual_bias r's summed over
    N, H and W; weight and bias y's. Held to autograd through the float64 reference."""
    N, C, H, W, G = shape
    x, w, b, rb = _inputs(N, C, H, W, torch.float32, channels_last)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64) if used != "r" else None
    gr = torch.randn(x.shape, generator=g, dtype=torch.float64) if used != "y" else None
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b, rb)]
    got = _grads(lambda x, w, b, rb: ops.group_norm_silu_residual(
        x, G, w, b, 1e-5, rb, silu=silu, channels_last_out=cl_out), leaves, gy, gr)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, w, b, rb)]
    want = _grads(lambda x, w, b, rb: reference.group_norm_silu_residual(
        x, G, w, b, 1e-5, rb, silu, cl_out), leaves64, gy, gr)
    for name, a, e in zip(("x", "weight", "bias", "residual_bias"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)


def test_gradients_in_half_precision_have_the_dtypes_of_the_inputs():
    x, w, b, rb = _inputs(2, 8, 4, 4, torch.bfloat16, False)
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b, rb)]
    y, r = ops.group_norm_silu_residual(leaves[0], 4, *leaves[1:3], 1e-5, leaves[3])
    (y.float().sum() + r.float().square().sum()).backward()
    assert [t.grad.dtype for t in leaves] == [torch.bfloat16, torch.float32, torch.float32,
                                              torch.bfloat16]
    torch.testing.assert_close(leaves[3].grad.float(),
                               (2 * r.float()).sum((0, 2, 3)), rtol=2e-2, atol=1e-1)


def test_transformer_end_as_one_in_place_gemm():
    """The use it is for: Transformer2DModel's `x + proj_out(tokens)` as one baddbmm_ into r
    (proj_out's bias in r), equal to the stock code, with gradients through x, the norm's
    weight and bias, proj_out's weight and bias (r is changed in place after the op: the
    formula does not save it)."""
    B, C, H, W = 2, 16, 3, 4
    x, w, b, bo = _inputs(B, C, H, W, torch.float32, False)
    wo = torch.randn(C, C, generator=torch.Generator().manual_seed(3)) / 4

    def fused(x, w, b, wo, bo):
        y, r = ops.group_norm_silu_residual(x, 4, w, b, 1e-6, bo, silu=False,
                                            channels_last_out=True)
        tokens = y.permute(0, 2, 3, 1).reshape(B, H * W, C) * 1.5  # the blocks, in short
        r.view(B, C, H * W).baddbmm_(wo.expand(B, C, C), tokens.transpose(1, 2))
        return r

    def stock(x, w, b, wo, bo):
        h = F.group_norm(x, 4, w, b, 1e-6)
        tokens = h.permute(0, 2, 3, 1).reshape(B, H * W, C) * 1.5
        out = F.linear(tokens, wo, bo)
        return x + out.reshape(B, H, W, C).permute(0, 3, 1, 2)

    results = []
    for fn in (fused, stock):
        leaves = [t.detach().requires_grad_(True) for t in (x, w, b, wo, bo)]
        out = fn(*leaves)
        out.backward(torch.ones_like(out) + out.detach() * 0.1)
        results.append((out.detach(), [t.grad for t in leaves]))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    for name, a, e in zip(("x", "weight", "bias", "proj_out.weight", "proj_out.bias"), g1, g2):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)


def test_opcheck():
    x, w, b, rb = _inputs(2, 8, 3, 3, torch.float32, False)
    for cl_out in (False, True):
        torch.library.opcheck(torch.ops.fastdiff.group_norm_silu_residual,
                              (x.requires_grad_(True), 4, w, b, 1e-5, rb, False, cl_out))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dual_arg", ["x", "residual_bias"])
def test_forward_mode_ad_is_refused(dual_arg):
    """A backward formula only: a dual tensor would come out without a tangent, silently."""
    import torch.autograd.forward_ad as fwAD
    x, w, b, rb = _inputs(2, 4, 3, 3, torch.float32, False)
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
            args = {"x": x, "residual_bias": rb}
            args[dual_arg] = fwAD.make_dual(args[dual_arg], torch.ones_like(args[dual_arg]))
            with pytest.raises(NotImplementedError,
                               match="fastdiff.group_norm_silu_residual: forward-mode AD"):
                ops.group_norm_silu_residual(args["x"], 2, w, b, 1e-5, args["residual_bias"])
