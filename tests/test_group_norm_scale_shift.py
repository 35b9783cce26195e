"""fastdiff::group_norm_scale_shift on every backend against the float64 reference
(fastdiff.reference.group_norm_scale_shift) and against F.group_norm of the cat applied as
a * scale + shift; its argument checks, Meta kernel, torch.compile, opcheck, the entry point and
the Triton plan.

(tests/test_prebuilt.py checks the C++ plan against the Python one; tests/test_prebuild.py that
every configuration compiles.)
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_close_to_ref, assert_rejected, run_op

from fastdiff import ops, reference
from fastdiff.kernels import group_norm_scale_shift as kernel

op = torch.ops.fastdiff.group_norm_scale_shift

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

SHAPES = [
    # (N, C1, C2, spatial, G)
    (2, 12, 0, (5, 7), 4),        # no x2; odd spatial size, 3 channels per group
    (2, 7, 8, (5, 3), 5),         # groups of 3, group 2 straddles x/x2 (channels 6 | 7, 8)
    (3, 6, 0, (1, 1), 6),         # 1x1 spatial, C = G: one channel per group
    (2, 5, 3, (4, 4), 8),         # C = G with x2: groups of one channel from either input
    (1, 320, 640, (2, 2), 32),    # SD's up-block cat: 32 groups of 30, group 10 straddles 320
    (2, 4, 4, (3,), 2),           # 3-D (N, C, L)
    (1, 5, 3, (2, 3, 4), 4),      # 5-D (N, C, D, H, W), group 2 straddles (channels 4 | 5)
    (2, 8, 8, (), 4),             # 2-D (N, C): no spatial dims, S = 1
    (1, 8, 8, (32, 32), 2),       # 8192 elements a group: several tiles, 16-byte rows (VEC)
]

LAYOUTS = ["nchw", "cl", "mixed"]   # both planar, both channels-last, x channels-last only


def _cl(t):
    """t in its channels-last form: channels_last(_3d), or an (N, L, C) tensor transposed."""
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    if t.dim() == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t


def _inputs(N, C1, C2, spatial, dtype, layout="nchw", offset=0.5, std=2.0, seed=0,
            w_dtype=torch.float32, b_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C1, *spatial, generator=g) * std + offset).to(dtype)
    x2 = (torch.randn(N, C2, *spatial, generator=g) * std - offset).to(dtype) if C2 else None
    if layout in ("cl", "mixed"):
        x = _cl(x)
    if layout == "cl" and x2 is not None:
        x2 = _cl(x2)
    C = C1 + C2
    w = (1 + 0.3 * torch.randn(C, generator=g)).to(w_dtype)
    b = (0.3 * torch.randn(C, generator=g)).to(b_dtype or w_dtype)
    return x, x2, w, b


def _cat(x, x2):
    return x if x2 is None else torch.cat([x, x2], 1)


def _applied(a, scale, shift):
    """a * scale + shift in float64 (per (n, c), broadcast over space)."""
    view = (*scale.shape, *([1] * (a.dim() - 2)))
    return a.double() * scale.double().view(view) + shift.double().view(view)


def _check(out, x, x2, G, w, b, eps, rtol=2e-6, what=""):
    """scale/shift against the float64 reference (float32 outputs of exact inputs: a few float32
    roundings), and applied to the cat, against F.group_norm by the project's pass rule
    (torch's fp32 group_norm of the same values as the yardstick)."""
    scale, shift = out
    N, C = x.shape[0], x.shape[1] + (0 if x2 is None else x2.shape[1])
    for t in (scale, shift):
        assert t.dtype == torch.float32 and t.shape == (N, C) and t.is_contiguous(), what
    rs, rh = reference.group_norm_scale_shift(x, G, w, b, eps, x2)
    err_s = ((scale.double() - rs).abs() / rs.abs()).max().item()
    assert err_s <= rtol, f"{what}: scale relative error {err_s:.3g}"
    # shift = bias - mean * scale: its error is relative to |mean * scale|, not to |shift|
    err_h = ((shift.double() - rh).abs() / ((rh - _f(b, C)).abs() + rs.abs())).max().item()
    assert err_h <= rtol, f"{what}: shift relative error {err_h:.3g}"
    a = _cat(x, x2).float()
    ref = F.group_norm(a.double(), G, _f(w, C, 1.0), _f(b, C), eps)
    assert_close_to_ref(_applied(a, scale, shift), ref,
                        F.group_norm(a, G, _f(w, C, 1.0).float(), _f(b, C).float(), eps), 1e-6,
                        what=what)


def _f(t, C, absent=0.0):
    return torch.full((C,), absent, dtype=torch.float64) if t is None else t.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_and_group_norm(backend, dtype, layout, shape):
    N, C1, C2, spatial, G = shape
    if layout == "mixed" and C2 == 0:
        pytest.skip("no x2: 'mixed' is 'cl'")
    if backend == "triton" and dtype == torch.bfloat16 and layout == "mixed":
        pytest.skip("interpreted Triton: bf16 runs its planar and channels-last cases only")
    x, x2, w, b = _inputs(N, C1, C2, spatial, dtype, layout)
    _check(run_op(backend, "group_norm_scale_shift", x, G, w, b, 1e-5, x2), x, x2, G, w, b,
           1e-5, what=f"{backend} {dtype} {layout}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_and_bias_absent_or_in_x_dtype(backend):
    """weight and bias each in x's dtype or float32 (read per their own), or absent (1 and 0)."""
    x, x2, w, b = _inputs(2, 6, 10, (3, 5), torch.float16, "nchw", w_dtype=torch.float16,
                          b_dtype=torch.float32)
    _check(run_op(backend, "group_norm_scale_shift", x, 4, w, b, 1e-5, x2), x, x2, 4, w, b,
           1e-5)
    for w_, b_ in ((None, None), (w, None), (None, b)):
        _check(run_op(backend, "group_norm_scale_shift", x, 4, w_, b_, 1e-5, x2), x, x2, 4, w_,
               b_, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_a_large_mean_keeps_its_digits(backend, layout):
    """Mean 1e3, std 1, in float32 (x and x2 both: straddling groups too): E[a^2] - E[a]^2
    of a itself would lose the variance to cancellation (a 1e6 sum against 1); sums around the
    group's first value keep scale (rstd) to float32 rounding."""
    x, x2, w, b = _inputs(2, 6, 10, (8, 8), torch.float32, layout, offset=1e3, std=1.0, seed=1)
    x2 = x2 + 2e3   # both inputs far out
    out = run_op(backend, "group_norm_scale_shift", x, 4, w, b, 1e-5, x2)
    _check(out, x, x2, 4, w, b, 1e-5, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_groups_and_eps(backend):
    """A constant group has var 0 exactly (no negative variance from rounding): scale =
    weight / sqrt(eps), shift = bias - value * scale; eps = 0.1 shows in the values."""
    x = torch.full((2, 4, 3, 3), 7.25)
    x2 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    scale, shift = run_op(backend, "group_norm_scale_shift", x, 4, w, b, 1e-5, x2)
    torch.testing.assert_close(scale[:, :4], (w[:4] / 1e-5 ** 0.5).expand(2, 4), rtol=1e-6,
                               atol=0)
    torch.testing.assert_close(shift[:, :4], (b[:4] - 7.25 * w[:4] / 1e-5 ** 0.5).expand(2, 4),
                               rtol=1e-6, atol=1e-3)
    _check(run_op(backend, "group_norm_scale_shift", x2, 2, w[:4], b[:4], 0.1, None), x2, None,
           2, w[:4], b[:4], 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_agree(backend):
    """One cat, every layout of x and x2 (and an x that is a batch slice: a free batch stride):
    the same statistics up to summation order."""
    x, x2, w, b = _inputs(2, 10, 20, (4, 6), torch.float32)
    want = run_op(backend, "group_norm_scale_shift", x, 5, w, b, 1e-5, x2)
    big = torch.randn(4, 10, 4, 6)
    big[::2] = x
    for xa, xb in ((_cl(x), x2), (x, _cl(x2)), (_cl(x), _cl(x2)), (big[::2], x2),
                   (_cl(big)[::2], _cl(x2))):
        got = run_op(backend, "group_norm_scale_shift", xa, 5, w, b, 1e-5, xb)
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)


def test_empty_batch_and_x_without_channels():
    """N = 0: (0, C) outputs; an x of no channels: x2's own statistics."""
    x, x2 = torch.empty(0, 4, 3, 3), torch.empty(0, 4, 3, 3)
    assert [t.shape for t in op(x, 2, None, None, 1e-5, x2)] == [(0, 8), (0, 8)]
    x2 = torch.randn(2, 4, 3, 3)
    got = op(torch.empty(2, 0, 3, 3), 2, None, None, 1e-5, x2)
    for g_, w_ in zip(got, op(x2, 2)):
        torch.testing.assert_close(g_, w_, rtol=0, atol=0)


def _bad_args(**over):
    a = dict(x=torch.randn(2, 4, 3, 3), num_groups=4, weight=torch.randn(8),
             bias=torch.randn(8), eps=1e-5, x2=torch.randn(2, 4, 3, 3))
    a.update(over)
    return list(a.values())


BAD = [
    # (overrides, message fragment): one per check in csrc/group_norm_scale_shift.cpp
    ({"x": torch.randn(4)}, "argument 'x' must have at least 2 dims"),
    ({"x": torch.randn(2, 4, 3, 3).double()}, "'x' must have dtype float32, float16 or bfloat16"),
    ({"x": torch.randn(2, 4, 3, 6)[..., ::2]}, "'x' must be contiguous \\(N, C, \\*spatial\\) or "
                                              "channels-last"),
    ({"x": torch.randn(2, 4, 0, 3)}, "'x' must have no empty spatial dim"),
    ({"x2": torch.randn(2, 4, 3, 3).half()}, "'x2' must have x's dtype \\(float32\\), got float16"),
    ({"x2": torch.randn(2, 4, 3, 4)}, "'x2' must have x's batch and spatial sizes"),
    ({"x2": torch.randn(3, 4, 3, 3)}, "'x2' must have x's batch and spatial sizes"),
    ({"x2": torch.randn(2, 4, 9)}, "'x2' must have x's batch and spatial sizes"),
    ({"x2": torch.randn(2, 4, 3, 3).transpose(2, 3)}, "'x2' must be contiguous"),
    ({"x2": torch.randn(2, 4, 3, 3, device="meta")}, "'x2' must be on the same device as 'x'"),
    ({"num_groups": 0}, "'num_groups' must be positive"),
    ({"num_groups": 3}, "C=8 \\(x and x2 together\\) must be divisible by argument "
                        "'num_groups'=3"),
    ({"num_groups": 3, "x2": None, "weight": None, "bias": None},
     "C=4 of argument 'x' must be divisible by argument 'num_groups'=3"),
    ({"eps": -1.0}, "'eps' must be 0 or within float32's normal range"),
    ({"eps": 1e-50}, "'eps' must be 0 or within float32's normal range"),
    ({"weight": torch.randn(4)}, "'weight' must have shape \\[8\\]"),
    ({"bias": torch.randn(8).half()}, "'bias' must have dtype float32 \\(as x\\), got float16"),
    ({"bias": torch.randn(16)[::2]}, "'bias' must be contiguous"),
    ({"weight": torch.randn(8, device="meta")}, "'weight' must be on the same device as 'x'"),
]


@pytest.mark.parametrize("over,msg", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_names_the_argument(over, msg):
    """On the CPU kernel, the Meta kernel and the check the CUDA path runs."""
    assert_rejected("group_norm_scale_shift", _bad_args(**over), msg)


def test_entry_point():
    """ops.group_norm_scale_shift is the op; wrong kinds are TypeErrors naming the argument."""
    x, x2, w, b = _inputs(2, 6, 10, (3, 5), torch.float32)
    got = ops.group_norm_scale_shift(x, 4, w, b, x2=x2)
    for g_, w_ in zip(got, op(x, 4, w, b, 1e-5, x2)):
        torch.testing.assert_close(g_, w_, rtol=0, atol=0)
    with pytest.raises(TypeError, match="argument 'x2' must be a torch.Tensor"):
        ops.group_norm_scale_shift(x, 4, x2=[x2])
    with pytest.raises(TypeError, match="argument 'num_groups' must be an int"):
        ops.group_norm_scale_shift(x, 4.0)


@pytest.mark.parametrize("c1,c2", [(8, 0), (6, 10)])
def test_gradients_match_the_float64_reference(c1, c2):
    """Gradients reach x, x2, weight and bias as through the float64 reference (a backward
    recomputing the statistics in float32; the op once silently gave none), also for groups
    straddling x and x2."""
    x, x2, w, b = _inputs(2, c1, c2, (3, 5), torch.float32)
    leaves = [t for t in (x, x2, w, b) if t is not None]
    g = torch.Generator().manual_seed(1)
    gs, gh = (torch.randn(2, c1 + c2, generator=g) for _ in range(2))

    def grads(fn, cast):
        ins = [t.detach().to(cast).requires_grad_() for t in leaves]
        x2i = ins[1] if c2 else None
        s, h = fn(ins[0], 4, ins[-2], ins[-1], 1e-5, x2i)
        return torch.autograd.grad((s * gs.to(cast)).sum() + (h * gh.to(cast)).sum(), ins)

    got = grads(ops.group_norm_scale_shift, torch.float32)
    want = grads(reference.group_norm_scale_shift, torch.float64)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.double(), w_, rtol=1e-4, atol=1e-5)


def test_meta_kernel_gives_the_shapes_only():
    x = torch.empty(2, 320, 64, 64, dtype=torch.float16, device="meta")
    x2 = torch.empty(2, 640, 64, 64, dtype=torch.float16, device="meta")
    scale, shift = op(x, 32, None, None, 1e-5, x2)
    for t in (scale, shift):
        assert t.device.type == "meta" and t.shape == (2, 960) and t.dtype == torch.float32


def test_compiled_matches_eager():
    """torch.compile(fullgraph=True) traces the op through its Meta kernel."""
    x, x2, w, b = _inputs(2, 6, 10, (3, 5), torch.float32)

    def fn(x, x2):
        scale, shift = op(x, 4, w, b, 1e-5, x2)
        return _cat(x, x2) * scale[:, :, None, None] + shift[:, :, None, None]
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, x2), fn(x, x2), rtol=0,
                               atol=0)


def test_opcheck_schema_and_fake_tensors():
    x, x2, w, b = _inputs(2, 6, 10, (3, 5), torch.float32)
    for args in ((x, 4, w, b, 1e-5, x2), (_cl(x), 2, None, None, 1e-5, None),
                 (x.half(), 4, w.half(), b, 1e-5, _cl(x2.half()))):
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))


