"""fastdiff::denoise_step on every backend against the float64 reference of the version-2 step
row (fastdiff.schedules, "the step row, version 2"; fastdiff.reference.denoise_step_v2): the
returned sample and x0, the state slots updated in place (exactly those the row writes), the
device-side step index, torch.compile with the mutated state, and the Triton kernel's prebuilt
builds.

(tests/test_schedules.py checks the tables themselves; tests/test_bad_input.py the argument
checks.)
"""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import BACKENDS, HAS_CUDA, assert_close_to_ref, run_op
from triton.runtime.jit import mangle_type

from fastdiff import reference, schedules
from fastdiff.kernels import denoise_step as kernel
from fastdiff.kernels import launch
from fastdiff.schedules import NUM_V, ROW_LEN, ROW_O, ROW_P, ROW_S, ROW_W, SLOTS

DTYPES = [
    # (dtype, atol, rtol); rtol: one rounding of the output at its largest magnitude. With
    # P_x ~ 150 the outputs reach ~500, where torch's own error can happen to be 0 on a few
    # elements while an FMA rounds once differently (fp32: 3e-5, more than atol).
    (torch.float32, 1e-5, 2**-23),
    (torch.float16, 1e-3, 2**-10),
    (torch.bfloat16, 1e-2, 2**-7),
]

SHAPES = [
    (3, 4, 5, 7),    # 420 elements: one ragged block, numel not a multiple of 16 (scalar path)
    (1,),            # a single element (Triton specializes numel == 1)
    (2, 3, 33, 37),  # 7326 elements: several blocks and a ragged tail
    (2, 4, 32, 32),  # 8192 elements: an exact multiple of the block, no tail
    (2, 4, 64, 65),  # 33280 elements: CPU tasks of a few thousand (these dense rows) and
                     # tiles of 512 with a ragged last one
]

CASES = [
    # (K state slots, guided, noise, clip, write_x0)
    (0, True, True, True, True),      # DDPM-like: guided, noisy, clipped, progressive x0
    (0, False, False, False, False),  # deterministic and unguided, only the sample out
    (1, True, False, False, True),    # DPM-Solver++ 2M: the previous x0 in one slot
    (2, False, True, True, False),    # two slots (UniPC, DPM-Solver 3), noisy, clipped
    (3, True, True, False, True),     # three slots
    (4, True, False, True, True),     # PNDM's four past outputs, clipped
    (5, True, False, True, True),     # every slot (PNDM's Runge-Kutta warm-up), clipped
    (5, False, True, False, False),   # every slot, unguided and noisy
]
CASE_IDS = ["k0-ddpm", "k0-ddim", "k1-dpm2m", "k2-noisy", "k3", "k4-clip", "k5-clip",
            "k5-noisy"]

NUM_STEPS = 6
STEPS = [
    # (row of _table(), step_index dtype)
    (1, torch.int64),  # a row of O(1) coefficients
    (4, torch.int32),  # a DDPM-like row at t ~ 999: P_x ~ 1/sqrt(alpha-bar) ~ 150
]
# Which slots a row writes (W_j; any non-zero value writes), odd rows and even rows: they leave
# different slots untouched, so K = 1 is tested both ways.
WRITES = ((0.0, 2.0, 0.0, 1.0, 0.0), (1.0, 0.0, -0.5, 1.0, 3.0))


def _table(g, k):
    """(NUM_STEPS, ROW_LEN) float32 rows using every coefficient of the inputs a call with k slots
    has (those of absent slots are 0, as schedules requires): odd rows O(1), even rows with the
    magnitudes of DDPM near t = 999 (P_x = 1/sqrt(alpha-bar) up to ~160, P_m ~ -P_x), where
    input rounding is amplified."""
    c = torch.rand(NUM_STEPS, ROW_LEN, generator=g, dtype=torch.float64) * 2 - 1
    big = c[0::2]
    big[:, ROW_P] = 100 + 60 * torch.rand(big.shape[0], generator=g, dtype=torch.float64)
    big[:, ROW_P + 1] = -big[:, ROW_P] * (0.99 + 0.01 * torch.rand(big.shape[0], generator=g,
                                                                   dtype=torch.float64))
    for i in range(NUM_STEPS):
        c[i, ROW_W:ROW_S] = torch.tensor(WRITES[i % 2])
    c[:, schedules.absent_slot_columns(k)] = 0  # (the new values of absent slots stay: unused)
    return c.float()


