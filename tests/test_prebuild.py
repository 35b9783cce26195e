"""Every launch configuration of every Triton kernel compiles ahead of time for sm_90, and those
of the tensor-core kernels for sm_80 too.

triton.compile with a GPUTarget needs no GPU, so this catches kernels that only fail on real
hardware (unsupported ops, shared memory over the limit) on a CPU-only machine. The compiles
run in fresh interpreters (the test session may run Triton interpreted), one per architecture,
side by side, with a summary of each cubin's machine code (SASS, ``prebuild --sass``), which the
tests hold to what the kernels are written for: 16-byte global loads of the big tensors,
tensor-core instructions for 16-bit attention, no register spills. sm_80 is held to the
kernels whose machine code differs in kind there (HMMA instead of HGMMA, 99 KB of shared memory
instead of 227): attention and the GEMMs. The norms' and element-wise kernels' sm_80 cubins
(~80 s more of compiling on CI's two cores, in a suite that must stay well under 15 minutes) are
compiled by `make wheel` and `make prebuilt`, which fail on any configuration that does not.
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fastdiff.kernels import (add_layer_norm, attention, denoise_step, geglu,
                              group_norm_scale_shift, group_norm_silu, layer_norm_linear,
                              linear_geglu, norm_conv2d, prebuild)

# Shared memory per block (bytes) a kernel may use. The sm_80 compile is held to sm_86/sm_89's
# 99 KB (A100 allows 163 KB), since the wheel's sm_86/89 cubins are the same code and use the
# same shared memory (kernels built for 8.x must run on every 8.x GPU); sm_90 (H100): 227 KB.
SMEM_LIMIT = {80: 101376, 90: 232448}
MODULES = {"group_norm_silu": group_norm_silu, "attention": attention,
           "denoise_step": denoise_step, "geglu": geglu, "add_layer_norm": add_layer_norm,
           "linear_geglu": linear_geglu, "layer_norm_linear": layer_norm_linear,
           "group_norm_scale_shift": group_norm_scale_shift, "norm_conv2d": norm_conv2d}
# What the suite compiles per architecture (the module docstring says why sm_80 has fewer).
TENSOR_CORE_OPS = ("attention", "linear_geglu", "layer_norm_linear", "norm_conv2d")
ARCH_OPS = {80: TENSOR_CORE_OPS, 90: tuple(sorted(MODULES))}


def _archs(op):
    """The architectures the suite compiles ``op`` for."""
    return [arch for arch, ops in ARCH_OPS.items() if op in ops]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {arch: subprocess.Popen([sys.executable, "-m", "fastdiff.kernels.prebuild", "--arch",
                                     str(arch), "--sass", *(f"--op={op}" for op in ops)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=env)
             for arch, ops in ARCH_OPS.items()}
    records = []
    for arch, p in procs.items():
        out, err = p.communicate(timeout=600)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert lines, f"sm_{arch}: the prebuild printed nothing; stderr:\n{err[-3000:]}"
        records += lines
    return records


@pytest.mark.parametrize("op,arch", [(op, arch) for op in sorted(MODULES) for arch in _archs(op)])
def test_every_config_compiles(compiled, op, arch):
    recs = [r for r in compiled if r["op"] == op and r["arch"] == arch]
    assert len(recs) == len(MODULES[op].prebuilt_configs())
    for r in recs:
        label = f"{op} sm_{arch} {r['kernel']} {r['constexprs']} {r['signature']}"
        assert r["ok"], f"{label}: {r.get('error')}"
        assert r["cubin_bytes"] > 0, f"{label}: empty cubin"
        assert r["shared"] <= SMEM_LIMIT[arch], f"{label}: {r['shared']} B shared memory"


def _key(cfg):
    return (cfg["fn"].__name__, repr(sorted(cfg["signature"].items())),
            repr(sorted(cfg["constexprs"].items())), cfg["num_warps"], cfg["num_stages"])


def test_launchers_choose_only_listed_configs():
    """Every configuration the launchers' config functions can return for a prebuilt call is in
    prebuilt_configs() (attention at other head dims, or without 16-byte rows, runs on the JIT)."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    listed = {_key(c) for m in MODULES.values() for c in m.prebuilt_configs()}
    for dt in dtypes:
        for d in range(1, 257):
            for bias in (None, dt, torch.float32):
                key = _key(attention._config(dt, d, bias))
                assert (key in listed) == (d in attention.PREBUILT_HEAD_DIMS), (dt, d, bias)
        for k in range(denoise_step.SLOTS + 1):  # state slots (guided, noise: runtime flags)
            for index_dtype in (torch.int64, torch.int32):
                assert _key(denoise_step._config(dt, k, index_dtype)) in listed, (dt, k)
        for flags in range(32):
            f = [bool(flags >> i & 1) for i in range(5)]  # cl, pre, scale/shift, silu, aligned
            for cfg in group_norm_silu._configs(dt, *f):
                assert _key(cfg) in listed, (dt, f)
        # channels_last_out with an NCHW x: the plain norm with 16-byte rows (SD1.5's transformer
        # norms); the C++ plan sends the others to the JIT (tests/test_prebuilt.py)
        for cfg in group_norm_silu._configs(dt, False, False, False, False, True, True):
            assert _key(cfg) in listed, dt
        # the same with r = x + residual_bias (group_norm_silu_residual), SD1.5's transformer norm
        for cfg in group_norm_silu._configs(dt, False, False, False, False, True, True, True):
            assert _key(cfg) in listed, dt
        for aligned in (True, False):
            assert _key(geglu._config(dt, aligned)) in listed, (dt, aligned)
        assert _key(linear_geglu._config(dt)) in listed, dt
        for geglu_ in (False, True):
            for shift in (False, True):
                key = _key(layer_norm_linear._config(dt, geglu_, shift))
                assert key in listed, (dt, geglu_, shift)
        if dt != torch.float32:  # norm_conv2d: diffusers' flag combinations, 16-bit only
            for row in norm_conv2d.PREBUILT_FLAGS:
                flags = dict(zip(norm_conv2d.FLAGS, row))
                assert _key(norm_conv2d._config(dt, flags)) in listed, (dt, row)
        for c in range(129, 4097):  # 16-byte rows up to the largest prebuilt block
            block = add_layer_norm.block_c(c)
            assert _key(add_layer_norm._config(dt, block)) in listed, (dt, c)


