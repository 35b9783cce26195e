"""The prebuilt-kernel path (csrc/prebuilt.cpp, the C++ plans, fastdiff/prebuilt.py).

CI has no GPU, so the parts a launch depends on are checked on CPU tensors:
- the C++ plan of every op call (kernel key, grid, arguments in order) equals the Triton
  launcher's plan (kernels/*.py) for awkward shapes, dtypes, layouts and optional inputs;
- a plan launches exactly its kernels: no conversion, fill or copy of the inputs on the side;
- the arguments C++ packs have the count and byte widths of the PTX entry Triton generated for
  the cubin the launch selects (cubins emitted for sm_90 here);
- selection: architectures, alignment variants, 32-bit limits, mismatched parameter lists.
On a GPU the ops run with the prebuilt path required and are compared with the JIT path.
"""
import functools
import json
import os
import re
import struct
import subprocess
import sys

import pytest
import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

from fastdiff import ops, prebuilt, reference, schedules
from fastdiff.kernels import (add_layer_norm, attention, denoise_step, geglu,
                              group_norm_scale_shift, group_norm_silu, group_norm_silu_residual,
                              layer_norm_linear, linear_geglu, norm_conv2d, prebuild)

# The quick CPU subset tests/test_wheel.py runs in a fresh install of the wheel.
pytestmark = pytest.mark.quick

HAS_CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- plans: C++ vs the Triton launchers ----

def _f32_bits(v):
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _normalize(launches, inputs):
    """[(key, grid, [(name, role or value)])] with pointers named by what they point to: an
    input's name, or the first (launch, parameter) that carried a new buffer."""
    ptr_names = {t.data_ptr(): n for n, t in inputs.items() if isinstance(t, torch.Tensor)}
    out = []
    for li, (key, grid, args) in enumerate(launches):
        norm = []
        for name, kind, value in args:
            if kind == "ptr":
                value = ptr_names.setdefault(value, f"new:{li}:{name}")
            norm.append((name, kind, value))
        out.append((key, tuple(grid), norm))
    return out


def _py_plan(module, *args):
    launches, _ = module.plan(*args)
    res = []
    for cfg, grid, values in launches:
        params = prebuild.launch_params(cfg["signature"], cfg["constexprs"])
        names = [p["name"] for p in params[:-2]]
        assert len(names) == len(values), cfg["fn"].__name__
        packed = []
        for (name, value) in zip(names, values):
            ty = cfg["signature"][name]
            if ty.startswith("*"):
                packed.append((name, "ptr", value.data_ptr()))
            elif ty == "fp32":
                packed.append((name, "fp32", _f32_bits(float(value))))
            else:
                packed.append((name, "int", int(value)))
        res.append((prebuild.kernel_key(cfg), grid, packed))
    return res


def _cpp_plan_of(op):
    """The C++ plan function of op ``op`` (fastdiff.prebuilt.cpp_plan)."""
    return functools.partial(prebuilt.cpp_plan, op)


def _cpp_plan(fn, *args):
    launches = fn(*args)[0]
    res = []
    for launch in launches:
        packed = []
        for name, kind, bits in launch["args"]:
            if kind in ("i32", "i64"):
                packed.append((name, "int", bits - (1 << 64) if bits >= 1 << 63 else bits))
            else:
                packed.append((name, kind, bits))
        res.append((launch["key"], launch["grid"], packed))
    return res


def _compare(module, cpp_fn, inputs, args):
    py = _normalize(_py_plan(module, *args), inputs)
    cpp = _normalize(_cpp_plan(cpp_fn, *args), inputs)
    assert cpp == py


def _gn_case(dtype, shape, groups, cl=False, weight=True, w_dtype=None, pre=False, ss=None,
             silu=True, seed=0, cl_out=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    n, c = shape[:2]
    w_dtype = w_dtype or dtype
    inputs = {"x": x}
    if weight:
        inputs["weight"] = torch.randn(c, generator=g).to(w_dtype)
        inputs["bias"] = torch.randn(c, generator=g).to(w_dtype)
    if pre:
        inputs["pre_bias"] = torch.randn(n, c, generator=g)
    if ss in ("scale", "both"):
        inputs["scale"] = torch.randn(n, c, generator=g).to(dtype)
    if ss in ("shift", "both"):
        inputs["shift"] = torch.randn(n, c, generator=g)
    args = (x, groups, inputs.get("weight"), inputs.get("bias"), 1e-6, inputs.get("pre_bias"),
            inputs.get("scale"), inputs.get("shift"), silu, cl_out)
    return inputs, args


GN_CASES = [
    dict(dtype=torch.float32, shape=(2, 8, 4, 4), groups=4),
    dict(dtype=torch.float16, shape=(1, 6, 3, 5), groups=3, cl=True, pre=True),
    dict(dtype=torch.bfloat16, shape=(3, 64, 7, 9), groups=32, weight=False, ss="both"),
    dict(dtype=torch.float32, shape=(2, 320, 8, 8), groups=32, pre=True, ss="scale",
         w_dtype=torch.float32),
    dict(dtype=torch.float16, shape=(2, 32, 40, 40), groups=8, cl=True, ss="shift", silu=False,
         w_dtype=torch.float32),
    dict(dtype=torch.float32, shape=(1, 4, 1, 1), groups=1),
    # channels_last_out with an NCHW x: SD1.5's transformer norm (a cubin), a fused call (none)
    dict(dtype=torch.float16, shape=(2, 320, 8, 8), groups=32, silu=False, cl_out=True),
    dict(dtype=torch.bfloat16, shape=(1, 12, 5, 7), groups=4, ss="both", cl_out=True),
]


@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: f"{c['shape']}")
def test_group_norm_silu_plan_matches_the_launcher(case):
    inputs, args = _gn_case(**case)
    _compare(group_norm_silu, _cpp_plan_of("group_norm_silu"), inputs, args)


def _gnr_case(dtype, shape, groups, cl=False, weight=True, silu=False, cl_out=True, seed=0):
    """group_norm_silu_residual's arguments (residual_bias in x's dtype)."""
    inputs, args = _gn_case(dtype, shape, groups, cl=cl, weight=weight, silu=silu, seed=seed,
                            cl_out=cl_out)
    inputs["residual_bias"] = torch.randn(shape[1], generator=torch.Generator().manual_seed(
        seed + 1)).to(dtype)
    return inputs, (*args[:5], inputs["residual_bias"], silu, cl_out)


GNR_CASES = [
    # SD1.5's transformer norm (a cubin), then calls that take the JIT
    dict(dtype=torch.float16, shape=(2, 320, 8, 8), groups=32),
    dict(dtype=torch.float32, shape=(1, 64, 4, 4), groups=32, weight=False),
    dict(dtype=torch.bfloat16, shape=(2, 12, 5, 7), groups=4),
    dict(dtype=torch.float16, shape=(2, 320, 8, 8), groups=32, silu=True),
    dict(dtype=torch.float32, shape=(1, 16, 3, 3), groups=8, cl=True, cl_out=False),
    dict(dtype=torch.float16, shape=(2, 32, 4, 4), groups=8, cl_out=False),
]


@pytest.mark.parametrize("case", GNR_CASES, ids=lambda c: f"{c['shape']}")
def test_group_norm_silu_residual_plan_matches_the_launcher(case):
    inputs, args = _gnr_case(**case)
    _compare(group_norm_silu_residual, _cpp_plan_of("group_norm_silu_residual"), inputs, args)


