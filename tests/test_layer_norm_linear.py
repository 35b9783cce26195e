"""fastdiff::layer_norm_linear on every backend against the float64 reference
(fastdiff.reference.layer_norm_linear: the UNFOLDED meaning, F.layer_norm of x + shift, then the
Linear, then GEGLU): the op runs on fastdiff.ops.fold_layer_norm's tensors. Also its Meta kernel,
torch.compile, opcheck, gradients, the entry point and the Triton plan.

(tests/test_bad_input.py checks the argument checks; tests/test_prebuilt.py the C++ plan;
tests/test_prebuild.py the compiled kernels' machine code: tensor cores, no spills.)
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_close_to_ref, run_op

from fastdiff import ops, reference
from fastdiff.kernels import layer_norm_linear as kernel

DTYPES = [
    # (dtype, atol): torch's own error (the normalized copy rounded to the dtype, the GEMM's
    # output rounded, GELU and the product each rounded) sets the bound. fp32's atol is 10x
    # linear_geglu's: the op's one-pass variance (sums around the row's first value) and the
    # fold's x W'^T - mean colsum cancel terms ~ mean colsum that torch, which subtracts the
    # mean first, never forms (test_a_large_mean_keeps_its_digits).
    (torch.float32, 1e-4),
    (torch.float16, 2e-3),
    (torch.bfloat16, 2e-2),
]

SHAPES = [
    # (batch dims of x, K, N, geglu, shift, mean offset)
    ((1,), 7, 5, False, False, 0.0),       # M = 1, K and N odd, far below a tile: every mask
    ((2,), 1, 4, False, False, 0.0),       # K = 1: var 0, y = b' (the JIT specializes K == 1)
    ((3,), 7, 6, True, True, 5.0),         # M = 3, GEGLU of 3 columns; x + 5: one-pass variance
    ((2, 3), 33, 70, False, True, 5.0),    # batch dims, a ragged K tail (33), N > a 64 tile
    ((3,), 320, 960, False, True, 0.0),    # SD1.5's norm1 -> q/k/v: K = 320, N = 3 * 320
    ((3,), 320, 96, True, False, 5.0),     # K = 320 (ten K steps) with GEGLU
]


def _inputs(batch, K, N, dtype, shift=False, offset=0.0, affine=True, bias=True, seed=0):
    """x, the LayerNorm's and the Linear's parameters (in x's dtype) and the shift (float32)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*batch, K, generator=g) + offset).to(dtype)
    lw = (1 + 0.3 * torch.randn(K, generator=g)).to(dtype) if affine else None
    lb = (0.3 * torch.randn(K, generator=g)).to(dtype) if affine else None
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    s = torch.randn(K, generator=g) if shift else None
    return x, lw, lb, w, b, s


def _torch(x, lw, lb, w, b, s, geglu, eps=1e-5):
    """The torch code the op replaces, in x's dtype: (x + shift) rounded, F.layer_norm, F.linear
    (rounded), then chunk, gelu and the product."""
    h = x if s is None else (x.float() + s).to(x.dtype)
    z = F.linear(F.layer_norm(h, h.shape[-1:], lw, lb, eps), w, b)
    if geglu:
        a, g = z.chunk(2, dim=-1)
        z = a * F.gelu(g)
    return z


def _skip_bf16_interpreter(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (numpy has no bf16); "
                    "bf16 is covered by the C++ kernel here and by 'cuda' on a GPU")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, atol, shape):
    _skip_bf16_interpreter(backend, dtype)
    batch, K, N, geglu, shift, offset = shape
    x, lw, lb, w, b, s = _inputs(batch, K, N, dtype, shift, offset)
    wf, fold = ops.fold_layer_norm(lw, lb, w, b, s)
    out = run_op(backend, "layer_norm_linear", x, wf, fold, s, 1e-5, geglu)
    assert out.dtype == dtype and out.shape == (*batch, N // 2 if geglu else N)
    ref = reference.layer_norm_linear(x, lw, lb, 1e-5, w, b, s, geglu)
    assert_close_to_ref(out, ref, _torch(x, lw, lb, w, b, s, geglu), atol=atol,
                        what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine,bias", [(False, False), (True, False)], ids=["plain", "nobias"])
def test_layer_norm_without_affine_and_linear_without_bias(backend, affine, bias):
    x, lw, lb, w, b, s = _inputs((4,), 24, 10, torch.float32, affine=affine, bias=bias)
    wf, fold = ops.fold_layer_norm(lw, lb, w, b)
    out = run_op(backend, "layer_norm_linear", x, wf, fold, None, 1e-5, False)
    assert_close_to_ref(out, reference.layer_norm_linear(x, lw, lb, 1e-5, w, b), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_large_mean_keeps_its_digits(backend):
    """Rows 50 sigmas from 0, K = 320, with a shift: the statistics summed around each row's
    first value lose no more than the epilogue's x W'^T - mean colsum does (2.6e-5 of |y| ~ 5.5
    on the C++ kernel, 1.8e-5 interpreted; sums of h itself lost 5.7e-5 interpreted)."""
    x, lw, lb, w, b, s = _inputs((3,), 320, 96, torch.float32, True, 50.0)
    wf, fold = ops.fold_layer_norm(lw, lb, w, b, s)
    out = run_op(backend, "layer_norm_linear", x, wf, fold, s, 1e-5, False)
    ref = reference.layer_norm_linear(x, lw, lb, 1e-5, w, b, s)
    assert (out.double() - ref).abs().max().item() < 4e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pass_variance_clamped_and_eps(backend):
    """Rows of 1000 + 1e-3 noise have a variance (1e-6) far below what the one-pass form
    resolves in fp32 (sum h^2 ~ 1.6e7): it rounds below -eps in some rows (row 0 here, in the
    interpreter), which must be clamped at 0, not give NaN from rsqrt. Other rows with eps = 0.1,
    which shows in the values."""
    x, lw, lb, w, b, s = _inputs((8,), 16, 8, torch.float32)
    wf, fold = ops.fold_layer_norm(lw, lb, w, b)
    flat = 1000 + 1e-3 * torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(run_op(backend, "layer_norm_linear", flat, wf, fold, None, 1e-5,
                                 False)).all()
    out = run_op(backend, "layer_norm_linear", x, wf, fold, None, 0.1, False)
    assert_close_to_ref(out, reference.layer_norm_linear(x, lw, lb, 0.1, w, b), atol=1e-5)


def test_fold_is_computed_from_the_rounded_weight():
    """colsum and d are sums of W' as the op reads it (rounded to x's dtype), in float64; b'
    from the unrounded W; without a shift d is zeros."""
    x, lw, lb, w, b, s = _inputs((1,), 40, 6, torch.float16, shift=True)
    wf, fold = ops.fold_layer_norm(lw, lb, w, b, s)
    assert wf.dtype == torch.float16 and fold.dtype == torch.float32 and fold.shape == (3, 6)
    torch.testing.assert_close(wf, (w.double() * lw.double()).half(), rtol=0, atol=0)
    torch.testing.assert_close(fold[0], wf.double().sum(1).float(), rtol=0, atol=0)
    torch.testing.assert_close(fold[1], (wf.double() @ s.double()).float(), rtol=0, atol=0)
    torch.testing.assert_close(fold[2], (b.double() + w.double() @ lb.double()).float(), rtol=0,
                               atol=0)
    assert not ops.fold_layer_norm(lw, lb, w, b)[1][1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    x, lw, lb, w, b, s = _inputs((0,), 8, 6, torch.float32)
    wf, fold = ops.fold_layer_norm(lw, lb, w, b)
    assert run_op(backend, "layer_norm_linear", x, wf, fold, None, 1e-5, True).shape == (0, 3)


def test_meta_kernel_gives_the_shape_only():
    x = torch.empty(2, 4096, 320, dtype=torch.float16, device="meta")
    w = torch.empty(2560, 320, dtype=torch.float16, device="meta")
    f = torch.empty(3, 2560, device="meta")
    y = torch.ops.fastdiff.layer_norm_linear(x, w, f, None, 1e-5, True)
    assert y.device.type == "meta" and y.shape == (2, 4096, 1280) and y.dtype == torch.float16


def test_compiled_matches_eager():
    """torch.compile(fullgraph=True) traces the op through its Meta kernel."""
    x, lw, lb, w, b, s = _inputs((3, 5), 24, 12, torch.float32, shift=True)
    wf, fold = ops.fold_layer_norm(lw, lb, w, b, s)
    op = torch.ops.fastdiff.layer_norm_linear
    fn = torch.compile(lambda x: op(x, wf, fold, s, 1e-5, True) + 1, fullgraph=True)
    torch.testing.assert_close(fn(x), op(x, wf, fold, s, 1e-5, True) + 1, rtol=0, atol=0)


def test_opcheck_schema_autograd_and_fake_tensors():
    x, lw, lb, w, b, s = _inputs((2, 3), 16, 6, torch.float32, shift=True)
    wf, fold = ops.fold_layer_norm(lw, lb, w, b, s)
    for args in ((x, wf, fold, s, 1e-5, True), (x, wf, fold, None, 1e-5, False)):
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a
                     for a in args)
        torch.library.opcheck(torch.ops.fastdiff.layer_norm_linear.default, args)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("geglu", [False, True], ids=["linear", "geglu"])
def test_gradients_through_the_fold_match_the_unfolded_reference(dtype, atol, geglu):
    """Training through a folded block: the fold is torch ops (fold_layer_norm) and the op has
    gradients for x, weight, fold and shift, so dx, d ln_weight, d ln_bias, dW, db and d shift
    reach the unfolded module's parameters as autograd through the float64 reference."""
    x, lw, lb, w, b, s = _inputs((2, 5), 24, 14, dtype, shift=True, offset=2.0, seed=3)
    leaves = [t.requires_grad_() for t in (x, lw, lb, w, b, s)]
    dy = torch.randn(2, 5, 7 if geglu else 14, generator=torch.Generator().manual_seed(4))
    wf, fold = ops.fold_layer_norm(lw, lb, w, b, s)
    grads = torch.autograd.grad(ops.layer_norm_linear(x, wf, fold, s, 1e-5, geglu), leaves,
                                dy.to(dtype))
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = torch.autograd.grad(reference.layer_norm_linear(
        leaves64[0], leaves64[1], leaves64[2], 1e-5, *leaves64[3:5], leaves64[5], geglu),
        leaves64, dy.double())
    for name, got, want, leaf in zip(("x", "ln_w", "ln_b", "w", "b", "shift"), grads, ref,
                                     leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        err = (got.double() - want).abs().max().item()
        assert err <= atol * want.abs().max().item(), (name, err)


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
def test_gradcheck_and_double_backward():
    """The closed-form backward against finite differences on the op's own inputs (float32:
    the op's dtypes), fold and shift included, both epilogues; and differentiated again (the
    backward is torch ops on the saved inputs)."""
    x, lw, lb, w, b, s = _inputs((3,), 6, 4, torch.float32, shift=True, seed=5)
    wf, fold = ops.fold_layer_norm(lw, lb, w, b, s)
    args = [t.detach().clone().requires_grad_() for t in (x, wf, fold, s)]
    for geglu in (False, True):
        fn = lambda x, w, f, s: ops.layer_norm_linear(x, w, f, s, 1e-5, geglu)  # noqa: E731
        assert torch.autograd.gradcheck(fn, args, eps=1e-3, atol=5e-3, rtol=5e-3)
        assert torch.autograd.gradgradcheck(fn, args, eps=1e-3, atol=2e-2, rtol=2e-2)


def test_only_the_wanted_gradients_are_computed():
    x, lw, lb, w, b, s = _inputs((4,), 8, 6, torch.float32, shift=True, seed=6)
    wf, fold = ops.fold_layer_norm(lw, lb, w, b, s)
    wf.requires_grad_()
    (gw,) = torch.autograd.grad(ops.layer_norm_linear(x, wf, fold, s).sum(), wf)
    assert gw.shape == wf.shape


def test_entry_point():
    """A non-contiguous x is copied; wrong kinds are TypeErrors naming the argument; the result
    equals diffusers' pattern, norm then Linear, on modules."""
    torch.manual_seed(0)
    norm, lin = torch.nn.LayerNorm(12), torch.nn.Linear(12, 9)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.2)
        wf, fold = ops.fold_layer_norm(norm.weight, norm.bias, lin.weight, lin.bias)
        x = torch.randn(12, 5).t()
        assert not x.is_contiguous()
        torch.testing.assert_close(ops.layer_norm_linear(x, wf, fold), lin(norm(x)), rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(TypeError, match="argument 'geglu' must be a bool"):
        ops.layer_norm_linear(x, wf, fold, None, 1e-5, 1)
    with pytest.raises(TypeError, match="argument 'fold' must be a torch.Tensor"):
        ops.layer_norm_linear(x, wf, None)
    with pytest.raises(ValueError, match="'shift' must have shape \\(12,\\)"):
        ops.fold_layer_norm(norm.weight, norm.bias, lin.weight, None, torch.zeros(3))


def test_plan_one_launch_per_tile():
    x, lw, lb, w, b, s = _inputs((2, 50), 32, 96, torch.float16, shift=True)
    wf, fold = ops.fold_layer_norm(lw, lb, w, b, s)
    for geglu in (False, True):
        (cfg, grid, args), = kernel.plan(x, wf, fold, s, 1e-5, geglu)[0]
        cx = cfg["constexprs"]
        assert grid == (-(-100 // cx["BLOCK_M"]) * -(-(48 if geglu else 96) // cx["BLOCK_N"]),
                        1, 1)
        assert args[5:] == [100, 96, 32, 1e-5] and cx["GEGLU"] == geglu and cx["HAS_SHIFT"]
        assert cfg in kernel.prebuilt_configs()
    (cfg, _, args), = kernel.plan(x, wf, fold)[0]
    assert args[3] is fold and not cfg["constexprs"]["HAS_SHIFT"]   # fold stands in


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through the CUDA kernel")
def test_cuda_path_reaches_the_jit_launcher():
    """The op's CUDA kernel (C++: no prebuilt cubin runs CPU tensors) falls back to
    fastdiff::_jit_layer_norm_linear, whose Python kernel runs this module's plan (interpreted
    here), with and without the shift (the dispatcher drops trailing defaults: put back)."""
    x, lw, lb, w, b, s = _inputs((2, 3), 20, 12, torch.float32, shift=True)
    wf, fold = ops.fold_layer_norm(lw, lb, w, b, s)
    for args in ((x, wf, fold, s, 1e-5, True), (x, wf, fold)):
        out = torch.ops.fastdiff._cuda_kernel_layer_norm_linear(*args)
        torch.testing.assert_close(out, torch.ops.fastdiff.layer_norm_linear(*args), rtol=1e-5,
                                   atol=2e-5)


def test_plan_refuses_sizes_beyond_32_bits():
    x = torch.empty(2**31, 16, dtype=torch.float16, device="meta")
    w = torch.empty(16, 16, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="beyond the CUDA kernel's 32-bit sizes"):
        kernel.plan(x, w, torch.empty(3, 16, device="meta"))