def _inputs(g, dtype, shape, guided, has_noise, k):
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    mo = r(2 * shape[0], *shape[1:]) if guided else r(*shape)
    return mo, r(*shape), (r(*shape) if has_noise else None), (r(k, *shape) if k else None)


def _torch_same_dtype(mo, x, coeffs, i, noise, state, s, clip, r):
    """The same step with plain torch ops in the input dtype: the yardstick of the pass rule.
    Returns (out, x0, new slot values or None)."""
    c = [float(v) for v in coeffs[i]]
    m = mo
    if mo.shape[0] == 2 * x.shape[0]:
        u, cond = mo.chunk(2)
        m = u + s * (cond - u)
    v = [x, m, noise if noise is not None else torch.zeros_like(x)]
    v += list(state) if state is not None else []

    def affine(base, with_x0=None):
        y = sum(c[base + k] * t for k, t in enumerate(v))
        return y if with_x0 is None else y + c[base + NUM_V] * with_x0

    x0 = affine(ROW_P)
    if clip:
        x0 = x0.clamp(-r, r)
    new = None if state is None else [affine(ROW_S + j * (NUM_V + 1), x0)
                                      for j in range(len(state))]
    return affine(ROW_O, x0), x0, new


def _tol(atol, rtol, ref):
    """The atol handed to assert_close_to_ref: atol plus one rounding at the largest |ref|."""
    return atol + rtol * ref.abs().max().item()


