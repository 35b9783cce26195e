"""denoise_step on every backend against the float64 reference of the coefficient-table step.

(tests/test_schedules.py checks the tables themselves against diffusers' schedulers.)
"""
import pytest
import torch
from conftest import BACKENDS, assert_close_to_ref, run_op

from fastdiff import reference

DTYPES = [
    # (dtype, atol)
    (torch.float32, 1e-5),
    (torch.float16, 1e-3),
    (torch.bfloat16, 1e-2),
]

SHAPES = [
    (3, 4, 5, 7),   # 420 elements: not a multiple of any block
    (1,),           # a single element
    (2, 4, 32, 33),  # several blocks with a ragged tail
]


def _table(seed=0, steps=5):
    """Random rows with the magnitudes real tables have (P_x ~ 1/sqrt(alpha-bar) up to ~150)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(steps, 8, generator=g) * 2 - 1
    c[:, 1] = torch.linspace(150.0, 1.0, steps)    # P_x
    c[:, 2] = -torch.linspace(150.0, 0.1, steps)   # P_m
    return c


def _torch_same_dtype(mo, x, coeffs, i, noise, prev, s, clip, r):
    """The same step with plain torch ops in the input dtype: the yardstick for the bound."""
    c = [float(v) for v in coeffs[i]]
    m = mo
    if mo.shape[0] == 2 * x.shape[0]:
        u, cond = mo.chunk(2)
        m = u + s * (cond - u)
    n = noise if noise is not None else torch.zeros_like(x)
    xh = x + c[0] * n
    x0 = c[1] * xh + c[2] * m
    if clip:
        x0 = x0.clamp(-r, r)
    out = c[3] * xh + c[4] * x0 + c[5] * m + c[7] * n
    if prev is not None:
        out = out + c[6] * prev
    return out, x0


CASES = [
    # (guided, noise, prev_x0, clip, write_x0)
    (True, True, False, True, True),     # guided DDPM with clipping, progressive x0
    (True, False, True, False, True),    # guided DPM-Solver++ 2M (reads the previous x0)
    (False, False, False, False, False),  # unguided deterministic DDIM
    (False, True, True, True, False),    # everything but guidance
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("guided,has_noise,has_prev,clip,write_x0", CASES,
                         ids=["ddpm", "dpm2m", "ddim", "noguide"])
def test_matches_reference(backend, dtype, atol, shape, guided, has_noise, has_prev, clip,
                           write_x0):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to "
                    "nearest), a one-ulp bias the 2x-torch bound does not allow")
    g = torch.Generator().manual_seed(len(shape))
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x = r(*shape)
    mo = r(2 * shape[0], *shape[1:]) if guided else r(*shape)
    noise, prev = (r(*shape) if has_noise else None), (r(*shape) if has_prev else None)
    coeffs, i, s = _table(), 3, (4.0 if guided else 1.0)
    args = (mo, x, coeffs, torch.tensor(i), noise, prev, s, clip, 1.5, write_x0)
    out, x0 = run_op(backend, "denoise_step", *args)
    ref_out, ref_x0 = reference.denoise_step(*args)
    t_out, t_x0 = _torch_same_dtype(mo, x, coeffs, i, noise, prev, s, clip, 1.5)
    # The bound scales with the data: P_x ~ 150 amplifies the input rounding.
    assert_close_to_ref(out, ref_out, t_out, atol, what=f"{backend} out")
    if write_x0:
        assert_close_to_ref(x0, ref_x0, t_x0, atol, what=f"{backend} x0")
    else:
        assert x0.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_step_index_is_read_from_the_tensor(backend, index_dtype):
    x, mo = torch.randn(2, 3, 4), torch.randn(4, 3, 4)
    coeffs = _table(1)
    outs = [run_op(backend, "denoise_step", mo, x, coeffs, torch.tensor([i], dtype=index_dtype),
                   None, None, 2.0, False, 1.0, False)[0] for i in range(coeffs.shape[0])]
    for i, out in enumerate(outs):
        ref, _ = reference.denoise_step(mo, x, coeffs, torch.tensor(i), None, None, 2.0)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "cpp"])
def test_out_of_range_index_poisons_on_the_device(backend):
    """The GPU path cannot raise without a host sync: it writes NaN, never a wrong number."""
    x = torch.randn(2, 3, 4)
    for i in (-1, 5):
        out, x0 = run_op(backend, "denoise_step", x, x, _table(), torch.tensor(i), None, None, 1.0,
                         False, 1.0, True)
        assert out.isnan().all() and x0.isnan().all()


def test_out_of_range_index_raises_on_cpu():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="'step_index'=5 is out of range"):
        torch.ops.fastdiff.denoise_step(x, x, _table(), torch.tensor(5))


def test_compiled_step_matches_eager():
    """torch.compile(fullgraph=True) traces the op through its Meta kernel."""
    def loop(mo, x, coeffs):
        for i in range(coeffs.shape[0]):
            x, _ = torch.ops.fastdiff.denoise_step(mo, x, coeffs, torch.tensor(i), None, None, 3.0)
        return x

    mo, x, coeffs = torch.randn(4, 3, 8), torch.randn(2, 3, 8), _table(2) * 0.1
    torch._dynamo.reset()
    compiled = torch.compile(loop, fullgraph=True)
    torch.testing.assert_close(compiled(mo, x, coeffs), loop(mo, x, coeffs))