_BYTES = {"*fp32": 4, "*fp16": 2, "*bf16": 2}


def _label(r):
    return f"{r['op']} sm_{r['arch']} {r['key']}"


def _wide(s):
    """16-byte global loads: LDG.128, and LDGSTS.128 (cp.async into shared memory)."""
    return s["ldg"].get("128", 0) + s["ldgsts"].get("128", 0)


def _vectors(r, elements):
    """16-byte accesses per thread for a tile of ``elements`` of the kernel's data dtype."""
    sig = r["signature"]
    data = sig.get("x_ptr") or sig.get("q_ptr")
    return elements * _BYTES[data] // 16 // (32 * r["num_warps"])


def test_attention_reads_q_k_v_in_16_byte_loads_on_tensor_cores(compiled):
    """Q, K and V in 16-byte loads (LDG.128 or LDGSTS.128: every prebuilt configuration assumes
    16-byte rows), at least one per 16 bytes of a Q tile, a K tile and a V tile; narrower loads
    only for the bias, which may broadcast or stride; HMMA (sm_80) or HGMMA (sm_90) for 16-bit
    inputs."""
    recs = [r for r in compiled if r["op"] == "attention"]
    assert len(recs) == len(_archs("attention")) * len(attention.prebuilt_configs())
    for r in recs:
        cx, s = r["constexprs"], r["sass"]
        need = _vectors(r, (cx["BLOCK_M"] + 2 * cx["BLOCK_N"]) * cx["BLOCK_D"])
        assert _wide(s) >= need, f"{_label(r)}: {s['ldg']} {s['ldgsts']}, {need} needed"
        narrow = {b for kind in ("ldg", "ldgsts") for b in s[kind] if b != "128"}
        bias = {str(8 * _BYTES[r["signature"]["bias_ptr"]])} if cx["HAS_BIAS"] else set()
        assert narrow <= bias, f"{_label(r)}: {s['ldg']} {s['ldgsts']}"
        if r["signature"]["q_ptr"] != "*fp32":
            mma = s["hmma"] if r["arch"] < 90 else s["hgmma"] + s["hmma"]
            assert mma > 0, f"{_label(r)}: no tensor-core instruction"