def test_group_norm_silu_residual_plans_say_why_no_cubin():
    whys = [_cpp_plan_of("group_norm_silu_residual")(*_gnr_case(**case)[1])[3]
            for case in GNR_CASES]
    no = ("no cubin for group_norm_silu_residual but an NCHW x with channels_last_out, no SiLU "
          "and H*W a multiple of 16 bytes")
    assert whys == ["", "", no, no, no, no]


def _attn_case(dtype, B, H, Lq, Lk, D, bias=None, scale=None, layout="bhld", seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "blhd":  # diffusers' (B, L, H*D) projections viewed as (B, H, L, D)
        q = torch.randn(B, Lq, H, D, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(B, Lk, H, D, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(B, Lk, H, D, generator=g).to(dtype).transpose(1, 2)
    elif layout == "padded":  # rows D + 1 elements apart: no 16-byte row starts
        q = torch.randn(B, H, Lq, D + 1, generator=g).to(dtype)[..., :D]
        k = torch.randn(B, H, Lk, D + 1, generator=g).to(dtype)[..., :D]
        v = torch.randn(B, H, Lk, D + 1, generator=g).to(dtype)[..., :D]
    else:
        q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
        k = torch.randn(B, H, Lk, D, generator=g).to(dtype)
        v = torch.randn(B, H, Lk, D, generator=g).to(dtype)
    inputs = {"q": q, "k": k, "v": v}
    if bias == "keys":
        inputs["bias"] = torch.randn(B, 1, 1, Lk, generator=g)
    elif bias == "full":
        inputs["bias"] = torch.randn(B, H, Lq, Lk, generator=g).to(dtype)
    elif bias == "keys_same":  # a key-padding mask in q's dtype, as ops.attention makes them
        inputs["bias"] = torch.randn(B, 1, 1, Lk, generator=g).to(dtype)
    return inputs, (q, k, v, inputs.get("bias"), scale)


ATTN_CASES = [
    dict(dtype=torch.float16, B=2, H=8, Lq=64, Lk=77, D=40, layout="blhd", bias="keys"),
    dict(dtype=torch.bfloat16, B=1, H=2, Lq=130, Lk=130, D=64, layout="blhd"),
    dict(dtype=torch.float32, B=2, H=3, Lq=7, Lk=5, D=1),
    dict(dtype=torch.float32, B=1, H=1, Lq=33, Lk=17, D=160, bias="full", scale=0.3),
    dict(dtype=torch.float16, B=3, H=5, Lq=9, Lk=300, D=100),
    dict(dtype=torch.bfloat16, B=1, H=2, Lq=5, Lk=6, D=256, bias="full"),
    dict(dtype=torch.float32, B=1, H=4, Lq=16, Lk=16, D=80, layout="blhd"),
    dict(dtype=torch.float16, B=1, H=2, Lq=9, Lk=9, D=64, layout="padded", bias="keys_same"),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"{c['dtype']}-D{c['D']}")
def test_attention_plan_matches_the_launcher(case):
    inputs, args = _attn_case(**case)
    _compare(attention, _cpp_plan_of("attention"), inputs, args)


def _step_case(dtype, shape, guided=False, noise=False, slots=0, index_dtype=torch.int64,
               clip=False, write_x0=False, guidance=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(*shape, generator=g).to(dtype)
    mo = torch.randn(shape[0] * (2 if guided else 1), *shape[1:], generator=g).to(dtype)
    coeffs = torch.randn(7, schedules.ROW_LEN, generator=g)
    coeffs[:, schedules.absent_slot_columns(slots)] = 0
    inputs = {"model_output": mo, "sample": sample, "coeffs": coeffs,
              "step_index": torch.tensor(3, dtype=index_dtype)}
    if noise:
        inputs["noise"] = torch.randn(*shape, generator=g).to(dtype)
    if slots:
        inputs["state"] = torch.randn(slots, *shape, generator=g).to(dtype)
    args = (mo, sample, coeffs, inputs["step_index"], inputs.get("noise"), inputs.get("state"),
            guidance, clip, 1.5, write_x0)
    return inputs, args


STEP_CASES = [
    dict(dtype=torch.float32, shape=(2, 4, 8, 8)),
    dict(dtype=torch.float16, shape=(1, 4, 64, 64), guided=True, noise=True, guidance=7.5,
         write_x0=True, slots=1),
    dict(dtype=torch.bfloat16, shape=(3, 5, 7), slots=3, index_dtype=torch.int32, clip=True),
    dict(dtype=torch.float32, shape=(2, 3, 33, 1), guided=True, noise=True, slots=4,
         guidance=2.0, clip=True, write_x0=True),
    dict(dtype=torch.float16, shape=(1,), slots=2, write_x0=True),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c['dtype']}-{c['shape']}")
def test_denoise_step_plan_matches_the_launcher(case):
    inputs, args = _step_case(**case)
    _compare(denoise_step, _cpp_plan_of("denoise_step"), inputs, args)


def _geglu_case(dtype, shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return {"x": x}, (x,)


GEGLU_CASES = [
    dict(dtype=torch.float16, shape=(2, 64, 2 * 1280)),   # SD1.5: 16-byte rows (VEC 8)
    dict(dtype=torch.float32, shape=(3, 2 * 1030)),       # two blocks a row, VEC 4 (not 16)
    dict(dtype=torch.bfloat16, shape=(5, 2 * 13)),        # odd F: VEC 1
    dict(dtype=torch.float16, shape=(2,)),                # F = 1, one row
]


@pytest.mark.parametrize("case", GEGLU_CASES, ids=lambda c: f"{c['dtype']}-{c['shape']}")
def test_geglu_plan_matches_the_launcher(case):
    inputs, args = _geglu_case(**case)
    _compare(geglu, _cpp_plan_of("geglu"), inputs, args)


def _lg_case(dtype, batch, K, F, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(*batch, K, generator=g).to(dtype),
              "weight": torch.randn(2 * F, K, generator=g).to(dtype)}
    if bias:
        inputs["bias"] = torch.randn(2 * F, generator=g).to(dtype)
    return inputs, (inputs["x"], inputs["weight"], inputs.get("bias"))


LG_CASES = [
    dict(dtype=torch.float16, batch=(2, 64), K=320, F=1280),  # SD1.5's first FeedForward
    dict(dtype=torch.bfloat16, batch=(3,), K=7, F=5, bias=False),  # odd K and F, no bias
    dict(dtype=torch.float32, batch=(1,), K=33, F=70),       # fp32 blocks, a ragged K tail
]


@pytest.mark.parametrize("case", LG_CASES, ids=lambda c: f"{c['dtype']}-{c['K']}-{c['F']}")
def test_linear_geglu_plan_matches_the_launcher(case):
    inputs, args = _lg_case(**case)
    _compare(linear_geglu, _cpp_plan_of("linear_geglu"), inputs, args)


def _lnl_case(dtype, batch, K, N, shift=True, geglu=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(*batch, K, generator=g).to(dtype),
              "weight": torch.randn(N, K, generator=g).to(dtype),
              "fold": torch.randn(3, N, generator=g)}
    if shift:
        inputs["shift"] = torch.randn(K, generator=g)
    return inputs, (inputs["x"], inputs["weight"], inputs["fold"], inputs.get("shift"), 1e-5,
                    geglu)


LNL_CASES = [
    dict(dtype=torch.float16, batch=(2, 64), K=320, N=960),              # SD1.5's norm1 -> qkv
    dict(dtype=torch.bfloat16, batch=(3,), K=640, N=5120, geglu=True, shift=False),  # norm3
    dict(dtype=torch.float32, batch=(1,), K=33, N=70),       # fp32 blocks; no cubin (K, N odd)
]


@pytest.mark.parametrize("case", LNL_CASES, ids=lambda c: f"{c['dtype']}-{c['K']}-{c['N']}")
def test_layer_norm_linear_plan_matches_the_launcher(case):
    inputs, args = _lnl_case(**case)
    _compare(layer_norm_linear, _cpp_plan_of("layer_norm_linear"), inputs, args)


def _gnss_case(dtype, shape, C2, groups, cl=False, cl2=None, w_dtype=None, affine=True,
               seed=0):
    """group_norm_scale_shift's call: x (N, C1, *spatial), x2 (N, C2, *spatial) or None."""
    g = torch.Generator().manual_seed(seed)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}

    def make(c, as_cl):
        t = torch.randn(shape[0], c, *shape[2:], generator=g).to(dtype)
        return t.contiguous(memory_format=fmt[t.dim()]) if as_cl else t
    inputs = {"x": make(shape[1], cl)}
    if C2:
        inputs["x2"] = make(C2, cl if cl2 is None else cl2)
    C = shape[1] + C2
    if affine:
        inputs["weight"] = torch.randn(C, generator=g).to(w_dtype or dtype)
        inputs["bias"] = torch.randn(C, generator=g)
    return inputs, (inputs["x"], groups, inputs.get("weight"), inputs.get("bias"), 1e-5,
                    inputs.get("x2"))


GNSS_CASES = [
    dict(dtype=torch.float16, shape=(2, 320, 8, 8), C2=640, groups=32),   # SD's cat, straddling
    dict(dtype=torch.bfloat16, shape=(2, 320, 8, 8), C2=0, groups=40, cl=True),  # C/G = 8
    dict(dtype=torch.float32, shape=(1, 6, 3, 5), C2=9, groups=5, affine=False),  # VEC = 1
    dict(dtype=torch.float32, shape=(1, 6, 2, 3, 4), C2=2, groups=4, cl=True, cl2=False),  # JIT
]


@pytest.mark.parametrize("case", GNSS_CASES, ids=lambda c: f"{c['dtype']}-{c['shape']}")
def test_group_norm_scale_shift_plan_matches_the_launcher(case):
    inputs, args = _gnss_case(**case)
    _compare(group_norm_scale_shift, _cpp_plan_of("group_norm_scale_shift"), inputs, args)


def test_group_norm_scale_shift_plans_say_why_no_cubin():
    """Cubins for x and x2 in one layout; a pair in different layouts runs on the JIT."""
    whys = [_cpp_plan_of("group_norm_scale_shift")(*_gnss_case(**case)[1])[3]
            for case in GNSS_CASES]
    assert whys == ["", "", "", "no cubin for x and x2 in different layouts"]


def test_layer_norm_linear_plans_say_why_no_cubin():
    """The cubins assume K and N multiples of 16 (SD's widths); other calls run on the JIT."""
    whys = [_cpp_plan_of("layer_norm_linear")(*_lnl_case(**case)[1])[3] for case in LNL_CASES]
    assert whys == ["", "", "no cubin for K or N not a multiple of 16"]
    for K, N in ((16, 24), (24, 16)):
        why = _cpp_plan_of("layer_norm_linear")(*_lnl_case(torch.float16, (2,), K, N)[1])[3]
        assert why == "no cubin for K or N not a multiple of 16", (K, N)


def _aln_case(dtype, shape, affine=True, next_bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    r = torch.randn(*shape, generator=g).to(dtype)
    inputs = {"x": x, "residual": r}
    if affine:
        inputs["weight"] = torch.randn(shape[-1], generator=g).to(dtype)
        inputs["bias"] = torch.randn(shape[-1], generator=g).to(dtype)
    if next_bias:
        inputs["next_bias"] = torch.randn(shape[-1], generator=g).to(dtype)
    return inputs, (x, r, inputs.get("weight"), inputs.get("bias"), 1e-5,
                    inputs.get("next_bias"))


ALN_CASES = [
    dict(dtype=torch.float16, shape=(2, 64, 320)),        # SD1.5: BLOCK_C 512, prebuilt
    dict(dtype=torch.bfloat16, shape=(3, 1280), affine=False, next_bias=True),  # h + bias only
    dict(dtype=torch.float32, shape=(5, 4096)),           # the largest prebuilt block
    dict(dtype=torch.float32, shape=(2, 7), next_bias=True),  # rows not 16 bytes: JIT only
    dict(dtype=torch.float16, shape=(1, 5000)),           # beyond the prebuilt blocks: JIT
]


@pytest.mark.parametrize("case", ALN_CASES, ids=lambda c: f"{c['dtype']}-{c['shape']}")
def test_add_layer_norm_plan_matches_the_launcher(case):
    inputs, args = _aln_case(**case)
    _compare(add_layer_norm, _cpp_plan_of("add_layer_norm"), inputs, args)


def test_add_layer_norm_plans_say_why_no_cubin():
    whys = [_cpp_plan_of("add_layer_norm")(*_aln_case(**case)[1])[3] for case in ALN_CASES]
    assert whys == ["", "", "", "no cubin for rows that are not multiples of 16 bytes",
                    "no cubin for rows of 5000 elements"]


def test_every_cpp_key_is_a_listed_configuration():
    """Keys C++ can build for each op and flag combination name a configuration prebuild.py
    builds, and every listed configuration is reachable; attention at a head dim without cubins
    says so (the op then runs the JIT)."""
    listed = {prebuild.kernel_key(c) for m in prebuild.MODULES.values()
              for c in m.prebuilt_configs()}
    seen = set()
    for dt in DTYPES:
        for flags in range(64):
            cl, pre, ss, silu, odd, cl_out = (bool(flags >> i & 1) for i in range(6))
            # odd: rows not 16 bytes apart (H*W = 15 in NCHW, C/G = 3 in channels_last)
            shape, groups = ((1, 6, 3, 5), 2) if odd else ((1, 16, 4, 4), 2)
            _, args = _gn_case(dt, shape, groups, cl=cl, pre=pre, ss="both" if ss else None,
                               silu=silu, cl_out=cl_out)
            launches, _, _, why = _cpp_plan_of("group_norm_silu")(*args)
            # channels_last_out with an NCHW x: cubins for the plain, 16-byte-row norm only
            mixed_jit = cl_out and not cl and (pre or ss or silu or odd)
            assert (why != "") == mixed_jit, (dt, flags, why)
            seen |= {la["key"] for la in launches} if not why else set()
        for flags in range(16):  # group_norm_silu_residual: cubins for SD1.5's norm only
            cl, silu, odd, cl_out = (bool(flags >> i & 1) for i in range(4))
            shape, groups = ((1, 6, 3, 5), 2) if odd else ((1, 16, 4, 4), 2)
            _, args = _gnr_case(dt, shape, groups, cl=cl, silu=silu, cl_out=cl_out)
            launches, _, _, why = _cpp_plan_of("group_norm_silu_residual")(*args)
            assert (why == "") == (cl_out and not cl and not silu and not odd), (dt, flags, why)
            seen |= {la["key"] for la in launches} if not why else set()
        for d in range(1, 257):
            for bias in (None, "keys", "keys_same"):
                _, args = _attn_case(dt, 1, 1, 3, 3, d, bias=bias)
                launches, _, _, why = _cpp_plan_of("attention")(*args)
                if d in attention.PREBUILT_HEAD_DIMS:
                    assert why == "", (dt, d, bias)
                    seen |= {la["key"] for la in launches}
                else:
                    assert why == f"no cubin for head dim {d}", (dt, d, bias)
        for flags in range(4):
            guided, noise = (bool(flags >> i & 1) for i in range(2))
            for k in range(schedules.SLOTS + 1):
                for it in (torch.int64, torch.int32):
                    _, args = _step_case(dt, (2, 3), guided, noise, k, it)
                    seen |= {la["key"] for la in _cpp_plan_of("denoise_step")(*args)[0]}
        for F in (8, 5):  # rows of 16 bytes (all dtypes) or not
            _, args = _geglu_case(dt, (2, 2 * F))
            seen |= {la["key"] for la in _cpp_plan_of("geglu")(*args)[0]}
        for bias in (True, False):  # one key per dtype (bias: a runtime flag)
            _, args = _lg_case(dt, (3,), 16, 8, bias)
            seen |= {la["key"] for la in _cpp_plan_of("linear_geglu")(*args)[0]}
        for C in range(8, 4097, 8):  # every C with 16-byte rows in every dtype
            _, args = _aln_case(dt, (1, C), affine=C % 16 == 0, next_bias=C % 24 == 0)
            launches, _, _, why = _cpp_plan_of("add_layer_norm")(*args)
            assert (why == "") == (C > 128), (dt, C, why)
            seen |= {la["key"] for la in launches} if not why else set()
        for flags in range(4):  # layer_norm_linear: GEGLU, HAS_SHIFT (K, N multiples of 16)
            geglu_, shift = (bool(flags >> i & 1) for i in range(2))
            _, args = _lnl_case(dt, (3,), 32, 48, shift, geglu_)
            launches, _, _, why = _cpp_plan_of("layer_norm_linear")(*args)
            assert why == "", (dt, flags, why)
            seen |= {la["key"] for la in launches}
        for cl in (False, True):  # group_norm_scale_shift: layout, 16-byte rows or not
            for groups in (2, 4):  # C/G = 16 or 8: both multiples of 16 bytes in every dtype
                for spatial in ((4, 4), (3, 5)):  # planar rows of 16 bytes or not
                    _, args = _gnss_case(dt, (1, 16, *spatial), 16, groups, cl=cl)
                    launches, _, _, why = _cpp_plan_of("group_norm_scale_shift")(*args)
                    assert why == "", (dt, cl, groups, spatial, why)
                    seen |= {la["key"] for la in launches}
            _, args = _gnss_case(dt, (1, 6, 4, 4), 6, 4, cl=cl)  # C/G = 3: channels-last VEC 1
            seen |= {la["key"] for la in _cpp_plan_of("group_norm_scale_shift")(*args)[0]}
        for row in norm_conv2d.PREBUILT_FLAGS:  # (tests/test_norm_conv2d.py: the plans agree)
            f = dict(zip(norm_conv2d.FLAGS, row))
            x = torch.zeros(1, 16, 2, 2, dtype=dt)
            k, C = f["KS"], 16 * (1 + f["HAS_X2"])
            S = 16 * (f["HAS_SC"] + f["HAS_SC2"])
            t = torch.zeros(1, 16)
            args = (x, torch.zeros(16, k * k * C + S, dtype=dt), k, t[0] if f["HAS_BIAS"] else None,
                    x if f["HAS_X2"] else None, torch.zeros(1, C) if f["PROLOGUE"] else None,
                    torch.zeros(1, C) if f["PROLOGUE"] else None, bool(f["SILU"]),
                    t if f["HAS_TEMB"] else None, x if f["HAS_RES"] else None,
                    x if f["HAS_SC"] else None, x if f["HAS_SC2"] else None)
            launches, _, _, why = _cpp_plan_of("norm_conv2d")(*args)
            assert why == ("" if dt != torch.float32 else
                           "no cubin for float32 (fp16 and bf16 only)"), (dt, row, why)
            seen |= {la["key"] for la in launches} if not why else set()
    assert seen <= listed, sorted(seen - listed)[:5]
    assert len(seen) == len(listed)  # and every listed configuration is reachable


def test_group_norm_silu_plans_say_why_no_cubin():
    whys = [_cpp_plan_of("group_norm_silu")(*_gn_case(**case)[1])[3] for case in GN_CASES]
    assert whys == [""] * 7 + [
        "no cubin for channels_last_out with an NCHW x and SiLU, pre_bias, scale/shift or H*W "
        "not a multiple of 16 bytes"]


def test_attention_plans_say_why_no_cubin():
    whys = [_cpp_plan_of("attention")(*_attn_case(**case)[1])[3] for case in ATTN_CASES]
    assert whys == ["", "", "no cubin for head dim 1", "", "no cubin for head dim 100", "", "",
                    "no cubin for q/k/v strides that are not multiples of 16 bytes"]


class _Work(TorchDispatchMode):
    """Records every aten op that does work: not an allocation, a view or a metadata query."""
    FREE = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
            torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default}

    def __init__(self):
        super().__init__()
        self.ran = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastdiff":
            # The C++ plan is an op itself (fastdiff::_prebuilt_plan_<op>): run its CPU kernel
            # with this mode still on, so that what the plan runs inside is what is recorded.
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args,
                                       **(kwargs or {}))
        if func not in self.FREE and not func.is_view:
            self.ran.append(str(func))
        return func(*args, **(kwargs or {}))


LAUNCHES = {"group_norm_silu": 2, "group_norm_silu_residual": 2, "attention": 1,
            "denoise_step": 1, "geglu": 1, "add_layer_norm": 1, "linear_geglu": 1,
            "layer_norm_linear": 1, "group_norm_scale_shift": 1}


def _all_cases():
    for case in GN_CASES:
        yield ("group_norm_silu", group_norm_silu, _cpp_plan_of("group_norm_silu"),
               _gn_case(**case))
    for case in GNR_CASES:
        yield ("group_norm_silu_residual", group_norm_silu_residual,
               _cpp_plan_of("group_norm_silu_residual"), _gnr_case(**case))
    for case in ATTN_CASES:
        yield "attention", attention, _cpp_plan_of("attention"), _attn_case(**case)
    for case in STEP_CASES:
        yield "denoise_step", denoise_step, _cpp_plan_of("denoise_step"), _step_case(**case)
    for case in GEGLU_CASES:
        yield "geglu", geglu, _cpp_plan_of("geglu"), _geglu_case(**case)
    for case in ALN_CASES:
        yield ("add_layer_norm", add_layer_norm, _cpp_plan_of("add_layer_norm"),
               _aln_case(**case))
    for case in LG_CASES:
        yield "linear_geglu", linear_geglu, _cpp_plan_of("linear_geglu"), _lg_case(**case)
    for case in LNL_CASES:
        yield ("layer_norm_linear", layer_norm_linear, _cpp_plan_of("layer_norm_linear"),
               _lnl_case(**case))
    for case in GNSS_CASES:
        yield ("group_norm_scale_shift", group_norm_scale_shift,
               _cpp_plan_of("group_norm_scale_shift"), _gnss_case(**case))


def test_plans_launch_their_kernels_and_nothing_else():
    """No conversion, fill, expand-copy or contiguous-copy of an input runs beside the launches:
    small tensors, biases and masks are read in their own dtype and layout by the kernels."""
    for op, module, cpp, (_, args) in _all_cases():
        for name, plan in (("python", lambda: module.plan(*args)[0]),
                           ("c++", lambda: cpp(*args)[0])):
            with _Work() as work:
                launches = plan()
            assert work.ran == [], f"{op} {name} plan ran {work.ran}"
            assert len(launches) == LAUNCHES[op], f"{op} {name}"


def test_attention_grid_takes_70000_heads():
    """B * H = 70,000 is beyond grid axis 1's 65,535: the programs go on axis 0 (2**31 - 1),
    in both plans alike."""
    B, H, Lq, Lk, D = 700, 100, 3, 2, 8
    q = torch.zeros(1, 1, 1, D, dtype=torch.float16).expand(B, H, Lq, D)
    kv = torch.zeros(1, 1, 1, D, dtype=torch.float16).expand(B, H, Lk, D)
    args = (q, kv, kv, None, None)
    _compare(attention, _cpp_plan_of("attention"), {"q": q, "kv": kv}, args)
    (cfg, grid, _), = attention.plan(*args)[0]
    assert grid == (B * H * triton.cdiv(Lq, cfg["constexprs"]["BLOCK_M"]), 1, 1)
    x, y, z = _cpp_plan_of("attention")(*args)[0][0]["grid"]
    assert x <= 2**31 - 1 and y <= 65535 and z <= 65535


# ---- selection, against cubins Triton compiled for sm_90 ----

@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    """All kernels emitted for sm_90 (Triton's cache makes this quick after test_prebuild, which
    `make test` runs first, in the same worker: tests/conftest.py) and registered; the registry
    is emptied again afterwards."""
    out = tmp_path_factory.mktemp("cubins")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "fastdiff.kernels.prebuild", "--arch", "90",
                        "--emit", str(out), "--jobs", str(min(os.cpu_count() or 1, 4))],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    n = prebuilt.load(str(out))
    assert n == prebuilt.count() > 0
    manifest = json.loads((out / "manifest.json").read_text())
    yield {k["file"]: k for k in manifest["kernels"]}
    prebuilt.load_if_cuda()


def _plans():
    """(op, launches) of every case above that has prebuilt kernels (not attention's JIT-only
    head dims and strides: test_attention_plans_say_why_no_cubin)."""
    for op, _, cpp, (_, args) in _all_cases():
        launches, _, _, why = cpp(*args)
        if not why:
            yield op, launches


_WIDTH = {"ptr": 8, "i64": 8, "i32": 4, "fp32": 4}


def test_packed_arguments_match_the_ptx_of_the_selected_cubin(sm90):
    for op, launches in _plans():
        for la in launches:
            path, why = prebuilt.select(la, 90)
            assert path, f"{op}: {la['key']}: {why}"
            entry = sm90[os.path.basename(path)]
            widths = [_WIDTH[kind] for _, kind, _ in la["args"]] + [8, 8]
            assert widths == entry["ptx_param_bytes"], (op, la["key"])
            assert [n for n, _, _ in la["args"]] == [p["name"] for p in entry["params"]][:-2]


def test_selection_prefers_the_aligned_variant_and_falls_back(sm90):
    # numel 4*64*64 (a multiple of 16) -> the variant assuming it; 3*5*7 -> pointers only.
    aligned = _cpp_plan_of("denoise_step")(*_step_case(torch.float16, (1, 4, 64, 64))[1])[0][0]
    odd = _cpp_plan_of("denoise_step")(*_step_case(torch.float16, (3, 5, 7))[1])[0][0]
    a, o = (sm90[os.path.basename(prebuilt.select(la, 90)[0])] for la in (aligned, odd))
    names = [p["name"] for p in a["params"]]
    assert "numel" in [names[i] for i in a["aligned"]]
    assert "numel" not in [names[i] for i in o["aligned"]] and o["aligned"]
    # A tensor one element into its storage is not 16-byte aligned: no cubin (the JIT runs).
    base = torch.randn(1 + 2 * 4 * 8 * 8)
    sample = base[1:].view(2, 4, 8, 8)
    _, args = _step_case(torch.float32, (2, 4, 8, 8))
    la = _cpp_plan_of("denoise_step")(args[0], sample, *args[2:])[0][0]
    path, why = prebuilt.select(la, 90)
    assert not path and "'x_ptr' is not 16-byte aligned" in why


def test_linear_geglu_selection_by_k_and_f(sm90):
    """K and F multiples of 16 (SD's widths) select the cubin that assumes them (16-byte tile
    loads); K = 7 or F = 5 the one assuming only aligned pointers."""
    for (K, F), want in (((320, 1280), {"F", "K"}), ((7, 5), set()), ((16, 5), set())):
        la = _cpp_plan_of("linear_geglu")(*_lg_case(torch.float16, (3,), K, F)[1])[0][0]
        path, why = prebuilt.select(la, 90)
        assert path, why
        entry = sm90[os.path.basename(path)]
        names = [p["name"] for p in entry["params"]]
        assert {names[i] for i in entry["aligned"]} - {"x_ptr", "w_ptr", "b_ptr", "y_ptr"} == want


def test_selection_takes_any_element_of_an_index_table(sm90):
    # The diffusers wrapper passes idx[i] of a device arange: 8 bytes into the table for odd i.
    # The H200's first run (2026-11-30) refused the prebuilt kernel for it under 'require'.
    inputs, args = _step_case(torch.float16, (1, 4, 64, 64))
    for index in (torch.arange(7)[1], torch.arange(7, dtype=torch.int32)[3]):
        la = _cpp_plan_of("denoise_step")(*args[:3], index, *args[4:])[0][0]
        path, why = prebuilt.select(la, 90)
        assert path, why
        names = [p["name"] for p in sm90[os.path.basename(path)]["params"]]
        assert "numel" in [names[i] for i in sm90[os.path.basename(path)]["aligned"]]


def test_selection_by_architecture(sm90):
    la = _cpp_plan_of("denoise_step")(*_step_case(torch.float32, (2, 4, 8, 8))[1])[0][0]
    assert prebuilt.select(la, 90)[0].endswith("-sm90.cubin")
    for arch in (75, 80, 86, 89, 100):
        path, why = prebuilt.select(la, arch)
        assert not path and f"not prebuilt for sm_{arch}" in why


def test_selection_takes_70000_heads(sm90):
    q = torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16).expand(700, 100, 3, 8)
    la = _cpp_plan_of("attention")(q, q, q, None, None)[0][0]
    path, why = prebuilt.select(la, 90)
    assert path, why


def test_selection_rejects_what_the_cubin_cannot_take(sm90):
    la = _cpp_plan_of("denoise_step")(*_step_case(torch.float32, (2, 4, 8, 8))[1])[0][0]
    big = dict(la, args=[(n, k, 2**31 if n == "numel" else b) for n, k, b in la["args"]])
    assert "'numel'=2147483648 needs 64 bits" in prebuilt.select(big, 90)[1]
    renamed = dict(la, args=[("sample" if n == "x_ptr" else n, k, b) for n, k, b in la["args"]])
    assert "is 'x_ptr'" in prebuilt.select(renamed, 90)[1]
    short = dict(la, args=la["args"][:-1])
    assert "takes 18 parameters, the launch packs 15" in prebuilt.select(short, 90)[1]
    wide = dict(la, grid=(1, 70000, 1))
    assert "exceeds CUDA's limits" in prebuilt.select(wide, 90)[1]
    assert "is not prebuilt" in prebuilt.select(dict(la, key="nope()[]"), 90)[1]


def test_mode_and_info():
    assert prebuilt.mode() in ("off", "on", "require")
    before = ops.set_prebuilt("off")
    try:
        assert prebuilt.mode() == "off" and ops.set_prebuilt("require") == "off"
        assert prebuilt.mode() == "require"
    finally:
        ops.set_prebuilt(before)
    with pytest.raises(ValueError, match="argument 'mode' must be one of"):
        ops.set_prebuilt("fast")


@pytest.mark.parametrize("env,mode", [({"FASTDIFF_AOT": "require"}, "require"),
                                      ({"FASTDIFF_PREBUILT": "0", "FASTDIFF_AOT": "1"}, "off")])
def test_mode_from_the_environment(env, mode):
    """FASTDIFF_PREBUILT sets the initial mode; FASTDIFF_AOT, its older name, still works."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FASTDIFF_")}
    code = "import fastdiff; print(fastdiff.prebuilt.mode())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**clean, **env}, timeout=300)
    assert r.stdout.strip() == mode, r.stderr[-2000:]


def test_index_is_read_lazily_and_checked(tmp_path):
    line = "\t".join(["k(*fp32,i32)[B=1]", "80", "k.cubin", "k", "x_ptr,n", "8,4,8,8", "0",
                       "4", "0", "0", "0"])
    (tmp_path / "index.tsv").write_text(line + "\n" + line.replace("\t80\t", "\t90\t") + "\n")
    try:
        assert prebuilt.use_directory(str(tmp_path), lazy=True) == -1
        assert prebuilt.count() == 2  # read at the first use
        la = {"key": "k(*fp32,i32)[B=1]", "grid": (1, 1, 1),
              "args": [("x_ptr", "ptr", 4096), ("n", "i32", 7)]}
        assert prebuilt.select(la, 90)[0] == str(tmp_path / "k.cubin")
        (tmp_path / "index.tsv").write_text("k()[]\t80\tk.cubin\n")
        with pytest.raises(RuntimeError, match="index.tsv line 1 has 3 fields, expected 11"):
            prebuilt.use_directory(str(tmp_path))
    finally:
        prebuilt.load_if_cuda()


def test_registration_rejects_bad_metadata():
    with pytest.raises(ValueError, match="aligned parameter index 5 out of range"):
        prebuilt.register("k()[]", 80, "/nonexistent", "k", ["a"], [8, 8, 8], [5], 4, 0, 0, 0)


# ---- on a GPU: the prebuilt path, required, against references and the JIT ----

@pytest.fixture(scope="module")
def gpu_cubins(tmp_path_factory):
    """Prebuilt kernels for this GPU: the installed ones, else compiled here for its arch."""
    major, minor = torch.cuda.get_device_capability()
    arch = major * 10 + minor
    m = prebuilt.manifest()
    if m is None or not any(a <= arch and a // 10 == major for a in m["archs"]):
        out = tmp_path_factory.mktemp("gpu-cubins")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        r = subprocess.run([sys.executable, "-m", "fastdiff.kernels.prebuild", "--arch",
                            str(arch), "--emit", str(out), "--jobs", str(os.cpu_count() or 1)],
                           capture_output=True, text=True, env=env, timeout=1800)
        assert r.returncode == 0, r.stderr[-3000:]
        prebuilt.load(str(out))
    else:
        prebuilt.load()
    yield
    prebuilt.load_if_cuda()


def _on(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _both_paths(fn):
    """fn() with the prebuilt kernels required, then with the JIT."""
    prev = ops.set_prebuilt("require")
    try:
        a = fn()
        ops.set_prebuilt("off")
        b = fn()
    finally:
        ops.set_prebuilt(prev)
    torch.cuda.synchronize()
    return a, b


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: f"{c['shape']}")
def test_cuda_group_norm_silu_prebuilt(gpu_cubins, case):
    _, args = _gn_case(**case)
    cuda_args = _on(args, "cuda")
    why = _cpp_plan_of("group_norm_silu")(*args)[3]
    if why:  # no cubin (channels_last_out with an NCHW x and a fusion): 'require' refuses it
        with pytest.raises(RuntimeError, match=re.escape(why)):
            _both_paths(lambda: torch.ops.fastdiff.group_norm_silu(*cuda_args))
        prev = ops.set_prebuilt("on")
        try:
            prebuilt_out = torch.ops.fastdiff.group_norm_silu(*cuda_args)
        finally:
            ops.set_prebuilt(prev)
        jit_out = prebuilt_out  # the JIT ran it ('on' falls back)
    else:
        prebuilt_out, jit_out = _both_paths(lambda: torch.ops.fastdiff.group_norm_silu(*cuda_args))
    assert prebuilt_out.stride() == args[0].stride() or args[-1]
    assert prebuilt_out.is_contiguous(memory_format=torch.channels_last) or not args[-1]
    ref = reference.group_norm_silu(*args)
    tol = 1e-4 if args[0].dtype == torch.float32 else 2e-2
    torch.testing.assert_close(prebuilt_out.cpu().double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(prebuilt_out, jit_out)  # the same kernel code, compiled twice


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", GNR_CASES, ids=lambda c: f"{c['shape']}")
def test_cuda_group_norm_silu_residual_prebuilt(gpu_cubins, case):
    """SD1.5's transformer norm on its cubin ('require'), the others on the JIT; y and r equal
    on both paths, r exactly x + residual_bias in x's layout."""
    _, args = _gnr_case(**case)
    cuda_args = _on(args, "cuda")
    op = torch.ops.fastdiff.group_norm_silu_residual
    why = _cpp_plan_of("group_norm_silu_residual")(*args)[3]
    if why:
        with pytest.raises(RuntimeError, match=re.escape(why)):
            _both_paths(lambda: op(*cuda_args))
        prev = ops.set_prebuilt("on")
        try:
            pre = jit = op(*cuda_args)
        finally:
            ops.set_prebuilt(prev)
    else:
        pre, jit = _both_paths(lambda: op(*cuda_args))
    x = args[0]
    y_ref, r_ref = reference.group_norm_silu_residual(*args)
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(pre[0].cpu().double(), y_ref, rtol=tol, atol=tol)
    assert pre[1].stride() == x.stride()
    assert torch.equal(pre[1].cpu(), r_ref)
    for a, b in zip(pre, jit):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"{c['dtype']}-D{c['D']}")
