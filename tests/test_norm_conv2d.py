"""fastdiff::norm_conv2d on every backend against the float64 reference
(fastdiff.reference.norm_conv2d, on the UNPACKED weight and shortcut weight): every flag
combination, awkward shapes (odd channels, 1x1 and 5x7 images, N = 3), channels_last inputs and
output, fp32/fp16/bf16; also pack_conv_weight, the argument checks, the Meta kernel, opcheck,
gradients against the reference's, the Triton plan and the C++ plan.
"""
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, HAS_CUDA, assert_close_to_ref, assert_rejected, run_op

from fastdiff import ops, prebuilt, reference
from fastdiff.kernels import norm_conv2d as kernel
from fastdiff.kernels import prebuild

DTYPES = [
    # (dtype, atol): on top of twice torch's own error (the prologue rounded to the dtype, the
    # convolution's output and each add rounded), which sets the bound.
    (torch.float32, 1e-4),
    (torch.float16, 2e-3),
    (torch.bfloat16, 2e-2),
]

op = torch.ops.fastdiff.norm_conv2d


def _make(dtype, k=3, N=3, C1=5, C2=0, H=5, W=7, O=7, S1=0, S2=0, norm=False, silu=False,
          bias=False, temb=False, res=False, cl_in=False, cl_out=False, seed=0):
    """(inputs by name, the op's positional schema arguments, the unpacked weights)."""
    g = torch.Generator().manual_seed(seed)

    def img(c, cl=cl_in):
        t = torch.randn(N, c, H, W, generator=g).to(dtype)
        return t.to(memory_format=torch.channels_last) if cl else t
    C = C1 + C2
    t = {"x": img(C1), "x2": img(C2, not cl_in) if C2 else None,
         "weight": (torch.randn(O, C, k, k, generator=g) * (C * k * k) ** -0.5).to(dtype),
         "shortcut": img(S1) if S1 else None, "shortcut2": img(S2, not cl_in) if S2 else None,
         "shortcut_weight": (torch.randn(O, S1 + S2, generator=g) * 0.5).to(dtype)
         if S1 else None,
         "scale": 1 + 0.5 * torch.randn(N, C, generator=g) if norm else None,
         "shift": 0.5 * torch.randn(N, C, generator=g) if norm else None,
         "bias": torch.randn(O, generator=g) if bias else None,
         "temb": torch.randn(N, O, generator=g) if temb else None,
         "residual": img(O) if res else None}
    packed = ops.pack_conv_weight(t["weight"], t["shortcut_weight"])
    args = (t["x"], packed, k, t["bias"], t["x2"], t["scale"], t["shift"], silu, t["temb"],
            t["residual"], t["shortcut"], t["shortcut2"], cl_out)
    return t, args


def _ref(t, silu):
    return reference.norm_conv2d(t["x"], t["weight"], t["bias"], t["x2"], t["scale"], t["shift"],
                                 silu, t["temb"], t["residual"], t["shortcut"], t["shortcut2"],
                                 t["shortcut_weight"])