def test_group_norm_and_denoise_step_move_data_in_16_byte_accesses(compiled):
    """Where rows are 16-byte aligned (group_norm_silu's VEC > 1; denoise_step's numel % 16 ==
    0 variant), x is read, and y written, in 16-byte accesses: one per 16 bytes of a tile.
    group_norm_silu with an NCHW x and a channels_last y (Y_CL) reads x so, and stores y one
    element per instruction (a row's pixels are C elements apart in y); with RES
    (group_norm_silu_residual) it also stores r, in x's layout, in 16-byte stores.
    denoise_step reads the model output's two halves, the sample, the noise (guidance and noise
    are runtime flags: the loads are there, masked off when unused) and its NUM_SLOTS state
    slots, and writes out, x0 and the slots."""
    checked = 0
    for r in compiled:
        cx, s = r["constexprs"], r["sass"]
        names = [p["name"] for p in r["params"]]
        if r["op"] == "group_norm_silu" and cx["VEC"] > 1:
            n = _vectors(r, cx["ROWS"] * cx["COLS"])
            assert s["ldg"].get("128", 0) >= n, f"{_label(r)}: {s['ldg']}"
            if r["kernel"] == "group_norm_silu_apply" and cx["Y_CL"]:
                bits = 8 * _BYTES[r["signature"]["y_ptr"]]
                elements = cx["ROWS"] * cx["COLS"] // (32 * r["num_warps"])
                want = {str(bits): elements, **({"128": n} if cx["RES"] else {})}
                assert s["stg"] == want, f"{_label(r)}: {s['stg']}"
            elif r["kernel"] == "group_norm_silu_apply":
                assert s["stg"] == {"128": n}, f"{_label(r)}: {s['stg']}"
        elif r["op"] == "denoise_step" and "numel" in [names[i] for i in r["aligned"]]:
            inputs = 4 + cx["NUM_SLOTS"]
            n = _vectors(r, cx["BLOCK"])
            assert s["ldg"].get("128", 0) >= inputs * n, f"{_label(r)}: {s['ldg']}"
            outputs = 2 + cx["NUM_SLOTS"]  # out, x0, the slots
            assert s["stg"] == {"128": outputs * n}, f"{_label(r)}: {s['stg']}"
        else:
            continue
        checked += 1
    gn_aligned = sum(c["constexprs"]["VEC"] > 1 for c in group_norm_silu.prebuilt_configs())
    half = gn_aligned + len(denoise_step.prebuilt_configs()) // 2
    assert _archs("group_norm_silu") == _archs("denoise_step")
    assert checked == len(_archs("denoise_step")) * half


def test_geglu_moves_data_in_16_byte_accesses(compiled):
    """Where F is a multiple of 16 bytes' worth of elements (VEC > 1), both halves of x are read
    and y written in 16-byte accesses: one per 16 bytes of a block, per half; erf is inlined
    (no call into a library that could spill)."""
    checked = 0
    for r in compiled:
        if r["op"] != "geglu" or r["constexprs"]["VEC"] == 1:
            continue
        s = r["sass"]
        n = _vectors(r, r["constexprs"]["BLOCK"])
        assert s["ldg"] == {"128": 2 * n}, f"{_label(r)}: {s['ldg']}"
        assert s["stg"] == {"128": n}, f"{_label(r)}: {s['stg']}"
        checked += 1
    assert checked == len(_archs("geglu")) * len(geglu.prebuilt_configs()) // 2