def test_cuda_attention_prebuilt(gpu_cubins, case):
    _, args = _attn_case(**case)
    cuda_args = _on(args, "cuda")
    if case["D"] not in attention.PREBUILT_HEAD_DIMS:  # JIT only, and 'require' says so
        with pytest.raises(RuntimeError, match=f"no cubin for head dim {case['D']}"):
            _both_paths(lambda: torch.ops.fastdiff.attention(*cuda_args))
        return
    prebuilt_out, jit_out = _both_paths(lambda: torch.ops.fastdiff.attention(*cuda_args))
    ref = reference.attention(*args)
    tol = 1e-4 if args[0].dtype == torch.float32 else 2e-2
    torch.testing.assert_close(prebuilt_out.cpu().double(), ref.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(prebuilt_out, jit_out)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c['dtype']}-{c['shape']}")
def test_cuda_denoise_step_prebuilt(gpu_cubins, case):
    _, args = _step_case(**case)
    state = args[5]
    cuda_args = _on(args, "cuda")
    # each run updates its own copy of the state in place
    states = iter([None if state is None else state.to("cuda") for _ in range(2)])
    runs = []

    def run():
        runs.append(next(states))
        return torch.ops.fastdiff.denoise_step(*cuda_args[:5], runs[-1], *cuda_args[6:])

    (a_out, a_x0), (j_out, _) = _both_paths(run)
    c_state = None if state is None else state.clone()
    c_out, c_x0 = torch.ops.fastdiff.denoise_step(*args[:5], c_state, *args[6:])
    tol = 1e-5 if a_out.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a_out.cpu(), c_out, rtol=tol, atol=tol)
    torch.testing.assert_close(a_x0.cpu(), c_x0, rtol=tol, atol=tol)
    torch.testing.assert_close(a_out, j_out)
    if state is not None:
        torch.testing.assert_close(runs[0].cpu(), c_state, rtol=tol, atol=tol)
        torch.testing.assert_close(runs[0], runs[1])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", GEGLU_CASES, ids=lambda c: f"{c['dtype']}-{c['shape']}")
