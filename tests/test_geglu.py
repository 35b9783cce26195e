"""fastdiff::geglu on every backend against the float64 reference (fastdiff.reference.geglu):
diffusers' GEGLU after its projection, x[..., :F] * gelu(x[..., F:]) with exact GELU; its Meta
kernel, torch.compile, the Python entry point and diffusers' own GEGLU module.

(tests/test_bad_input.py checks the argument checks; tests/test_prebuilt.py the C++ plan;
tests/test_prebuild.py the compiled kernels' machine code.)
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_close_to_ref, run_op

from fastdiff import ops, reference
from fastdiff.kernels import geglu as kernel

DTYPES = [
    # (dtype, atol): torch's own error (two roundings: the GELU, then the product) sets the
    # bound; atol covers elements where torch happens to be exact and we round once otherwise.
    (torch.float32, 1e-6),
    (torch.float16, 1e-3),
    (torch.bfloat16, 1e-2),
]

SHAPES = [
    (2,),                 # F = 1, one row: a single product
    (1, 2 * 5),           # one row, F = 5: not a multiple of 8 (VEC = 1, scalar tails)
    (3, 7, 2 * 13),       # odd rows and an odd F
    (2, 3, 2 * 1030),     # F > BLOCK and not a multiple of it: a ragged second block per row
    (2, 64, 2 * 1280),    # SD1.5's first FeedForward (F = 4 * 320): 16-byte rows, CPU chunks
    (1, 2 * 2048),        # F = 2 * BLOCK exactly: no tail
]


def _torch(x):
    """diffusers' GEGLU after the projection, in x's dtype (what the op replaces)."""
    a, g = x.chunk(2, dim=-1)
    return a * F.gelu(g)


def _x(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, atol, shape):
    x = _x(shape, dtype)
    out = run_op(backend, "geglu", x)
    assert out.dtype == dtype and out.shape == (*shape[:-1], shape[-1] // 2)
    assert_close_to_ref(out, reference.geglu(x), _torch(x), atol=atol, what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_half_is_first_and_gate_second(backend):
    """diffusers gates the second half: a = 2, g = 0 gives 0; a = 0, g = 2 gives 0; a = 1 and a
    large gate give a (gelu(g) ~ g), a large negative gate gives ~0."""
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 10.0], [1.0, -10.0]])
    out = run_op(backend, "geglu", x).squeeze(1)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 10.0, -0.0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, interpreted: inf * 0
def test_extreme_gates_and_nan(backend):
    """Gates far in either tail (erf saturates), infinities and NaN behave as the eager pair."""
    a = torch.tensor([1.0, 1.0, 1.0, 2.0, float("nan"), 1.0, 3.0])
    g = torch.tensor([-60.0, 60.0, 1e30, float("inf"), 1.0, float("nan"), -float("inf")])
    x = torch.cat([a, g]).reshape(1, -1)
    out = run_op(backend, "geglu", x)
    want = _torch(x.double()).float()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    for shape in ((0, 8), (3, 0)):
        out = run_op(backend, "geglu", torch.empty(shape))
        assert out.shape == (shape[0], shape[1] // 2)


def test_meta_kernel_gives_the_shape_only():
    x = torch.empty(2, 4096, 2 * 1280, dtype=torch.float16, device="meta")
    y = torch.ops.fastdiff.geglu(x)
    assert y.device.type == "meta" and y.shape == (2, 4096, 1280) and y.dtype == torch.float16


def test_compiled_matches_eager():
    """torch.compile(fullgraph=True) traces the op through its Meta kernel."""
    fn = torch.compile(lambda x: torch.ops.fastdiff.geglu(x) + 1, fullgraph=True)
    x = _x((3, 2 * 24), torch.float32)
    torch.testing.assert_close(fn(x), torch.ops.fastdiff.geglu(x) + 1, rtol=0, atol=0)


def test_entry_point_takes_non_contiguous_input():
    x = _x((6, 2 * 9), torch.float32).t().contiguous().t()   # column-major (6, 18)
    assert not x.is_contiguous()
    torch.testing.assert_close(ops.geglu(x), _torch(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="'x' must be a torch.Tensor"):
        ops.geglu([1.0, 2.0])


def test_equals_diffusers_geglu_module():
    """diffusers' GEGLU module = its projection (Linear with bias) + this op."""
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    m = GEGLU(24, 40).eval()
    h = torch.randn(2, 9, 24)
    with torch.no_grad():
        torch.testing.assert_close(ops.geglu(m.proj(h)), m(h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("F_, aligned", [(1280, True), (13, False), (8, True), (4, False)])
def test_plan_aligns_rows_only_when_f_allows(F_, aligned):
    """VEC (16-byte accesses) only where every row of x and y starts on a 16-byte boundary."""
    x = torch.empty(3, 2 * F_, dtype=torch.float16)
    (cfg, grid, args), = kernel.plan(x)[0]
    assert (cfg["constexprs"]["VEC"] == 8) == aligned
    assert grid == (3 * -(-F_ // kernel.BLOCK), 1, 1)
    assert cfg in kernel.prebuilt_configs()


def test_plan_refuses_a_grid_beyond_32_bits():
    x = torch.empty(2**21, 2 * 2**20, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="beyond the CUDA kernel's 32-bit sizes"):
        kernel.plan(x)