def test_add_layer_norm_moves_data_in_16_byte_accesses(compiled):
    """Every prebuilt configuration has 16-byte rows: x, residual, weight, bias and next_bias
    read, h and y written, in 16-byte accesses, one per 16 bytes of a row."""
    recs = [r for r in compiled if r["op"] == "add_layer_norm"]
    assert len(recs) == len(_archs("add_layer_norm")) * len(add_layer_norm.prebuilt_configs())
    for r in recs:
        s = r["sass"]
        n = _vectors(r, r["constexprs"]["BLOCK_C"])
        assert s["ldg"] == {"128": 5 * n}, f"{_label(r)}: {s['ldg']}"
        assert s["stg"] == {"128": 2 * n}, f"{_label(r)}: {s['stg']}"


def test_linear_geglu_runs_on_tensor_cores(compiled):
    """16-bit inputs: both products on tensor cores (HMMA on sm_80, HGMMA on sm_90); where K and
    F are multiples of 16 (the variant SD's widths select), x's and W's tiles reach shared memory
    in 16-byte async copies (LDGSTS.128, at least one per 16 bytes of the x tile and the two W
    tiles of a K step) and y is written in 16-byte stores. fp32 runs IEEE dots (FFMA: TF32
    would break the op's fp32 promise). Spills: test_no_register_spills."""
    recs = [r for r in compiled if r["op"] == "linear_geglu"]
    assert len(recs) == len(_archs("linear_geglu")) * len(linear_geglu.prebuilt_configs())
    for r in recs:
        cx, s = r["constexprs"], r["sass"]
        if r["signature"]["x_ptr"] == "*fp32":
            assert s["hmma"] == s["hgmma"] == 0, f"{_label(r)}: TF32 tensor-core instructions"
            continue
        mma = s["hmma"] if r["arch"] < 90 else s["hgmma"]
        assert mma > 0, f"{_label(r)}: no tensor-core instruction"
        names = [p["name"] for p in r["params"]]
        if {"F", "K"} <= {names[i] for i in r["aligned"]}:
            need = _vectors(r, (cx["BLOCK_M"] + 2 * cx["BLOCK_N"]) * cx["BLOCK_K"])
            assert s["ldgsts"].get("128", 0) >= need, f"{_label(r)}: {s['ldgsts']}, {need}"
            assert set(s["stg"]) == {"128"}, f"{_label(r)}: {s['stg']}"


def test_layer_norm_linear_runs_on_tensor_cores(compiled):
    """linear_geglu's GEMM with the LayerNorm's row sums in its K loop: 16-bit inputs on tensor
    cores (HMMA on sm_80, HGMMA on sm_90; fp32 in IEEE FFMA, no TF32), x's and W's tiles into
    shared memory in 16-byte async copies (LDGSTS.128, at least one per 16 bytes of the x tile
    and the one or two W tiles of a K step: the row sums read x's tile from shared memory, no
    second global read of it), y in 16-byte stores. Spills: test_no_register_spills."""
    recs = [r for r in compiled if r["op"] == "layer_norm_linear"]
    assert len(recs) == len(_archs("layer_norm_linear")) * len(layer_norm_linear.prebuilt_configs())
    for r in recs:
        cx, s = r["constexprs"], r["sass"]
        if r["signature"]["x_ptr"] == "*fp32":
            assert s["hmma"] == s["hgmma"] == 0, f"{_label(r)}: TF32 tensor-core instructions"
        else:
            mma = s["hmma"] if r["arch"] < 90 else s["hgmma"]
            assert mma > 0, f"{_label(r)}: no tensor-core instruction"
        w_tiles = 2 if cx["GEGLU"] else 1
        need = _vectors(r, (cx["BLOCK_M"] + w_tiles * cx["BLOCK_N"]) * cx["BLOCK_K"])
        assert s["ldgsts"].get("128", 0) >= need, f"{_label(r)}: {s['ldgsts']}, {need}"
        assert set(s["ldgsts"]) == {"128"}, f"{_label(r)}: {s['ldgsts']}"
        assert set(s["stg"]) == {"128"}, f"{_label(r)}: {s['stg']}"