def test_cuda_geglu_prebuilt(gpu_cubins, case):
    _, args = _geglu_case(**case)
    cuda_args = _on(args, "cuda")
    prebuilt_out, jit_out = _both_paths(lambda: torch.ops.fastdiff.geglu(*cuda_args))
    tol = 1e-5 if args[0].dtype == torch.float32 else 2e-2
    torch.testing.assert_close(prebuilt_out.cpu().double(), reference.geglu(*args), rtol=tol,
                               atol=tol)
    torch.testing.assert_close(prebuilt_out, jit_out)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ALN_CASES[:3], ids=lambda c: f"{c['dtype']}-{c['shape']}")
def test_cuda_add_layer_norm_prebuilt(gpu_cubins, case):
    _, args = _aln_case(**case)
    cuda_args = _on(args, "cuda")
    (h, y), (jh, jy) = _both_paths(lambda: torch.ops.fastdiff.add_layer_norm(*cuda_args))
    ref_h, ref_y = reference.add_layer_norm(*args)
    tol = 1e-4 if args[0].dtype == torch.float32 else 2e-2
    torch.testing.assert_close(h.cpu(), ref_h, rtol=0, atol=0)
    torch.testing.assert_close(y.cpu().double(), ref_y, rtol=tol, atol=tol)
    torch.testing.assert_close((h, y), (jh, jy))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", LG_CASES, ids=lambda c: f"{c['dtype']}-{c['K']}-{c['F']}")
