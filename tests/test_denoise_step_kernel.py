"""fastdiff::denoise_step on every backend against the float64 reference of the coefficient-table
step (csrc/denoise_step.cpp), the device-side step index, and the Triton kernel's prebuilt
builds.

(tests/test_schedules.py checks the tables themselves; tests/test_bad_input.py the argument
checks.)
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import BACKENDS, HAS_CUDA, assert_close_to_ref, run_op
from triton.runtime.jit import mangle_type

from fastdiff import reference
from fastdiff.kernels import denoise_step as kernel
from fastdiff.kernels import launch
from fastdiff.schedules import COEF_H, COEF_K0, COEF_KM, COEF_KN, COEF_KP, COEF_KX, COEF_PM, COEF_PX

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
]

CASES = [
    # (guided, noise, prev_x0, clip, write_x0)
    (True, True, False, True, True),      # guided DDPM with clipping, progressive x0
    (True, False, True, False, True),     # guided DPM-Solver++ 2M (reads the previous x0)
    (False, False, False, False, False),  # unguided deterministic DDIM, only the sample out
    (False, True, True, True, False),     # every optional input, clipped, unguided
]

NUM_STEPS = 6
STEPS = [
    # (row of _table(), step_index dtype)
    (1, torch.int64),  # a row of O(1) coefficients
    (4, torch.int32),  # a DDPM-like row at t ~ 999: P_x ~ 1/sqrt(alpha-bar) ~ 150
]


def _table(g):
    """(NUM_STEPS, 8) float32 rows: odd rows O(1), even rows with the magnitudes of DDPM near
    t = 999 (P_x = 1/sqrt(alpha-bar) up to ~160, P_m ~ -P_x), where input rounding is amplified."""
    c = torch.rand(NUM_STEPS, 8, generator=g, dtype=torch.float64) * 2 - 1
    big = c[0::2]
    big[:, COEF_PX] = 100 + 60 * torch.rand(big.shape[0], generator=g, dtype=torch.float64)
    big[:, COEF_PM] = -big[:, COEF_PX] * (0.99 + 0.01 * torch.rand(big.shape[0], generator=g,
                                                                     dtype=torch.float64))
    return c.float()


def _inputs(g, dtype, shape, guided, has_noise, has_prev):
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    mo = r(2 * shape[0], *shape[1:]) if guided else r(*shape)
    return mo, r(*shape), (r(*shape) if has_noise else None), (r(*shape) if has_prev else None)


def _torch_same_dtype(mo, x, coeffs, i, noise, prev, s, clip, r):
    """The same step with plain torch ops in the input dtype: the yardstick of the pass rule."""
    c = [float(v) for v in coeffs[i]]
    m = mo
    if mo.shape[0] == 2 * x.shape[0]:
        u, cond = mo.chunk(2)
        m = u + s * (cond - u)
    n = noise if noise is not None else torch.zeros_like(x)
    xh = x + c[COEF_H] * n
    x0 = c[COEF_PX] * xh + c[COEF_PM] * m
    if clip:
        x0 = x0.clamp(-r, r)
    out = c[COEF_KX] * xh + c[COEF_K0] * x0 + c[COEF_KM] * m + c[COEF_KN] * n
    if prev is not None:
        out = out + c[COEF_KP] * prev
    return out, x0


def _tol(atol, rtol, ref):
    """The atol handed to assert_close_to_ref: atol plus one rounding at the largest |ref|."""
    return atol + rtol * ref.abs().max().item()


def _skip_triton_bf16(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter converts fp32 -> bf16 by truncation (a GPU rounds to "
                    "nearest): a one-ulp bias that uses up the whole rtol and sometimes more")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("guided,has_noise,has_prev,clip,write_x0", CASES,
                         ids=["ddpm", "dpm2m", "ddim", "noguide"])
@pytest.mark.parametrize("step,index_dtype", STEPS, ids=["small-i64", "ddpm999-i32"])
def test_matches_reference(backend, dtype, atol, rtol, shape, guided, has_noise, has_prev, clip,
                           write_x0, step, index_dtype):
    _skip_triton_bf16(backend, dtype)
    g = torch.Generator().manual_seed(hash((shape, guided, has_noise, step)) % 2**31)
    coeffs = _table(g)
    mo, x, noise, prev = _inputs(g, dtype, shape, guided, has_noise, has_prev)
    s = 1 + 7 * torch.rand((), generator=g).item() if guided else 1.0
    args = (mo, x, coeffs, torch.tensor([step], dtype=index_dtype), noise, prev, s, clip, 1.5,
            write_x0)
    out, x0 = run_op(backend, "denoise_step", *args)
    ref_out, ref_x0 = reference.denoise_step(*args)
    t_out, t_x0 = _torch_same_dtype(mo, x, coeffs, step, noise, prev, s, clip, 1.5)
    assert out.dtype == dtype
    assert_close_to_ref(out, ref_out, t_out, _tol(atol, rtol, ref_out), what=f"{backend} out")
    if write_x0:
        assert x0.dtype == dtype
        assert_close_to_ref(x0, ref_x0, t_x0, _tol(atol, rtol, ref_x0), what=f"{backend} x0")
    else:
        assert x0.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_step_index_is_read_from_the_tensor(backend, index_dtype):
    """The same call with the index tensor updated in place gives the other row's step, as a
    replayed CUDA graph needs (nothing about the index is cached on the host)."""
    g = torch.Generator().manual_seed(7)
    coeffs = _table(g)
    mo, x, noise, _ = _inputs(g, torch.float32, (2, 3, 4), True, True, False)
    idx = torch.tensor(0, dtype=index_dtype)  # 0-d: any one-element tensor is accepted
    for i in (2, 5, 2):
        idx.fill_(i)
        args = (mo, x, coeffs, idx, noise, None, 3.0, False, 1.0, True)
        out, x0 = run_op(backend, "denoise_step", *args)
        ref_out, ref_x0 = reference.denoise_step(*args)
        t_out, t_x0 = _torch_same_dtype(mo, x, coeffs, i, noise, None, 3.0, False, 1.0)
        atol, rtol = DTYPES[0][1:]
        assert_close_to_ref(out, ref_out, t_out, _tol(atol, rtol, ref_out), what=f"step {i} out")
        assert_close_to_ref(x0, ref_x0, t_x0, _tol(atol, rtol, ref_x0), what=f"step {i} x0")


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_guided_gives_the_inferred_step(backend):
    """guided=True / False, as the engine and the diffusers step pass it, gives the step that
    inferring it from the batch sizes gives."""
    g = torch.Generator().manual_seed(13)
    coeffs = _table(g)
    for guided in (True, False):
        mo, x, noise, _ = _inputs(g, torch.float32, (2, 3, 4), guided, True, False)
        args = (mo, x, coeffs, torch.tensor(1), noise, None, 3.0 if guided else 1.0, False, 1.0,
                True)
        explicit = run_op(backend, "denoise_step", *args, guided)
        for got, want in zip(explicit, run_op(backend, "denoise_step", *args)):
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
    """The device cannot raise without a host sync: every output element is NaN instead, and
    clipping must not turn it back into a number."""
    g = torch.Generator().manual_seed(3)
    mo, x, noise, prev = _inputs(g, torch.float16, (3, 4, 5, 7), True, True, True)
    out, x0 = run_op(backend, "denoise_step", mo, x, _table(g), torch.tensor([index],
                     dtype=index_dtype), noise, prev, 2.0, clip, 1.0, True)
    assert out.isnan().all() and x0.isnan().all()


@pytest.mark.parametrize("index", [-1, NUM_STEPS])
def test_out_of_range_index_raises_on_cpp(index):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=f"'step_index'={index} is out of range"):
        torch.ops.fastdiff.denoise_step(x, x, _table(torch.Generator().manual_seed(0)),
                                        torch.tensor(index))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_nan_in_model_output_propagates(backend, clip):
    """As in torch.clamp, a NaN stays NaN through the clip (a GPU min/max would drop it)."""
    g = torch.Generator().manual_seed(5)
    mo, x, _, _ = _inputs(g, torch.float32, (2, 3, 4), True, False, False)
    mo[3, 1, 2] = float("nan")  # cond half, sample element (1, 1, 2)
    args = (mo, x, _table(g), torch.tensor(1), None, None, 2.0, clip, 1.0, True)
    out, x0 = run_op(backend, "denoise_step", *args)
    ref_out, ref_x0 = reference.denoise_step(*args)
    assert torch.equal(out.isnan(), ref_out.isnan()) and out[1, 1, 2].isnan()
    assert torch.equal(x0.isnan(), ref_x0.isnan()) and x0[1, 1, 2].isnan()


def test_compiled_step_matches_eager():
    """torch.compile(fullgraph=True) traces the op through its Meta kernel (the fake kernel)."""
    def two_steps(mo, x, coeffs, noise):
        for i in (0, 3):
            x, x0 = torch.ops.fastdiff.denoise_step(mo, x, coeffs, torch.tensor(i), noise, None,
                                                    3.0, True, 1.0, True)
        return x, x0

    g = torch.Generator().manual_seed(11)
    coeffs = _table(g) * 0.1
    mo, x, noise, _ = _inputs(g, torch.float32, (2, 3, 8), True, True, False)
    torch._dynamo.reset()
    compiled = torch.compile(two_steps, fullgraph=True)
    for got, want in zip(compiled(mo, x, coeffs, noise), two_steps(mo, x, coeffs, noise)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


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
    coeffs = _table(g)
    for dtype, _, _ in DTYPES:
        for guided, has_noise, has_prev, clip, write_x0 in CASES:
            for step, index_dtype in STEPS:
                mo, x, noise, prev = _inputs(g, dtype, (2, 5), guided, has_noise, has_prev)
                launch("denoise_step", mo, x, coeffs, torch.tensor(step, dtype=index_dtype),
                       noise, prev, 2.0 if guided else 1.0, clip, 1.0, write_x0)
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
big = kernel._config(torch.float16, True, True, True)
big = {**big, "signature": {**big["signature"], "numel": "i64"}, "aligned": ()}
print(json.dumps({"big": len(compile_config(big, arch).asm["cubin"])}))
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_every_config_compiles_ahead_of_time(arch):
    """Every listed configuration's aligned variant (the case the JIT sees for whole images)
    builds a cubin for sm_80/sm_90 on this GPU-less machine, with 16-byte vector loads and
    stores and NaN-propagating min/max; the 64-bit numel variant (over 2**31 elements,
    unaligned) builds too. tests/test_prebuild.py compiles the pointers-only variants."""
    configs = kernel.prebuilt_configs()
    aligned = [c for c in configs if "numel" in c["aligned"]]
    assert len(aligned) == 3 * 2 * 2**3  # dtypes x index dtypes x (guided, noise, prev_x0)
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