def test_group_norm_scale_shift_reads_in_16_byte_loads(compiled):
    """With VEC > 1 the group is read in 16-byte loads (LDG.128), 8 elements a thread per tile
    of each walk (fp32: two per tile, 16-bit: one); without, none claims 16 bytes. Its only
    stores are the (N, C) float32 outputs. Spills: test_no_register_spills."""
    recs = [r for r in compiled if r["op"] == "group_norm_scale_shift"]
    assert len(recs) == (len(_archs("group_norm_scale_shift"))
                         * len(group_norm_scale_shift.prebuilt_configs()))
    for r in recs:
        cx, s = r["constexprs"], r["sass"]
        per_walk = 2 if r["signature"]["x_ptr"] == "*fp32" else 1
        if cx["VEC"] > 1:
            assert s["ldg"].get("128", 0) >= 2 * per_walk, f"{_label(r)}: {s['ldg']}"
        else:
            assert "128" not in s["ldg"], f"{_label(r)}: {s['ldg']}"
        assert set(s["stg"]) == {"32"}, f"{_label(r)}: {s['stg']}"


def test_norm_conv2d_runs_on_tensor_cores(compiled):
    """The implicit GEMM: tensor cores (HMMA on sm_80, HGMMA on sm_90), the packed weight's
    tiles into shared memory by async copies (LDGSTS): 16 bytes wide in the normalized segments
    (K, C1, C2 multiples of 16), 8 bytes in the raw ones (the shortcut's, proj_out's: as
    compiled with Triton 3.6). The input tile is gathered through its runtime strides (any
    layout, one cubin) and goes through registers: 2-byte loads, recorded here rather than
    hidden. Spills: test_no_register_spills."""
    recs = [r for r in compiled if r["op"] == "norm_conv2d"]
    assert len(recs) == len(_archs("norm_conv2d")) * len(norm_conv2d.prebuilt_configs())
    for r in recs:
        cx, s = r["constexprs"], r["sass"]
        mma = s["hmma"] if r["arch"] < 90 else s["hgmma"]
        assert mma > 0, f"{_label(r)}: no tensor-core instruction"
        assert sum(s["ldgsts"].values()) > 0, f"{_label(r)}: {s['ldgsts']}"
        if cx["PROLOGUE"]:
            assert s["ldgsts"].get("128", 0) > 0, f"{_label(r)}: {s['ldgsts']}"


def _allowed_stack(r):
    """Bytes of local memory (spills) a configuration may use: 0 for all but those named."""
    cx = r["constexprs"]
    if (r["op"] == "attention" and r["arch"] == 80 and r["signature"]["q_ptr"] == "*fp32"
            and cx["HAS_BIAS"] and cx["D"] in (40, 48)):
        # ptxas keeps 128 registers and parks 3 values live across the key loop in 16 bytes,
        # stored once before the loop and loaded once after it: no local traffic inside it.
        return 16
    return 0


def test_no_register_spills(compiled):
    for r in compiled:
        s, allowed = r["sass"], _allowed_stack(r)
        if allowed:
            assert s["stack"] <= allowed, f"{_label(r)}: {s['stack']} B of stack"
        else:
            assert s["stack"] == 0 and s["stl"] == 0 and s["ldl"] == 0, \
                f"{_label(r)}: {s['stack']} B of stack, {s['stl']} STL, {s['ldl']} LDL"


def test_records_carry_the_compiled_num_warps(monkeypatch):
    """The launcher's block size (index.tsv's num_warps) is what the cubin was compiled for,
    read from its metadata, not the configuration's request."""
    md = SimpleNamespace(num_warps=8, shared=0, name="k", num_ctas=1, global_scratch_size=0,
                         profile_scratch_size=0)
    fake = SimpleNamespace(asm={"ptx": ".entry k(.param .u64 a)", "cubin": b"\0"}, metadata=md)
    monkeypatch.setattr(prebuild, "compile_config", lambda cfg, arch: fake)
    rec = prebuild._compile_one("denoise_step", 0, 80, False)
    assert rec["ok"], rec.get("error")
    assert rec["num_warps"] == 8 != denoise_step.prebuilt_configs()[0]["num_warps"]