def test_cuda_linear_geglu_prebuilt(gpu_cubins, case):
    _, args = _lg_case(**case)
    cuda_args = _on(args, "cuda")
    prebuilt_out, jit_out = _both_paths(lambda: torch.ops.fastdiff.linear_geglu(*cuda_args))
    ref = reference.linear_geglu(*args)
    tol = 1e-3 if args[0].dtype == torch.float32 else 5e-2
    torch.testing.assert_close(prebuilt_out.cpu().double(), ref, rtol=tol,
                               atol=tol * ref.abs().max().item())
    torch.testing.assert_close(prebuilt_out, jit_out)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", LNL_CASES[:2], ids=lambda c: f"{c['dtype']}-{c['K']}-{c['N']}")
def test_cuda_layer_norm_linear_prebuilt(gpu_cubins, case):
    _, args = _lnl_case(**case)
    x, w, fold, shift = args[:4]
    fold = torch.stack([w.double().sum(1), torch.zeros(w.shape[0], dtype=torch.float64)
                        if shift is None else w.double() @ shift.double(), fold[2].double()])
    args = (x, w, fold.float(), shift, *args[4:])
    cuda_args = _on(args, "cuda")
    prebuilt_out, jit_out = _both_paths(lambda: torch.ops.fastdiff.layer_norm_linear(*cuda_args))
    ref = reference.layer_norm_linear(x, None, None, 1e-5, w, fold[2], shift, args[5])
    tol = 1e-3 if x.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(prebuilt_out.cpu().double(), ref, rtol=tol,
                               atol=tol * ref.abs().max().item())
    torch.testing.assert_close(prebuilt_out, jit_out)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", GNSS_CASES[:3], ids=lambda c: f"{c['dtype']}-{c['shape']}")