def _torch(t, silu):
    """The unfused path in x's dtype: cat, the affine (float32) rounded, SiLU, the convolution
    (+ bias) rounded, then each add rounded (convolutions in float32 on the rounded values: CPU
    half convolutions are not everywhere)."""
    dt = t["x"].dtype
    a = t["x"] if t["x2"] is None else torch.cat([t["x"], t["x2"]], 1)
    if t["scale"] is not None:
        a = (a.float() * t["scale"][:, :, None, None] + t["shift"][:, :, None, None]).to(dt)
    if silu:
        a = F.silu(a.float()).to(dt)
    k = t["weight"].shape[-1]
    y = F.conv2d(a.float(), t["weight"].float(), t["bias"], padding=k // 2).to(dt)
    if t["temb"] is not None:
        y = (y.float() + t["temb"][:, :, None, None]).to(dt)
    if t["shortcut"] is not None:
        s = t["shortcut"] if t["shortcut2"] is None else torch.cat([t["shortcut"],
                                                                    t["shortcut2"]], 1)
        sw = t["shortcut_weight"].float()[:, :, None, None]
        y = (y.float() + F.conv2d(s.float(), sw).to(dt).float()).to(dt)
    if t["residual"] is not None:
        y = (y.float() + t["residual"].float()).to(dt)
    return y


# Flag combinations: the prebuilt ones (diffusers' blocks) and the corners between.
COMBOS = {
    "conv1": dict(norm=True, silu=True, bias=True, temb=True),
    "conv1_cat": dict(C2=3, norm=True, silu=True, bias=True, temb=True),
    "conv2_res": dict(norm=True, silu=True, bias=True, res=True),
    "conv2_sc": dict(norm=True, silu=True, bias=True, S1=3),
    "conv2_sc_cat": dict(norm=True, silu=True, bias=True, S1=3, S2=2),
    "proj_in": dict(k=1, norm=True, bias=True, cl_out=True),
    "proj_out": dict(k=1, bias=True, res=True, cl_in=True),
    "conv_out": dict(norm=True, silu=True, bias=True),
    "plain3": dict(),
    "plain1": dict(k=1),
    "silu_only": dict(silu=True, C2=2),
    "norm_only": dict(norm=True, C2=4, O=9),
    "everything": dict(C2=3, norm=True, silu=True, bias=True, temb=True, res=True, S1=3, S2=2,
                       cl_out=True),
    "everything_1x1": dict(k=1, C2=3, norm=True, silu=True, bias=True, temb=True, res=True,
                           S1=1, S2=3, cl_in=True),
    "one_pixel": dict(H=1, W=1, C2=2, norm=True, silu=True, temb=True, S1=3),
    "one_row": dict(H=1, W=6, N=1, norm=True, silu=True, bias=True, cl_in=True, cl_out=True),
    "one_channel": dict(C1=1, O=1, bias=True, res=True),
}
# The interpreter's share (slow: small and few).
TRITON_COMBOS = ["conv1_cat", "conv2_sc_cat", "proj_in", "proj_out", "everything",
                 "everything_1x1", "one_pixel"]


def _skip(backend, dtype, name):
    if backend == "triton":
        if dtype == torch.bfloat16:
            pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (numpy has no "
                        "bf16); bf16 is covered by the C++ kernel here and by 'cuda' on a GPU")
        if name not in TRITON_COMBOS:
            pytest.skip("interpreted: a few combinations only (slow)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("name", list(COMBOS))
def test_matches_reference(backend, dtype, atol, name):
    _skip(backend, dtype, name)
    spec = COMBOS[name]
    t, args = _make(dtype, **spec)
    out = run_op(backend, "norm_conv2d", *args)
    N, _, H, W = t["x"].shape
    assert out.dtype == dtype and out.shape == (N, t["weight"].shape[0], H, W)
    if spec.get("cl_out"):
        assert out.permute(0, 2, 3, 1).is_contiguous()
    else:
        assert out.is_contiguous()
    silu = spec.get("silu", False)
    assert_close_to_ref(out, _ref(t, silu), _torch(t, silu), atol=atol,
                        what=f"{backend} {dtype} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_larger_channels_cross_k_tiles(backend):
    """C1, C2, S over more than one K tile (BLOCK_K 16 / 32) with ragged tails, O over two
    column tiles: fp32 (the interpreter) and fp16."""
    for dtype, atol in DTYPES[:2]:
        t, args = _make(dtype, N=2, C1=37, C2=19, S1=21, S2=5, H=3, W=4, O=70, norm=True,
                        silu=True, bias=True, temb=True, seed=5)
        out = run_op(backend, "norm_conv2d", *args)
        assert_close_to_ref(out, _ref(t, True), _torch(t, True), atol=atol, what=str(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend):
    """Inputs that are neither NCHW- nor channels_last-contiguous (slices of larger tensors):
    read through their strides."""
    t, args = _make(torch.float32, C2=3, S1=2, res=True, bias=True)
    g = torch.Generator().manual_seed(9)
    big = torch.randn(3, 12, 9, 11, generator=g)
    t["x"] = big[:, 2:7, 1:6, 3:10]
    t["x2"] = big[:, 7:10, 2:7, 1:8].transpose(2, 3).contiguous().transpose(2, 3)
    t["residual"] = torch.randn(3, 7, 10, 14, generator=g)[:, :, ::2, ::2]
    args = (t["x"], args[1], 3, t["bias"], t["x2"], None, None, False, None, t["residual"],
            t["shortcut"], None, False)
    out = run_op(backend, "norm_conv2d", *args)
    assert_close_to_ref(out, _ref(t, False), atol=1e-4)


def test_pack_conv_weight_layout():
    w = torch.randn(4, 3, 3, 3)
    sw = torch.randn(4, 5, 1, 1)
    p = ops.pack_conv_weight(w, sw)
    assert p.shape == (4, 27 + 5) and p.is_contiguous() and p.dtype == w.dtype
    for o, c, kh, kw in itertools.product(range(4), range(3), range(3), range(3)):
        assert p[o, (kh * 3 + kw) * 3 + c] == w[o, c, kh, kw]
    assert torch.equal(p[:, 27:], sw.flatten(1))
    assert torch.equal(ops.pack_conv_weight(w, sw.flatten(1)), p)
    assert ops.pack_conv_weight(w[:, :, 1:2, 1:2]).shape == (4, 3)
    with pytest.raises(ValueError, match="'shortcut_weight' must have shape"):
        ops.pack_conv_weight(w, torch.randn(3, 5))
    with pytest.raises(ValueError, match="'weight' must be a"):
        ops.pack_conv_weight(torch.randn(4, 3, 3))


def test_entry_point_converts_bias_and_temb_and_takes_4d_tables():
    """bias and temb in x's dtype (as a module holds them) are converted to float32; scale,
    shift and temb may be (N, C, 1, 1)."""
    t, args = _make(torch.float16, norm=True, silu=True, bias=True, temb=True)
    want = op(*args)
    out = ops.norm_conv2d(t["x"], args[1], 3, t["bias"],
                          scale=t["scale"][:, :, None, None], shift=t["shift"][:, :, None, None],
                          silu=True, temb=t["temb"][:, :, None, None])
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    b16, t16 = t["bias"].half(), t["temb"].half()
    ref = op(t["x"], args[1], 3, b16.float(), None, t["scale"], t["shift"], True, t16.float())
    out = ops.norm_conv2d(t["x"], args[1], 3, b16, scale=t["scale"], shift=t["shift"],
                          silu=True, temb=t16)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_entry_point_rejects_non_tensors():
    t, args = _make(torch.float32)
    with pytest.raises(TypeError, match="argument 'x' must be a torch.Tensor"):
        ops.norm_conv2d([1.0], args[1], 3)
    with pytest.raises(TypeError, match="argument 'temb' must be a torch.Tensor"):
        ops.norm_conv2d(t["x"], args[1], 3, temb=[1.0])
    with pytest.raises(TypeError, match="argument 'kernel_size' must be an int"):
        ops.norm_conv2d(t["x"], args[1], 3.0)
    with pytest.raises(TypeError, match="argument 'silu' must be a bool"):
        ops.norm_conv2d(t["x"], args[1], 3, silu=1)


def _bad(**over):
    """conv2 with everything, then the overrides (by schema name)."""
    t, args = _make(torch.float32, C2=2, S1=3, S2=2, norm=True, silu=True, bias=True, temb=True,
                    res=True)
    names = ("x", "packed", "kernel_size", "bias", "x2", "scale", "shift", "silu", "temb",
             "residual", "shortcut", "shortcut2", "channels_last_out")
    a = dict(zip(names, args))
    a.update(over)
    return tuple(a[n] for n in names)


_X = torch.randn(3, 5, 5, 7)
BAD = [
    (dict(x=torch.randn(3, 5, 5)), "argument 'x' must be 4-D"),
    (dict(x=_X.double()), "argument 'x' must have dtype float32, float16 or bfloat16"),
    (dict(x=torch.randn(3, 0, 5, 7)), "argument 'x' must have at least one channel"),
    (dict(kernel_size=5), "argument 'kernel_size' must be 1 or 3"),
    (dict(kernel_size=1), r"argument 'packed' must have shape \(O, K\)"),
    (dict(x2=torch.randn(3, 2, 5, 6)), r"argument 'x2' must have shape \(N, C2, H, W\)"),
    (dict(x2=torch.randn(3, 2, 5, 7).half()), "argument 'x2' must have x's dtype"),
    (dict(x2=torch.randn(3, 2, 5, 7, device="meta")), "argument 'x2'.*device"),
    (dict(x2=None), r"argument 'packed' must have shape \(O, K\)"),
    (dict(packed=torch.randn(7, 68).half()), "argument 'packed' must have x's dtype"),
    (dict(packed=torch.randn(68, 7).t()), "argument 'packed' must be contiguous"),
    (dict(bias=torch.randn(6)), r"argument 'bias' must have shape \(O,\)"),
    (dict(bias=torch.randn(7).half()), "argument 'bias' must have dtype float32"),
    (dict(scale=None), "arguments 'scale' and 'shift' go together.*'shift'"),
    (dict(shift=None), "arguments 'scale' and 'shift' go together.*'scale'"),
    (dict(scale=torch.randn(3, 5)), r"argument 'scale' must have shape \(N, C\)"),
    (dict(shift=torch.randn(3, 7).half()), "argument 'shift' must have dtype float32"),
    (dict(shift=torch.randn(7, 3).t()), "argument 'shift' must be contiguous"),
    (dict(temb=torch.randn(3, 6)), r"argument 'temb' must have shape \(N, O\)"),
    (dict(residual=torch.randn(3, 7, 5, 6)), r"argument 'residual' must have shape \(N, O, H, W\)"),
    (dict(residual=torch.randn(3, 7, 5, 7).half()), "argument 'residual' must have x's dtype"),
    (dict(shortcut=None), "argument 'shortcut2' needs 'shortcut'"),
    (dict(shortcut=torch.randn(2, 3, 5, 7)), r"argument 'shortcut' must have shape \(N, S1"),
    (dict(shortcut2=torch.randn(3, 2, 5, 7).bfloat16()), "argument 'shortcut2' must have x's"),
    (dict(shortcut2=None), r"argument 'packed' must have shape \(O, K\).*K = k\*k\*C \+ S"),
]


@pytest.mark.parametrize("over,msg", BAD, ids=lambda v: "" if isinstance(v, str) else
                         ",".join(v))
def test_rejects_bad_input(over, msg):
    """Each check, on the CPU kernel, the Meta kernel and the checks alone (the JIT's)."""
    assert_rejected("norm_conv2d", _bad(**over), msg)


@pytest.mark.parametrize("cl_out", [False, True], ids=["nchw", "channels_last"])
def test_meta_kernel_gives_the_shape_and_layout(cl_out):
    x = torch.empty(2, 640, 64, 64, dtype=torch.float16, device="meta")
    x2 = torch.empty(2, 320, 64, 64, dtype=torch.float16, device="meta")
    p = torch.empty(320, 9 * 960 + 960, dtype=torch.float16, device="meta")
    y = op(x, p, 3, None, x2, None, None, True, None, None, x, x2, cl_out)
    assert y.device.type == "meta" and y.shape == (2, 320, 64, 64) and y.dtype == torch.float16
    strides = (64 * 64 * 320, 1, 64 * 320, 320) if cl_out else (320 * 64 * 64, 64 * 64, 64, 1)
    assert y.stride() == strides


def test_empty_batch():
    t, args = _make(torch.float32, N=0, norm=True, temb=True)
    assert op(*args).shape == (0, 7, 5, 7)


def test_opcheck_schema_autograd_and_fake_tensors():
    for name in ("everything", "proj_out", "conv1"):
        _, args = _make(torch.float32, **{**COMBOS[name], "N": 2, "H": 3, "W": 4})
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a
                     for a in args)
        torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["everything", "everything_1x1"])
def test_gradients_match_the_reference(dtype, atol, name):
    """Gradients for x, x2, the weight and shortcut weight (through pack_conv_weight), bias,
    scale, shift, temb, residual and both shortcuts against autograd through the float64
    reference. (The op computes in fp16/bf16/fp32 only, so the float64 gradcheck runs on the
    backward's formula through the reference: test_backward_formula_gradcheck.)"""
    spec = {**COMBOS[name], "N": 2, "H": 4, "W": 3}
    t, _ = _make(dtype, **spec)
    keys = [k for k, v in t.items() if v is not None]
    leaves = {k: t[k].detach().clone().requires_grad_() for k in keys}
    packed = ops.pack_conv_weight(leaves["weight"], leaves["shortcut_weight"])
    out = ops.norm_conv2d(leaves["x"], packed, spec.get("k", 3), leaves["bias"],
                          x2=leaves["x2"], scale=leaves["scale"], shift=leaves["shift"],
                          silu=True, temb=leaves["temb"], residual=leaves["residual"],
                          shortcut=leaves["shortcut"], shortcut2=leaves["shortcut2"],
                          channels_last_out=spec.get("cl_out", False))
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, [leaves[k] for k in keys], dy)
    l64 = {k: t[k].detach().double().requires_grad_() for k in keys}
    ref = reference.norm_conv2d(l64["x"], l64["weight"], l64["bias"], l64["x2"], l64["scale"],
                                l64["shift"], True, l64["temb"], l64["residual"],
                                l64["shortcut"], l64["shortcut2"], l64["shortcut_weight"])
    want = torch.autograd.grad(ref, [l64[k] for k in keys], dy.double())
    for k, got, w in zip(keys, grads, want):
        assert got.dtype == t[k].dtype, k
        err = (got.double() - w).abs().max().item()
        assert err <= atol * (1 + w.abs().max().item()), (k, err)


def test_backward_formula_gradcheck():
    """float64 gradcheck of the backward's recomputation (fastdiff.ops._norm_conv2d_backward
    evaluates it in float32; here the same graph in float64 on tiny shapes, through the
    reference, whose gradients test_gradients_match_the_reference compares the op's with)."""
    t, _ = _make(torch.float64, N=1, C1=2, C2=1, S1=1, S2=1, H=2, W=3, O=2, norm=True, bias=True,
                 temb=True, res=True)
    keys = [k for k, v in t.items() if v is not None]
    leaves = [t[k].detach().double().requires_grad_() for k in keys]

    def f(*vals):
        v = dict(zip(keys, vals))
        return reference.norm_conv2d(v["x"], v["weight"], v["bias"], v["x2"], v["scale"],
                                     v["shift"], True, v["temb"], v["residual"], v["shortcut"],
                                     v["shortcut2"], v["shortcut_weight"])
    assert torch.autograd.gradcheck(f, leaves)


def test_plan_refuses_sizes_beyond_32_bits():
    x = torch.empty(1, 16, 2**16, 2**15, dtype=torch.float16, device="meta")
    p = torch.empty(16, 16, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="beyond the CUDA kernel's 32-bit sizes"):
        kernel.plan(x, p, 1)


def test_prebuilt_configs_cover_the_listed_flags():
    cfgs = kernel.prebuilt_configs()
    assert len(cfgs) == 2 * len(kernel.PREBUILT_FLAGS)
    keys = {prebuild.kernel_key(c) for c in cfgs}
    assert len(keys) == len(cfgs)
    for c in cfgs:
        assert c["signature"]["sxn"] == "i64" and "K" in c["aligned"]


def _py_plan(*args):
    launches, _ = kernel.plan(*args)
    out = []
    for cfg, grid, vals in launches:
        params = [p["name"] for p in prebuild.launch_params(cfg["signature"],
                                                            cfg["constexprs"])[:-2]]
        packed = [(n, v.data_ptr() if isinstance(v, torch.Tensor) else int(v))
                  for n, v in zip(params, vals)]
        out.append((prebuild.kernel_key(cfg), list(grid), packed))
    return out


def _cpp(*args):
    launches, outs, _, why = prebuilt.cpp_plan("norm_conv2d", *args)
    res = []
    for la in launches:
        packed = []
        for name, kind, bits in la["args"]:
            if kind in ("i32", "i64") and bits >= 1 << 63:
                bits -= 1 << 64
            packed.append((name, bits))
        res.append((la["key"], list(la["grid"]), packed))
    return res, outs, why


@pytest.mark.parametrize("name", list(COMBOS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_cpp_plan_matches_the_python_plan(name, dtype):
    """The C++ plan (prebuilt cubins) launches what kernels/norm_conv2d.py's plan does, but for
    the output's address (each allocates its own), and says why not prebuilt where no cubin."""
    _, args = _make(dtype, **COMBOS[name])
    cpp, outs, why = _cpp(*args)
    py = _py_plan(*args)
    y_cpp = outs.data_ptr()
    (key, grid, packed), = py
    (ckey, cgrid, cpacked), = cpp
    assert (ckey, cgrid) == (key, grid)
    for (n, v), (cn, cv) in zip(packed, cpacked):
        assert n == cn
        if n != "y_ptr":
            assert v == cv, (n, v, cv)
        else:
            assert cv == y_cpp
    flags = dict(zip(kernel.FLAGS, [int(k.split("=")[1]) for k in
                                    key.split("[")[1].rstrip("]").split(",")[4:]]))
    listed = tuple(flags[f] for f in kernel.FLAGS) in kernel.PREBUILT_FLAGS
    if dtype == torch.float32:
        assert why == "no cubin for float32 (fp16 and bf16 only)"
    elif listed:  # odd channels here (tests/test_prebuilt.py: 16, a cubin)
        assert why == ("no cubin for channels (C1, C2, S1, S2) or K not multiples of 16, or a "
                       "tensor not 16-byte aligned"), (name, why)
    else:
        assert why == "no cubin for this combination of kernel_size and inputs", (name, why)
    if dtype != torch.float32:
        assert listed == (name in ("conv1", "conv1_cat", "conv2_res", "conv2_sc", "conv2_sc_cat",
                                   "proj_in", "proj_out", "conv_out", "one_row"))
    if listed and dtype != torch.float32:
        assert key in {prebuild.kernel_key(c) for c in kernel.prebuilt_configs()}


def test_cpp_plan_says_why_no_cubin_for_unaligned_tensors():
    """SD's widths (multiples of 16) have a cubin; a 16-byte-misaligned view does not."""
    t, args = _make(torch.float16, C1=32, O=16, S1=16, norm=True, silu=True, bias=True)
    assert _cpp(*args)[2] == ""
    x = torch.zeros(3 * 32 * 35 + 1, dtype=torch.float16)[1:].view(3, 32, 5, 7)
    why = _cpp(x, *args[1:])[2]
    assert why.startswith("no cubin for channels (C1, C2, S1, S2) or K"), why


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors through the CUDA kernel")
def test_cuda_path_reaches_the_jit_launcher():
    """The op's CUDA kernel (C++: no prebuilt cubin runs CPU tensors) falls back to
    fastdiff::_jit_norm_conv2d, whose Python kernel runs this module's plan (interpreted here),
    also with trailing defaults left out (the dispatcher drops them: put back)."""
    _, args = _make(torch.float32, **COMBOS["conv2_sc"])
    _, plain = _make(torch.float32, N=1, H=3, W=4)
    for a in (args, plain[:3]):
        out = torch.ops.fastdiff._cuda_kernel_norm_conv2d(*a)
        torch.testing.assert_close(out, op(*a), rtol=1e-5, atol=2e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_sd_shapes(dtype):
    """SD1.5-sized calls (C = 320/640 + 320 skip, 32x32) against the C++ kernel on the CPU."""
    atol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for spec in (dict(C1=320, O=320, norm=True, silu=True, bias=True, temb=True),
                 dict(C1=640, C2=320, O=320, norm=True, silu=True, bias=True, S1=640, S2=320),
                 dict(k=1, C1=320, O=320, bias=True, res=True, cl_in=True)):
        t, args = _make(dtype, N=2, H=32, W=32, **spec)
        out = run_op("cuda", "norm_conv2d", *args)
        cpu = op(*args)
        scale = cpu.float().abs().max().item()
        assert (out.float() - cpu.float()).abs().max().item() <= atol * max(1.0, scale)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_ad_is_refused_and_no_grad_runs():
    """A dual tensor would come out without a tangent (the op has a backward only): refused,
    naming the op. Under no_grad the entry point skips the autograd kernel: the same values."""
    import torch.autograd.forward_ad as fwAD
    t, args = _make(torch.float32, norm=True, silu=True, bias=True)
    call = functools.partial(ops.norm_conv2d, packed=args[1], kernel_size=3, bias=t["bias"],
                             scale=t["scale"], shift=t["shift"], silu=True)
    with torch.no_grad():
        torch.testing.assert_close(call(t["x"]), op(*args), rtol=0, atol=0)
    with fwAD.dual_level():
        dual = fwAD.make_dual(t["x"], torch.ones_like(t["x"]))
        with pytest.raises(NotImplementedError, match="fastdiff.norm_conv2d: forward-mode AD"):
            call(dual)