def test_launch_params_match_the_ptx_entry(compiled):
    """The parameter list a launcher packs (prebuild.launch_params: non-constexpr arguments, then the
    two scratch pointers) has the count and byte widths of the kernel's PTX .entry."""
    for r in compiled:
        sizes = [p["bytes"] for p in r["params"]]
        assert sizes == r["ptx_param_bytes"], \
            f"{r['op']} sm_{r['arch']} {r['constexprs']}: packs {sizes}, PTX {r['ptx_param_bytes']}"
        assert r["global_scratch_size"] == 0 and r["num_ctas"] == 1


def test_emit_writes_cubins_and_a_manifest(tmp_path):
    from fastdiff.info import info_lines

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "cubins"
    r = subprocess.run([sys.executable, "-m", "fastdiff.kernels.prebuild", "--arch", "90", "--op",
                        "denoise_step", "--emit", str(out)], capture_output=True, text=True,
                       env=env, timeout=600)  # sm_90: in Triton's cache after the fixture
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["archs"] == [90]
    assert len(manifest["kernels"]) == len(denoise_step.prebuilt_configs())
    for k in manifest["kernels"]:
        assert (out / k["file"]).stat().st_size == k["cubin_bytes"]
    index = [line.split("\t") for line in (out / "index.tsv").read_text().splitlines()]
    assert [int(cells[7]) for cells in index] == [k["num_warps"] for k in manifest["kernels"]]
    text = "\n".join(info_lines(str(out)))
    assert f"{len(manifest['kernels'])} prebuilt kernels" in text and "sm_90" in text


_SPECIALIZED_ONE = """
import json
from fastdiff.kernels import prebuild, {ops}
failed = []
for name in {ops!r}.split(", "):
    # every integer argument 1 at once: one compile per kernel (an `n.to(tl.int64)` on any of
    # them fails whatever the others are, and the error names the line)
    cfg = globals()[name].prebuilt_configs()[0]
    ints = [arg for arg, kind in cfg["signature"].items() if kind in ("i32", "i64")]
    one = dict(cfg, signature=dict(cfg["signature"], **{{a: "constexpr" for a in ints}}),
               constexprs=dict(cfg["constexprs"], **{{a: 1 for a in ints}}),
               aligned=tuple(a for a in cfg.get("aligned", ()) if a not in ints))
    try:
        prebuild.compile_config(one, 90)
    except Exception as err:  # noqa: BLE001 - reported
        failed.append([name, ints, str(err).strip().splitlines()[-1][:200]])
# The JIT-only backward (no prebuilt configs): its plan's configs, signatures from the arguments.
import torch
from fastdiff.kernels import group_norm_silu_backward as bwd
TL = {{torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}}
x = torch.randn(2, 64, 4, 4, dtype=torch.float16)
w = torch.randn(64, dtype=torch.float16)
for cfg, _, args in bwd.plan(torch.randn_like(x), x, 32, w, w, 1e-5, None, None, None, True)[0]:
    sig = {{n: ("*" + TL[a.dtype]) if torch.is_tensor(a) else ("fp32" if isinstance(a, float)
            else "i32") for n, a in zip(cfg["fn"].arg_names, args)}}
    ints = [n for n, k in sig.items() if k == "i32"]
    one = dict(cfg, signature=dict(sig, **{{a: "constexpr" for a in ints}}),
               constexprs=dict(cfg["constexprs"], **{{a: 1 for a in ints}}))
    try:
        prebuild.compile_config(one, 90)
    except Exception as err:  # noqa: BLE001 - reported
        failed.append([cfg["fn"].__name__, ints, str(err).strip().splitlines()[-1][:200]])
print(json.dumps(failed))
"""


def test_kernels_compile_with_an_integer_argument_of_one():
    """Triton's JIT turns an integer argument equal to 1 into a constant (a Python int in the
    kernel), so `n.to(tl.int64)` on it fails to compile: the H200 found it for denoise_step at
    numel == 1 (one-element samples), which the interpreter never specializes. Every kernel, every
    integer argument, compiled for sm_90 as the JIT would specialize it, all of a kernel's at
    once (the JIT-only group_norm_silu_backward too, from its plan's configurations)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = _SPECIALIZED_ONE.format(ops=", ".join(MODULES))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