def test_cuda_group_norm_scale_shift_prebuilt(gpu_cubins, case):
    _, args = _gnss_case(**case)
    cuda_args = _on(args, "cuda")
    prebuilt_out, jit_out = _both_paths(
        lambda: torch.ops.fastdiff.group_norm_scale_shift(*cuda_args))
    for got, want, jit in zip(prebuilt_out, reference.group_norm_scale_shift(*args), jit_out):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5,
                                   atol=1e-5 * want.abs().max().item())
        torch.testing.assert_close(got, jit)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests run the CUDA kernels on CUDA tensors")
def test_cuda_kernel_falls_back_to_the_jit_and_says_why_once(caplog):
    """The ops' CUDA kernel run on CPU tensors, where no prebuilt kernel can run (no driver, or
    none registered): it runs the Triton JIT launcher (interpreted here) with the same
    arguments and logs why once per reason; 'off' takes the JIT without a word; 'require'
    raises instead."""
    calls = [(torch.ops.fastdiff._cuda_kernel_denoise_step, torch.ops.fastdiff.denoise_step,
              _step_case(torch.float32, (2, 3, 5), guided=True, noise=True, guidance=3.0,
                         write_x0=True)[1]),
             (torch.ops.fastdiff._cuda_kernel_group_norm_silu, torch.ops.fastdiff.group_norm_silu,
              _gn_case(torch.float32, (2, 8, 4, 4), 4)[1])]
    ops._logged.clear()
    prev = ops.set_prebuilt("on")
    try:
        with caplog.at_level("INFO", logger="fastdiff"):
            for cuda_kernel, op, args in calls:
                for _ in range(2):
                    torch.testing.assert_close(cuda_kernel(*args), op(*args), rtol=1e-5,
                                               atol=1e-5)
            ops.set_prebuilt("off")
            calls[0][0](*calls[0][2])
        lines = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
        assert [line.split(":")[1] for line in lines] == [" denoise_step", " group_norm_silu"]
        assert all("prebuilt kernels not used (" in line for line in lines), lines
        ops.set_prebuilt("require")
        with pytest.raises(RuntimeError, match="FASTDIFF_PREBUILT=require, but the prebuilt"):
            calls[0][0](*calls[0][2])
    finally:
        ops.set_prebuilt(prev)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_unaligned_input_falls_back_once(gpu_cubins, caplog):
    base = torch.randn(1 + 2 * 4 * 8 * 8, device="cuda")
    sample = base[1:].view(2, 4, 8, 8)
    _, cpu_args = _step_case(torch.float32, (2, 4, 8, 8))
    args = _on(cpu_args, "cuda")
    ops._logged.clear()
    prev = ops.set_prebuilt("on")
    try:
        with caplog.at_level("INFO", logger="fastdiff"):
            for _ in range(3):
                out, _ = torch.ops.fastdiff.denoise_step(args[0], sample, *args[2:])
    finally:
        ops.set_prebuilt(prev)
    lines = [r for r in caplog.records if "prebuilt kernels not used" in r.getMessage()]
    assert len(lines) == 1 and "not 16-byte aligned" in lines[0].getMessage()
    ref, _ = torch.ops.fastdiff.denoise_step(cpu_args[0], sample.cpu(), *cpu_args[2:])
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
    prev = ops.set_prebuilt("require")
    try:
        with pytest.raises(RuntimeError, match="FASTDIFF_PREBUILT=require"):
            torch.ops.fastdiff.denoise_step(args[0], sample, *args[2:])
    finally:
        ops.set_prebuilt(prev)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_prebuilt_launches_are_captured_in_cuda_graphs(gpu_cubins):
    _, args = _step_case(torch.float16, (1, 4, 64, 64), guided=True, noise=True, guidance=7.5)
    args = _on(args, "cuda")
    prev = ops.set_prebuilt("require")
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            torch.ops.fastdiff.denoise_step(*args)  # warm-up: loads the module
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, _ = torch.ops.fastdiff.denoise_step(*args)
        for i in (0, 5):
            args[3].fill_(i)
            graph.replay()
            ref, _ = torch.ops.fastdiff.denoise_step(*args)
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
    finally:
        ops.set_prebuilt(prev)