def test_plan_layouts_and_vec():
    """Both inputs' layouts and VEC, 16-byte rows or not, and the listed configurations."""
    h = torch.float16
    cases = [
        # (x, x2, G, CL1, CL2, VEC, listed)
        (torch.randn(2, 320, 8, 8).to(h), torch.randn(2, 640, 8, 8).to(h), 32, 0, 0, 8, True),
        (torch.randn(2, 320, 5, 5).to(h), None, 32, 0, 0, 1, True),            # S = 25
        (_cl(torch.randn(2, 320, 8, 8).to(h)), None, 40, 1, 1, 8, True),       # C/G = 8
        (_cl(torch.randn(2, 320, 8, 8).to(h)), None, 32, 1, 1, 1, True),       # C/G = 10
        (_cl(torch.randn(2, 16, 8, 8)), _cl(torch.randn(2, 8, 8, 8)), 3, 1, 1, 4, True),
        (_cl(torch.randn(2, 16, 8, 8)), torch.randn(2, 8, 8, 8), 3, 1, 0, 4, False),  # JIT
        (_cl(torch.randn(2, 16, 8, 8)), torch.randn(2, 0, 8, 8), 4, 1, 1, 4, True),  # x2 empty
    ]
    listed = kernel.prebuilt_configs()
    for x, x2, G, cl1, cl2, vec, is_listed in cases:
        (cfg, grid, args), = kernel.plan(x, G, None, None, 1e-5, x2)[0]
        cx = cfg["constexprs"]
        assert (cx["CL1"], cx["CL2"], cx["VEC"]) == (cl1, cl2, vec), (x.shape, G)
        assert grid == (x.shape[0] * G, 1, 1)
        assert (cfg in listed) == is_listed


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through the CUDA kernel")
def test_cuda_path_reaches_the_jit_launcher():
    """The op's CUDA kernel (C++: no prebuilt cubin runs CPU tensors) falls back to
    fastdiff::_jit_group_norm_scale_shift, whose Python kernel runs this module's plan
    (interpreted here), with and without the trailing optional arguments."""
    x, x2, w, b = _inputs(2, 7, 8, (5, 3), torch.float32)
    for args in ((x, 5, w, b, 1e-5, x2), (x, 7)):
        got = torch.ops.fastdiff._cuda_kernel_group_norm_scale_shift(*args)
        for g_, w_ in zip(got, op(*args)):
            torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)


def test_plan_refuses_sizes_beyond_32_bits():
    x = torch.empty(1, 2, 2**16, 2**15, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="beyond the CUDA kernel's 32-bit sizes"):
        kernel.plan(x, 1)