@contextlib.contextmanager
def _poisoned():
    """Outputs the op allocates come filled with NaN (torch's deterministic mode fills
    uninitialized memory), so an element a kernel leaves unwritten fails the finite check."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def _skip_triton_bf16(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter converts fp32 -> bf16 by truncation (a GPU rounds to "
                    "nearest): a one-ulp bias that uses up the whole rtol and sometimes more")


def _check_step(backend, args, tols, what=""):
    """Runs the op on backend with poisoned outputs and checks out, x0 and the state (updated
    where the row writes, bitwise untouched elsewhere) against the reference."""
    mo, x, coeffs, idx, noise, state, s, clip, r, write_x0 = args[:10]
    i = int(idx.reshape(-1)[0])
    before = None if state is None else state.clone()
    with _poisoned():
        out, x0 = run_op(backend, "denoise_step", *args)
    ref_out, ref_x0, ref_state = reference.denoise_step_v2(mo, x, coeffs, idx, noise, before, s,
                                                        clip, r, *args[10:])
    t_out, t_x0, t_state = _torch_same_dtype(mo, x, coeffs, i, noise, before, s, clip, r)
    atol, rtol = tols
    assert out.dtype == x.dtype
    assert_close_to_ref(out, ref_out, t_out, _tol(atol, rtol, ref_out), what=f"{what} out")
    if write_x0:
        assert x0.dtype == x.dtype
        assert_close_to_ref(x0, ref_x0, t_x0, _tol(atol, rtol, ref_x0), what=f"{what} x0")
    else:
        assert x0.shape == (0,)
    for j in range(0 if state is None else state.shape[0]):
        if coeffs[i, ROW_W + j] != 0:
            assert_close_to_ref(state[j], ref_state[j], t_state[j],
                                _tol(atol, rtol, ref_state[j]), what=f"{what} slot {j}")
        else:
            assert torch.equal(state[j], before[j]), f"{what}: slot {j} (W = 0) was written"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k,guided,has_noise,clip,write_x0", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("step,index_dtype", STEPS, ids=["small-i64", "ddpm999-i32"])
def test_matches_reference(backend, dtype, atol, rtol, shape, k, guided, has_noise, clip,
                           write_x0, step, index_dtype):
    _skip_triton_bf16(backend, dtype)
    g = torch.Generator().manual_seed(hash((shape, k, guided, has_noise, step)) % 2**31)
    coeffs = _table(g, k)
    mo, x, noise, state = _inputs(g, dtype, shape, guided, has_noise, k)
    s = 1 + 7 * torch.rand((), generator=g).item() if guided else 1.0
    args = (mo, x, coeffs, torch.tensor([step], dtype=index_dtype), noise, state, s, clip, 1.5,
            write_x0)
    _check_step(backend, args, (atol, rtol), what=backend)


def test_row_layout_matches_schedules():
    """kernels/denoise_step.py's literals (the C++ reads them from the generated header) are
    schedules' layout."""
    for name in ("SLOTS", "NUM_V", "ROW_P", "ROW_O", "ROW_W", "ROW_S", "ROW_LEN"):
        assert getattr(kernel, name) == getattr(schedules, name), name
    assert (schedules.V_X, schedules.V_M, schedules.V_N, schedules.V_S) == (0, 1, 2, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_can_shift_a_history(backend):
    """PNDM-like bookkeeping: s0 <- s1, s1 <- s2, s2 <- x0, s3 kept; every slot is read before
    any is written, so the copies are exact."""
    x = torch.randn(2, 3, 5, 7)
    row = schedules.step_row(p={"x": 0.5, "s0": 1.0}, o={"x": 1.0, "s3": 1.0},
                             writes={0: {"s1": 1.0}, 1: {"s2": 1.0}, 2: {"x0": 1.0}})
    coeffs = torch.tensor([row])
    state = torch.randn(4, *x.shape)
    before = state.clone()
    out, x0 = run_op(backend, "denoise_step", x, x, coeffs, torch.tensor(0), None, state, 1.0,
                     False, 1.0, True)
    assert torch.equal(state[0], before[1]) and torch.equal(state[1], before[2])
    assert torch.equal(state[3], before[3])
    torch.testing.assert_close(state[2], 0.5 * x + before[0], rtol=0, atol=0)
    torch.testing.assert_close(x0, state[2], rtol=0, atol=0)
    torch.testing.assert_close(out, x + before[3], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [0, 2])
def test_empty_sample(backend, k):
    """No elements: nothing is launched, the outputs are empty and the (empty) state is
    accepted with any number of slots."""
    x = torch.randn(0, 3, 5)
    state = torch.randn(k, 0, 3, 5) if k else None
    out, x0 = run_op(backend, "denoise_step", x, x, _table(torch.Generator().manual_seed(2), k),
                     torch.tensor(1), None, state, 1.0, False, 1.0, True)
    assert out.shape == x0.shape == x.shape
    assert state is None or state.shape == (k, 0, 3, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_step_index_is_read_from_the_tensor(backend, index_dtype):
    """The same call with the index tensor updated in place gives the other row's step, as a
    replayed CUDA graph needs (nothing about the index is cached on the host); the state carries
    from call to call."""
    g = torch.Generator().manual_seed(7)
    coeffs = _table(g, 2)
    mo, x, noise, state = _inputs(g, torch.float32, (2, 3, 4), True, True, 2)
    idx = torch.tensor(0, dtype=index_dtype)  # 0-d: any one-element tensor is accepted
    for i in (2, 5, 2):
        idx.fill_(i)
        args = (mo, x, coeffs, idx, noise, state, 3.0, False, 1.0, True)
        _check_step(backend, args, DTYPES[0][1:], what=f"step {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_guided_gives_the_inferred_step(backend):
    """guided=True / False, as the engine and the diffusers step pass it, gives the step that
    inferring it from the batch sizes gives."""
    g = torch.Generator().manual_seed(13)
    coeffs = _table(g, 1)
    for guided in (True, False):
        mo, x, noise, state = _inputs(g, torch.float32, (2, 3, 4), guided, True, 1)
        states = [state.clone(), state.clone()]
        args = (mo, x, coeffs, torch.tensor(1), noise)
        rest = (3.0 if guided else 1.0, False, 1.0, True)
        explicit = run_op(backend, "denoise_step", *args, states[0], *rest, guided)
        inferred = run_op(backend, "denoise_step", *args, states[1], *rest)
        for got, want in zip((*explicit, states[0]), (*inferred, states[1])):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "cpp"])
@pytest.mark.parametrize("index,index_dtype", [
    (-1, torch.int64),
    (NUM_STEPS, torch.int64),
    (2**32 + 1, torch.int64),  # would read row 1 if the index were truncated to 32 bits
    (-(2**31), torch.int32),
    (NUM_STEPS, torch.int32),
])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_out_of_range_index_gives_nan_on_the_device(backend, index, index_dtype, clip):
    """The device cannot raise without a host sync: every output element and every state slot
    is NaN instead (the slots were finite), and clipping must not turn it back into a number."""
    g = torch.Generator().manual_seed(3)
    mo, x, noise, state = _inputs(g, torch.float16, (3, 4, 5, 7), True, True, 3)
    out, x0 = run_op(backend, "denoise_step", mo, x, _table(g, 3), torch.tensor([index],
                     dtype=index_dtype), noise, state, 2.0, clip, 1.0, True)
    assert out.isnan().all() and x0.isnan().all() and state.isnan().all()


@pytest.mark.parametrize("index", [-1, NUM_STEPS])
def test_out_of_range_index_raises_on_cpp(index):
    x = torch.randn(2, 3, 4)
    state = torch.randn(1, 2, 3, 4)
    before = state.clone()
    with pytest.raises(ValueError, match=f"'step_index'={index} is out of range"):
        torch.ops.fastdiff.denoise_step(x, x, _table(torch.Generator().manual_seed(0), 1),
                                        torch.tensor(index), None, state)
    assert torch.equal(state, before)


def test_coefficients_on_absent_slots_raise_on_cpp():
    """On the CPU the row is read anyway: each coefficient on a slot the call does not pass
    (which would be read as zero) raises, naming the row and the slot, and leaves the state as
    it was; the new values of absent slots are not read."""
    g = torch.Generator().manual_seed(17)
    for k in range(SLOTS + 1):
        coeffs = _table(g, k)
        mo, x, noise, state = _inputs(g, torch.float32, (2, 3, 4), False, False, k)
        before = None if state is None else state.clone()
        why = "no 'state' was passed" if k == 0 else f"'state' holds {k} slot"
        columns = schedules.absent_slot_columns(k)
        assert len(columns) == sum(3 + k for _ in range(k, SLOTS))
        for col in columns:
            bad = coeffs.clone()
            bad[2, col] = 0.25
            with pytest.raises(ValueError, match=f"'coeffs' row 2 reads or writes state slot "
                                                 f"[{k}-{SLOTS - 1}], but {why}"):
                torch.ops.fastdiff.denoise_step(mo, x, bad, torch.tensor(2), noise, state)
            assert state is None or torch.equal(state, before)
            torch.ops.fastdiff.denoise_step(mo, x, bad, torch.tensor(1), noise,
                                            None if state is None else state.clone())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_nan_in_model_output_propagates(backend, clip):
    """As in torch.clamp, a NaN stays NaN through the clip (a GPU min/max would drop it)."""
    g = torch.Generator().manual_seed(5)
    mo, x, _, state = _inputs(g, torch.float32, (2, 3, 4), True, False, 1)
    mo[3, 1, 2] = float("nan")  # cond half, sample element (1, 1, 2)
    coeffs = _table(g, 1)
    ref_out, ref_x0, ref_state = reference.denoise_step_v2(mo, x, coeffs, torch.tensor(1), None,
                                                        state, 2.0, clip, 1.0)
    out, x0 = run_op(backend, "denoise_step", mo, x, coeffs, torch.tensor(1), None, state, 2.0,
                     clip, 1.0, True)
    assert torch.equal(out.isnan(), ref_out.isnan()) and out[1, 1, 2].isnan()
    assert torch.equal(x0.isnan(), ref_x0.isnan()) and x0[1, 1, 2].isnan()
    assert torch.equal(state.isnan(), ref_state.isnan()) and state[0, 1, 1, 2].isnan()


# The C++ kernel reduces each row to its non-zero terms (csrc/denoise_step.cpp): rows with zeros
# in every pattern, at sizes around its tile (512 elements), its 8-float vectors and the grain
# above which it splits the sample between threads (at least 512 elements a task).
SPARSE_SIZES = [
    (1,),           # one element: every load and store partial
    (37,),          # under one tile, 4 whole vectors and a ragged tail of 5
    (2, 3, 86),     # 516 elements: one tile and a tail of 4 in the next
    (3, 5, 7, 11),  # 1155 elements: two tiles and a ragged third
    (1, 4, 64, 65),  # 16640 elements: split between threads when the row is heavy enough
]


def _sparse_row(g, k, density):
    """A row with each coefficient of the inputs a call with k slots has kept with probability
    `density`, else 0 (half of them -0.0), and each slot written with probability 1/2; O(1)
    values (one row in four with the DDPM-like P_x ~ 150)."""
    c = (torch.rand(ROW_LEN, generator=g, dtype=torch.float64) * 2 - 1).float()
    keep = torch.rand(ROW_LEN, generator=g) < density
    c = torch.where(keep, c, torch.where(torch.rand(ROW_LEN, generator=g) < 0.5, 0.0, -0.0))
    if torch.rand((), generator=g) < 0.25 and keep[ROW_P]:
        c[ROW_P] = 150.0
        c[ROW_P + 1] = -149.0
    c[ROW_W:ROW_S] = (torch.rand(SLOTS, generator=g) < 0.5).float()
    c[schedules.absent_slot_columns(k)] = 0
    return c


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("k", range(SLOTS + 1))
def test_sparse_rows_match_reference(dtype, atol, rtol, k):
    """Rows with zeros anywhere (none, a few, most, all: an empty x0 or out, a slot copy, a
    written slot with no term), with and without guidance, noise, clipping and x0, at every
    size of SPARSE_SIZES: the C++ kernel against the reference, the slots with W = 0 left
    bitwise as they were (_check_step)."""
    g = torch.Generator().manual_seed(1000 + k)
    for shape in SPARSE_SIZES:
        for density in (0.0, 0.2, 0.5, 0.8, 1.0):
            guided, has_noise, clip, write_x0 = (torch.rand(4, generator=g) < 0.5).tolist()
            coeffs = torch.stack([_sparse_row(g, k, density) for _ in range(3)])
            mo, x, noise, state = _inputs(g, dtype, shape, guided, has_noise, k)
            s = 1 + 7 * torch.rand((), generator=g).item() if guided else 1.0
            args = (mo, x, coeffs, torch.tensor(1), noise, state, s, clip, 1.5, write_x0)
            _check_step("cpp", args, (atol, rtol),
                        what=f"{shape} density {density} guided {guided} noise {has_noise} "
                             f"clip {clip} x0 {write_x0} row {coeffs[1].tolist()}")


def _assert_same_nonfinite(got, ref, what):
    """NaN where the reference has NaN, +-inf where it has the same infinity, close elsewhere."""
    got64 = got.to(torch.float64)
    assert torch.equal(got64.isnan(), ref.isnan()), f"{what}: NaN at other elements"
    assert torch.equal(got64.isinf(), ref.isinf()), f"{what}: inf at other elements"
    assert torch.equal(got64[ref.isinf()], ref[ref.isinf()]), f"{what}: inf of another sign"
    fin = ref.isfinite()
    torch.testing.assert_close(got64[fin], ref[fin], rtol=1e-2, atol=1e-2, msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")],
                         ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["x", "cond", "noise", "s0", "s1", "s2"])
def test_zero_coefficients_multiply_non_finite_inputs_as_the_reference(dtype, bad, where):
    """A term with coefficient 0 is skipped, but the reference (and the Triton kernel) multiply
    it through: 0 * inf and 0 * NaN are NaN. A non-finite value in an input that some result
    reads with coefficient 0, or that no result reads, gives the reference's NaN and inf
    (the tile is computed again with every term); its neighbours stay finite.

    The row: x0 = 2 x (x read, m not), out = 0.5 m + 1 s0 + 0 x0 (x0 not read), slot 0 <- s2
    (a copy), slot 1 <- x0, slot 2 <- -0.0 terms only; s1 is read by nothing."""
    row = schedules.step_row(p={"x": 2.0}, o={"m": 0.5, "s0": 1.0},
                             writes={0: {"s2": 1.0}, 1: {"x0": 1.0}, 2: {"x": -0.0}})
    coeffs = torch.tensor([row])
    g = torch.Generator().manual_seed(23)
    shape = (2, 3, 100)  # 600 elements: the bad one in the first tile, the second tile clean
    mo, x, noise, state = _inputs(g, dtype, shape, True, True, 3)
    {"x": x, "cond": mo[2:], "noise": noise, "s0": state[0], "s1": state[1],
     "s2": state[2]}[where][1, 2, 3] = bad
    before = state.clone()
    ref_out, ref_x0, ref_state = reference.denoise_step_v2(mo, x, coeffs, torch.tensor(0), noise,
                                                        before, 3.0, False, 1.0)
    out, x0 = torch.ops.fastdiff.denoise_step(mo, x, coeffs, torch.tensor(0), noise, state, 3.0,
                                              False, 1.0, True)
    _assert_same_nonfinite(out, ref_out, f"{where}: out")
    _assert_same_nonfinite(x0, ref_x0, f"{where}: x0")
    for j in range(3):
        _assert_same_nonfinite(state[j], ref_state[j], f"{where}: slot {j}")
    assert not ref_out[1, 2, 3].isfinite()  # (every case reaches out, by 0 * bad at least)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("where", ["x", "uncond", "cond", "noise"])
def test_non_finite_inputs_of_a_ddim_like_row(bad, where):
    """A row with no slot whose x0 and out the kernel computes in one pass over the whole range
    (DDIM's shape; m from the guided pair in registers): m is read by x0 only and the noise by
    nothing, so a non-finite value there makes the range computed again tile by tile with every
    term, as the reference: NaN or inf where it has them (in the third of four tiles), the
    other elements as before."""
    row = schedules.step_row(p={"x": 1.5, "m": -0.5}, o={"x": 0.25, "x0": 2.0})
    coeffs = torch.tensor([row])
    g = torch.Generator().manual_seed(29)
    mo, x, noise, _ = _inputs(g, torch.float32, (4, 5, 100), True, True, 0)
    {"x": x, "uncond": mo[:4], "cond": mo[4:], "noise": noise}[where][2, 3, 4] = bad
    ref_out, ref_x0, _ = reference.denoise_step_v2(mo, x, coeffs, torch.tensor(0), noise, None,
                                                   4.0, False, 1.0)
    out, x0 = torch.ops.fastdiff.denoise_step(mo, x, coeffs, torch.tensor(0), noise, None, 4.0,
                                              False, 1.0, True)
    assert not ref_out[2, 3, 4].isfinite()
    _assert_same_nonfinite(out, ref_out, f"{where}: out")
    _assert_same_nonfinite(x0, ref_x0, f"{where}: x0")


@pytest.mark.parametrize("k", range(SLOTS + 1))
def test_sparse_rows_with_non_finite_inputs_match_reference(k):
    """Random sparse rows (as test_sparse_rows_match_reference) and an inf, -inf or NaN in one
    random input a call has, at one random element: NaN and inf exactly where the reference
    has them, whichever results read that input with a zero or non-zero coefficient."""
    g = torch.Generator().manual_seed(2000 + k)
    for trial in range(48):
        shape = (3, 5, 37)  # 555 elements: two tiles
        guided, has_noise, clip, write_x0 = (torch.rand(4, generator=g) < 0.5).tolist()
        density = [0.2, 0.5, 0.8][trial % 3]
        coeffs = torch.stack([_sparse_row(g, k, density)])
        mo, x, noise, state = _inputs(g, torch.float32, shape, guided, has_noise, k)
        names = ["x", "mo", "mo2"][:2 + guided] + ["noise"] * has_noise + [f"s{j}" for j in
                                                                           range(k)]
        name = names[int(torch.randint(len(names), (), generator=g))]
        tensor = {"x": x, "mo": mo[:shape[0]], "mo2": mo[shape[0]:], "noise": noise,
                  **{f"s{j}": state[j] for j in range(k)}}[name]
        bad = [float("inf"), -float("inf"), float("nan")][trial % 3]
        tensor.view(-1)[int(torch.randint(tensor.numel(), (), generator=g))] = bad
        s = 1 + 7 * torch.rand((), generator=g).item() if guided else 1.0
        before = None if state is None else state.clone()
        ref_out, ref_x0, ref_state = reference.denoise_step_v2(mo, x, coeffs, torch.tensor(0),
                                                            noise, before, s, clip, 1.5)
        out, x0 = torch.ops.fastdiff.denoise_step(mo, x, coeffs, torch.tensor(0), noise, state,
                                                  s, clip, 1.5, write_x0)
        what = f"trial {trial}: {bad} in {name}, row {coeffs[0].tolist()}"
        _assert_same_nonfinite(out, ref_out, f"{what}: out")
        if write_x0:
            _assert_same_nonfinite(x0, ref_x0, f"{what}: x0")
        for j in range(k):
            if coeffs[0, ROW_W + j] != 0:
                _assert_same_nonfinite(state[j], ref_state[j], f"{what}: slot {j}")
            else:
                assert torch.equal(state[j].isnan(), before[j].isnan())
                torch.testing.assert_close(state[j], before[j], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("write_x0", [False, True], ids=["no-x0", "x0"])
def test_an_x0_that_nothing_reads_still_multiplies_through(write_x0):
    """x0 = 2 x (or 150 x, which overflows float32 at 3e37), out = m: x and x0 are read with
    coefficient 0 by out only, so an inf in x, or an x0 overflowing, makes out NaN there (as
    the reference, and as float32 torch for the overflow), although out reads neither and,
    without write_x0, x0 is stored nowhere."""
    x = torch.ones(40)
    m = torch.full((40,), 0.5)
    x[7] = float("inf")
    row = torch.tensor([schedules.step_row(p={"x": 2.0}, o={"m": 1.0})])
    out, x0 = torch.ops.fastdiff.denoise_step(m, x, row, torch.tensor(0), None, None, 1.0, False,
                                              1.0, write_x0)
    ref_out, _, _ = reference.denoise_step_v2(m, x, row, torch.tensor(0))
    assert ref_out[7].isnan()
    _assert_same_nonfinite(out, ref_out, "inf in x: out")
    x[7] = 3e37
    row = torch.tensor([schedules.step_row(p={"x": 150.0}, o={"m": 1.0})])
    out, x0 = torch.ops.fastdiff.denoise_step(m, x, row, torch.tensor(0), None, None, 1.0, False,
                                              1.0, write_x0)
    t_out, _, _ = _torch_same_dtype(m, x, row, 0, None, None, 1.0, False, 1.0)
    assert t_out[7].isnan()
    torch.testing.assert_close(out, t_out, rtol=0, atol=0, equal_nan=True)


def test_zero_coefficient_on_an_overflowing_x0_is_nan():
    """x0 = 150 x overflows float32 for |x| > 2.3e36 although x is finite; out reads x0 with
    coefficient 0. Every term multiplied through in float32 (as torch in float32, and the
    kernel before it skipped zero terms) gives out = x + 0 * inf = NaN there: so does the
    kernel. (The float64 reference does not overflow.)"""
    row = schedules.step_row(p={"x": 150.0}, o={"x": 1.0, "x0": 0.0})
    coeffs = torch.tensor([row])
    x = torch.ones(40)
    x[7] = 3e37
    out, x0 = torch.ops.fastdiff.denoise_step(x, x, coeffs, torch.tensor(0), None, None, 1.0,
                                              False, 1.0, True)
    t_out, t_x0, _ = _torch_same_dtype(x, x, coeffs, 0, None, None, 1.0, False, 1.0)
    assert t_out[7].isnan() and t_x0[7].isinf()
    torch.testing.assert_close(out, t_out, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(x0, t_x0, rtol=0, atol=0)


def test_compiled_step_matches_eager():
    """torch.compile(fullgraph=True) traces the op through its Meta kernel (the fake kernel)."""
    def two_steps(mo, x, coeffs, noise):
        for i in (0, 3):
            x, x0 = torch.ops.fastdiff.denoise_step(mo, x, coeffs, torch.tensor(i), noise, None,
                                                    3.0, True, 1.0, True)
        return x, x0

    g = torch.Generator().manual_seed(11)
    coeffs = _table(g, 0) * 0.1
    mo, x, noise, _ = _inputs(g, torch.float32, (2, 3, 8), True, True, 0)
    torch._dynamo.reset()
    compiled = torch.compile(two_steps, fullgraph=True)
    for got, want in zip(compiled(mo, x, coeffs, noise), two_steps(mo, x, coeffs, noise)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_step_updates_the_state_as_eager(compiler):
    """The state is a mutated optional argument (Tensor(a!)?): torch.compile(fullgraph=True)
    functionalizes the op (auto_functionalize) and writes the new slots back into the caller's
    tensor, step after step, as eager does."""
    def three_steps(mo, x, coeffs, noise, state):
        for i in (1, 4, 1):
            x, x0 = torch.ops.fastdiff.denoise_step(mo, x, coeffs, torch.tensor(i), noise, state,
                                                    3.0, True, 1.0, True)
        return x, x0

    g = torch.Generator().manual_seed(19)
    coeffs = _table(g, 2) * 0.1
    mo, x, noise, state = _inputs(g, torch.float32, (2, 3, 8), True, True, 2)
    eager_state, compiled_state = state.clone(), state.clone()
    torch._dynamo.reset()
    compiled = torch.compile(three_steps, fullgraph=True, backend=compiler)
    got = compiled(mo, x, coeffs, noise, compiled_state)
    want = three_steps(mo, x, coeffs, noise, eager_state)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(eager_state, state)
    torch.testing.assert_close(compiled_state, eager_state, rtol=0, atol=0)


def _key(cfg):
    return (repr(sorted(cfg["signature"].items())), repr(sorted(cfg["constexprs"].items())),
            cfg["num_warps"], cfg["num_stages"])


@pytest.mark.skipif(HAS_CUDA, reason="patches the interpreted launch")
def test_launcher_runs_only_listed_configs(monkeypatch):
    """Each launch's argument types, constexprs and warps are one of prebuilt_configs()."""
    listed = {_key(c) for c in kernel.prebuilt_configs()}
    real = kernel.denoise_step
    seen = []

    class Recorder:
        arg_names = real.arg_names

        def __getitem__(self, grid):
            def launch(*args, num_warps, num_stages, **constexprs):
                names = [a for a in real.arg_names if a not in constexprs]
                signature = dict(zip(names, map(mangle_type, args)))
                seen.append(_key({"signature": signature, "constexprs": constexprs,
                                  "num_warps": num_warps, "num_stages": num_stages}))
                return real[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
            return launch

    monkeypatch.setattr(kernel, "denoise_step", Recorder())
    g = torch.Generator().manual_seed(1)
    for dtype, _, _ in DTYPES:
        for k, guided, has_noise, clip, write_x0 in CASES:
            coeffs = _table(g, k)
            for step, index_dtype in STEPS:
                mo, x, noise, state = _inputs(g, dtype, (2, 5), guided, has_noise, k)
                launch("denoise_step", mo, x, coeffs, torch.tensor(step, dtype=index_dtype),
                       noise, state, 2.0 if guided else 1.0, clip, 1.0, write_x0)
    assert len(seen) == len(DTYPES) * len(CASES) * len(STEPS)
    assert set(seen) <= listed, set(seen) - listed


# Runs without TRITON_INTERPRET (under the interpreter, `@triton.jit` functions cannot be
# compiled, and its patched language functions may leak into an in-process compile).
_COMPILE_SCRIPT = """
import json, re, sys, torch
from fastdiff.kernels import denoise_step as kernel
from fastdiff.kernels.prebuild import compile_config
arch = int(sys.argv[1])
for cfg in kernel.prebuilt_configs():
    if "numel" not in cfg["aligned"]:
        continue
    k = compile_config(cfg, arch)
    ptx = k.asm["ptx"]
    print(json.dumps({"label": f"sm_{arch} {cfg['signature']['x_ptr']} {cfg['constexprs']}",
                      "cubin": len(k.asm["cubin"]), "shared": k.metadata.shared,
                      "vector": "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx,
                      "nan_minmax": bool(re.findall(r"\\b(?:max|min)\\.NaN\\.f32", ptx)),
                      "plain_minmax": bool(re.findall(r"\\b(?:max|min)\\.f32", ptx))}))
big = kernel._config(torch.float16, kernel.SLOTS)
big = {**big, "signature": {**big["signature"], "numel": "i64"}, "aligned": ()}
print(json.dumps({"big": len(compile_config(big, arch).asm["cubin"])}))
"""


@pytest.mark.parametrize("arch", [90])
def test_every_config_compiles_ahead_of_time(arch):
    """Every listed configuration's aligned variant (the case the JIT sees for whole images)
    builds a cubin for sm_90 on this GPU-less machine (sm_80's: `make wheel`; the suite compiles
    only the tensor-core kernels for it, tests/test_prebuild.py), with 16-byte vector loads and
    stores and NaN-propagating min/max; the 64-bit numel variant (over 2**31 elements,
    unaligned) builds too. tests/test_prebuild.py compiles the pointers-only variants."""
    configs = kernel.prebuilt_configs()
    aligned = [c for c in configs if "numel" in c["aligned"]]
    assert len(aligned) == 3 * 2 * (SLOTS + 1)  # dtypes x index dtypes x slot counts
    assert len(configs) == 2 * len(aligned)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(arch)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(recs) == len(aligned) + 1 and recs[-1]["big"] > 0
    for rec in recs[:-1]:
        label = rec["label"]
        assert rec["cubin"] > 0 and rec["shared"] == 0, label
        assert rec["vector"], f"{label}: not vectorized"
        assert rec["nan_minmax"] and not rec["plain_minmax"], f"{label}: min/max drops NaN"