def test_installed_cubins_cover_every_plan():
    """The package's own cubins (a wheel install; tests/test_wheel.py runs this there): every
    plan above selects one for every architecture built, with the PTX's parameter widths."""
    m = prebuilt.manifest()
    if m is None:
        pytest.skip("no prebuilt kernels in this install (source tree; see tests/test_wheel.py)")
    try:
        assert prebuilt.load() == len(m["kernels"])
        entries = {k["file"]: k for k in m["kernels"]}
        for arch in m["archs"]:
            for op, launches in _plans():
                for la in launches:
                    path, why = prebuilt.select(la, arch)
                    assert path, f"sm_{arch} {op}: {why}"
                    assert os.path.dirname(path) == prebuilt.cubin_dir()
                    widths = [_WIDTH[kind] for _, kind, _ in la["args"]] + [8, 8]
                    assert widths == entries[os.path.basename(path)]["ptx_param_bytes"]
    finally:
        prebuilt.load_if_cuda()


# ---- the registry's ownership of what a launch resolved ----

def _fake_kernel(tmp_path, n):
    """An index of n fake kernels k<i> (no cubin is loaded: selection only) and a launch of k0."""
    lines = ["\t".join([f"k{i}(*fp32,i32)[B=1]", "80", "k.cubin", f"k{i}", "x_ptr,n", "8,4,8,8",
                        "0", "4", "0", "0", "0"]) for i in range(n)]
    (tmp_path / "index.tsv").write_text("\n".join(lines) + "\n")
    return {"key": "k0(*fp32,i32)[B=1]", "grid": (1, 1, 1),
            "args": [("x_ptr", "ptr", 4096), ("n", "i32", 7)]}


