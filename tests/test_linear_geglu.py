"""fastdiff::linear_geglu on every backend against the float64 reference
(fastdiff.reference.linear_geglu): diffusers' GEGLU with its projection, (x W[:F]^T + b[:F]) *
gelu(x W[F:]^T + b[F:]); its Meta kernel, torch.compile, opcheck, gradients, the Python entry
point, diffusers' own GEGLU module and the Triton plan.

(tests/test_bad_input.py checks the argument checks; tests/test_prebuilt.py the C++ plan;
tests/test_prebuild.py the compiled kernels' machine code: tensor cores, no spills.)
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_close_to_ref, run_op

from fastdiff import ops, reference
from fastdiff.kernels import linear_geglu as kernel

DTYPES = [
    # (dtype, atol): torch's own error (the projection rounded to the dtype, then GELU and the
    # product each rounded) sets the bound; atol covers outputs torch happens to get exact.
    (torch.float32, 1e-5),
    (torch.float16, 2e-3),
    (torch.bfloat16, 2e-2),
]

SHAPES = [
    # (batch dims of x, K, F)
    ((1,), 7, 5),            # M = 1, K and F odd, far below one tile: every mask at work
    ((3,), 320, 40),         # M = 3, SD1.5's K = 320: ten K steps, F below a 64-wide tile
    ((2, 3), 33, 70),        # batch dims; K one past a 32 multiple (a ragged K tail); F > BN
    ((3,), 320, 1280),       # SD1.5's first FeedForward width (F = 4 * 320): 20 column tiles
    ((1100,), 16, 70),       # 9 row tiles: two groups of the program order (GROUP_M = 8)
]


def _inputs(batch, K, F_, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, K, generator=g).to(dtype)
    w = (torch.randn(2 * F_, K, generator=g) * K ** -0.5 * 2).to(dtype)
    b = torch.randn(2 * F_, generator=g).to(dtype) if bias else None
    return x, w, b


def _torch(x, w, b):
    """diffusers' GEGLU in x's dtype: the projection (rounded), then the split, GELU, product."""
    h, g = F.linear(x, w, b).chunk(2, dim=-1)
    return h * F.gelu(g)


def _skip_bf16_interpreter(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (numpy has no bf16); "
                    "bf16 is covered by the C++ kernel here and by 'cuda' on a GPU")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(backend, dtype, atol, shape, bias):
    _skip_bf16_interpreter(backend, dtype)
    batch, K, F_ = shape
    x, w, b = _inputs(batch, K, F_, dtype, bias)
    out = run_op(backend, "linear_geglu", x, w, b)
    assert out.dtype == dtype and out.shape == (*batch, F_)
    assert_close_to_ref(out, reference.linear_geglu(x, w, b), _torch(x, w, b), atol=atol,
                        what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_rows_first_gate_rows_second(backend):
    """nn.Linear's layout, diffusers' order: W's first F rows make the value, the last F the
    gate. x = e_0; value row picks 2, gate row 0 -> 0; value 0, gate 2 -> 0; value 1, gate 10
    -> 10 (gelu(10) = 10); value 1, gate -10 -> ~0; the bias shifts them."""
    x = torch.tensor([[1.0] + [0.0] * 15])
    w = torch.zeros(8, 16)
    w[:4, 0] = torch.tensor([2.0, 0.0, 1.0, 1.0])
    w[4:, 0] = torch.tensor([0.0, 2.0, 10.0, -10.0])
    want = torch.tensor([[0.0, 0.0, 10.0, -0.0]])
    torch.testing.assert_close(run_op(backend, "linear_geglu", x, w, None), want, rtol=1e-6,
                               atol=1e-6)
    b = torch.tensor([1.0, 0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0])   # value 3, gate 10 -> 30
    out = run_op(backend, "linear_geglu", x, w, b)
    torch.testing.assert_close(out[0, 0], torch.tensor(30.0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    x, w, b = _inputs((0,), 8, 5, torch.float32)
    out = run_op(backend, "linear_geglu", x, w, b)
    assert out.shape == (0, 5)


def test_meta_kernel_gives_the_shape_only():
    x = torch.empty(2, 4096, 320, dtype=torch.float16, device="meta")
    w = torch.empty(2 * 1280, 320, dtype=torch.float16, device="meta")
    y = torch.ops.fastdiff.linear_geglu(x, w, torch.empty(2560, dtype=torch.float16,
                                                          device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 4096, 1280) and y.dtype == torch.float16


def test_compiled_matches_eager():
    """torch.compile(fullgraph=True) traces the op through its Meta kernel."""
    x, w, b = _inputs((3, 5), 24, 12, torch.float32)
    fn = torch.compile(lambda x, w, b: torch.ops.fastdiff.linear_geglu(x, w, b) + 1,
                       fullgraph=True)
    torch.testing.assert_close(fn(x, w, b), torch.ops.fastdiff.linear_geglu(x, w, b) + 1,
                               rtol=0, atol=0)


def test_opcheck_schema_autograd_and_fake_tensors():
    x, w, b = _inputs((2, 3), 16, 6, torch.float32)
    for args in ((x, w, b), (x, w, None)):
        args = tuple(a if a is None else a.requires_grad_() for a in args)
        torch.library.opcheck(torch.ops.fastdiff.linear_geglu.default, args)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradients_match_the_float64_reference(dtype, atol, bias):
    """Training through an accelerated GEGLU: dx, dW, db against autograd through the float64
    reference."""
    x, w, b = _inputs((2, 5), 24, 13, dtype, bias, seed=3)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    dy = torch.randn(2, 5, 13, generator=torch.Generator().manual_seed(4)).to(dtype)
    grads = torch.autograd.grad(ops.linear_geglu(x, w, b), leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = torch.autograd.grad(reference.linear_geglu(*leaves64, *([None] if not bias else [])),
                              leaves64, dy.double())
    for name, got, want, leaf in zip("xwb", grads, ref, leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        err = (got.double() - want).abs().max().item()
        assert err <= atol * want.abs().max().item(), (name, err)


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
def test_gradcheck_and_double_backward():
    """The formula against finite differences (float32 inputs: the op's dtypes; float64 is the
    reference's alone) and differentiated again (its backward is torch ops)."""
    x, w, b = _inputs((3,), 5, 4, torch.float32, seed=5)
    args = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(ops.linear_geglu, args, eps=1e-3, atol=3e-3, rtol=3e-3)
    assert torch.autograd.gradgradcheck(ops.linear_geglu, args, eps=1e-3, atol=1e-2, rtol=1e-2)


def test_only_the_wanted_gradients_are_computed():
    x, w, b = _inputs((4,), 8, 3, torch.float32, seed=6)
    w.requires_grad_()
    (gw,) = torch.autograd.grad(ops.linear_geglu(x, w, b).sum(), w)
    assert gw.shape == w.shape


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_ad_is_refused_not_silently_dropped():
    import torch.autograd.forward_ad as fwAD
    x, w, b = _inputs((2,), 8, 3, torch.float32)
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
            dual = fwAD.make_dual(x, torch.ones_like(x))
            with pytest.raises(NotImplementedError, match="fastdiff.linear_geglu: forward-mode"):
                ops.linear_geglu(dual, w, b)


def test_entry_point_takes_non_contiguous_x_and_bias():
    x, w, b = _inputs((6,), 9, 4, torch.float32)
    xt = x.t().contiguous().t()   # column-major (6, 9)
    bs = torch.stack([b, b], 1)[:, 0]   # stride 2
    assert not xt.is_contiguous() and not bs.is_contiguous()
    torch.testing.assert_close(ops.linear_geglu(xt, w, bs), _torch(x, w, b), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="'weight' must be contiguous"):
        ops.linear_geglu(x, w.t().contiguous().t(), b)


def test_equals_diffusers_geglu_module():
    """diffusers' GEGLU module is this op on its projection's weight and bias."""
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    m = GEGLU(24, 40).eval()
    h = torch.randn(2, 9, 24)
    with torch.no_grad():
        torch.testing.assert_close(ops.linear_geglu(h, m.proj.weight, m.proj.bias), m(h),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_plan_one_launch_per_tile(dtype):
    x, w, b = _inputs((2, 50), 40, 70, dtype)
    (cfg, grid, args), = kernel.plan(x, w, b)[0]
    cx = cfg["constexprs"]
    assert grid == (-(-100 // cx["BLOCK_M"]) * -(-70 // cx["BLOCK_N"]), 1, 1)
    assert args[4:] == [100, 70, 40, 1]
    assert cfg in kernel.prebuilt_configs()
    (_, _, args), = kernel.plan(x, w, None)[0]
    assert args[2] is x and args[-1] == 0   # x stands in for the absent bias


def test_grouped_order_covers_every_tile_once():
    """The program -> tile map of the kernel (grouped order), replayed in Python."""
    def tile(pid, tiles_m, tiles_n, group):
        per_group = group * tiles_n
        first = pid // per_group * group
        rows = min(tiles_m - first, group)
        return first + pid % per_group % rows, pid % per_group // rows
    for tiles_m, tiles_n in ((1, 1), (9, 2), (17, 5), (3, 40)):
        seen = [tile(p, tiles_m, tiles_n, kernel.GROUP_M) for p in range(tiles_m * tiles_n)]
        assert sorted(seen) == [(m, n) for m in range(tiles_m) for n in range(tiles_n)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through the CUDA kernel")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cuda_path_reaches_the_jit_launcher(bias):
    """The op's CUDA kernel (C++: no prebuilt cubin runs CPU tensors) falls back to
    fastdiff::_jit_linear_geglu, whose Python kernel runs this module's plan (interpreted here),
    with the bias absent as well (the dispatcher drops a trailing None: put back for plan())."""
    x, w, b = _inputs((2, 3), 20, 9, torch.float32, bias)
    args = (x, w) if b is None else (x, w, b)
    out = torch.ops.fastdiff._cuda_kernel_linear_geglu(*args)
    torch.testing.assert_close(out, torch.ops.fastdiff.linear_geglu(*args), rtol=1e-5, atol=1e-5)


def test_plan_refuses_sizes_beyond_32_bits():
    x = torch.empty(2**31, 8, dtype=torch.float16, device="meta")
    w = torch.empty(2 * 4, 8, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="beyond the CUDA kernel's 32-bit sizes"):
        kernel.plan(x, w, None)