def test_a_resolved_entry_survives_a_registry_change(tmp_path):
    """launch() resolves its kernels under the registry's lock and launches them after releasing
    it; a use_directory / clear_registry in between must not free them (they were unique_ptrs
    owned by the registry alone)."""
    la = _fake_kernel(tmp_path, 3)
    try:
        prebuilt.use_directory(str(tmp_path))
        before = prebuilt.live_entries()
        assert before >= 3
        name, why, live, intact = prebuilt.hold_and_read(la, 80, 100, True)
        assert (name, why, intact) == ("k0", "", 100)
        assert live == before - 2          # the registry dropped all three; the held one lives
        assert prebuilt.count() == 0
        assert prebuilt.live_entries() == before - 3   # freed after
    finally:
        prebuilt.load_if_cuda()


def test_an_sm80_cubin_serves_every_8x_gpu(tmp_path):
    """(After the tests over the sm90 fixture's registry: this one replaces it.)"""
    la = _fake_kernel(tmp_path, 1)
    try:
        prebuilt.use_directory(str(tmp_path))
        for arch in (80, 86, 89):
            assert prebuilt.select(la, arch)[0] == str(tmp_path / "k.cubin"), arch
        for arch in (75, 90):
            path, why = prebuilt.select(la, arch)
            assert not path and f"not prebuilt for sm_{arch}" in why
    finally:
        prebuilt.load_if_cuda()


def test_concurrent_registry_changes_and_resolutions(tmp_path):
    """Threads resolving and reading entries (GIL released) while others replace and clear the
    registry: every resolution either finds an intact entry or says the kernel is missing."""
    import threading

    la = _fake_kernel(tmp_path, 50)
    errors, results = [], []
    started = threading.Barrier(4)      # each resolver resolves once before the churn begins
    churned = threading.Event()

    def resolve():
        try:
            results.append(prebuilt.hold_and_read(la, 80, 200, False))
            started.wait()
            for i in range(100_000):
                results.append(prebuilt.hold_and_read(la, 80, 200, False))
                if churned.is_set() and i >= 100:
                    break
        except Exception as err:          # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    def churn():
        try:
            started.wait()
            for i in range(300):
                prebuilt.clear() if i % 3 == 2 else prebuilt.use_directory(str(tmp_path))
        except Exception as err:          # noqa: BLE001
            errors.append(err)
        finally:
            churned.set()

    try:
        prebuilt.use_directory(str(tmp_path))
        threads = [threading.Thread(target=f) for f in (resolve, resolve, churn, churn)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert results[0][0] == "k0" and len(results) >= 200
        for name, why, _, intact in results:
            assert (intact == 200) if name else ("is not prebuilt" in why), (name, why, intact)
    finally:
        prebuilt.load_if_cuda()


def test_registry_ops_refuse_malformed_launch_lines():
    """The registry's ops take a launch as the text line of prebuilt.launch_line (no pybind11
    dicts since the extension left pybind11): a malformed one is a ValueError, never a crash."""
    select = torch.ops.fastdiff._prebuilt_select
    with pytest.raises(ValueError, match="3 tab-separated fields, got 1"):
        select("k()[]", 80)
    with pytest.raises(ValueError, match="grid has 3 dimensions"):
        select("k()[]\t1,1\tx:ptr:0", 80)
    with pytest.raises(ValueError, match="no argument kind 'f16'"):
        select("k()[]\t1,1,1\tx:f16:0", 80)
    with pytest.raises(ValueError, match="name:kind:bits"):
        select("k()[]\t1,1,1\tx:ptr", 80)
    line = prebuilt.launch_line({"key": "k()[]", "grid": (1, 2, 3),
                                 "args": [("x", "ptr", 4096), ("n", "i32", -1)]})
    assert line == f"k()[]\t1,2,3\tx:ptr:4096;n:i32:{2**64 - 1}"
    assert select(line, 80) == ("", "kernel k()[] is not prebuilt")
