"""Shared test set-up: backends to run each op on, and the error-vs-reference pass rule.

Backends:
  cpp    - torch.ops.fastdiff.* on CPU tensors (the C++ kernels);
  triton - the Triton launchers of fastdiff.kernels on CPU tensors under TRITON_INTERPRET=1
           (set here, before triton is imported, when no GPU is present);
  cuda   - torch.ops.fastdiff.* on CUDA tensors (the Triton kernels compiled for the GPU);
           skipped without a GPU.
"""
import os
import re

import torch

HAS_CUDA = torch.cuda.is_available()
# Under pytest-xdist (`make test` runs `-n 2`), each worker takes its share of the cores: two
# workers with torch's default of every core each would oversubscribe CI's two.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1)
                              // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
# The pytest runs the tests start (benchmarks/run.py, gpu.sh's phases) are not xdist workers:
# pytest-benchmark switches itself off where it sees these variables.
for _var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
    os.environ.pop(_var, None)
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastdiff  # noqa: E402,F401
from fastdiff import kernels, ops, prebuilt  # noqa: E402

BACKENDS = [
    pytest.param("cpp", id="cpp"),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        HAS_CUDA, reason="interpreted Triton runs on machines without a GPU; 'cuda' covers it")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not HAS_CUDA, reason="needs a CUDA GPU")]),
]


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return x


# Ops without prebuilt cubins at all: they always run on the Triton JIT.
JIT_ONLY_OPS = {"group_norm_silu_backward": "the backward has no prebuilt kernels"}


def jit_only_head_dim(name, args) -> bool:
    """Whether an attention call's head dim has no prebuilt cubin (it runs on the Triton JIT)."""
    from fastdiff.kernels.attention import PREBUILT_HEAD_DIMS
    return name == "attention" and args[0].shape[-1] not in PREBUILT_HEAD_DIMS


def jit_only_reason(name, args) -> str | None:
    """Why FASTDIFF_PREBUILT=require refuses a call (no cubin for it), or None."""
    if name in JIT_ONLY_OPS:
        return JIT_ONLY_OPS[name]
    if jit_only_head_dim(name, args):
        return f"no cubin for head dim {args[0].shape[-1]}"
    # Otherwise the C++ plan's own reason (add_layer_norm: rows of C < 129, C > 4096 or not 16
    # bytes; the H200's wheel phase found the tests' small rows refused).
    return re.escape(prebuilt.cpp_plan(name, *args)[3]) or None


def run_op(backend: str, name: str, *args):
    """Run op ``name`` with positional schema arguments on ``backend``; outputs come back on CPU,
    and so do the arguments the op updates in place (``Tensor(a!)`` in its schema)."""
    if backend == "cpp":
        out = getattr(torch.ops.fastdiff, name)(*args)
    elif backend == "cuda":
        op = getattr(torch.ops.fastdiff, name)
        on_gpu = [_to(a, "cuda") for a in args]
        why = jit_only_reason(name, on_gpu)
        if why and prebuilt.mode() == "require":
            # FASTDIFF_PREBUILT=require (gpu.sh's tests-prebuilt phase) refuses head dims the
            # wheel has no cubin for, and ops without cubins, as documented; they run on the
            # JIT under 'on'.
            with pytest.raises(RuntimeError, match=why):
                op(*on_gpu)
            prev = ops.set_prebuilt("on")
            try:
                out = op(*on_gpu)
            finally:
                ops.set_prebuilt(prev)
        else:
            out = op(*on_gpu)
        torch.cuda.synchronize()
        for a, g, spec in zip(args, on_gpu, op.default._schema.arguments):
            if isinstance(a, torch.Tensor) and spec.alias_info and spec.alias_info.is_write:
                a.copy_(g)
    elif backend == "triton":
        ops.check(name, *args)
        out = kernels.launch(name, *args)
    else:
        raise ValueError(backend)
    if isinstance(out, (tuple, list)):
        return type(out)(o.cpu() for o in out)
    return out.cpu()


def assert_rejected(name: str, args, msg: str):
    """Op ``name`` refuses ``args`` with a ValueError matching ``msg`` on the CPU kernel, on the
    Meta kernel (the same arguments as meta tensors, unless one is already on meta) and in its
    checks alone (``ops.check``: what the CUDA path and the JIT run first)."""
    op = getattr(torch.ops.fastdiff, name)
    with pytest.raises(ValueError, match=msg):
        op(*args)
    if not any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
        meta = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
                if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match=msg):
            op(*meta)
    with pytest.raises(ValueError, match=msg):
        ops.check(name, *args)


def assert_close_to_ref(out, ref, torch_out=None, atol=1e-6, what=""):
    """Pass rule: max |out - ref| <= 2 * max |torch_out - ref| + atol.

    ``ref`` is the float64 reference; ``torch_out`` is torch's own (unfused) result in the same
    dtype as ``out``, so the bound scales with what the dtype can do.
    """
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64 = out.detach().cpu().to(torch.float64)
    ref = ref.detach().cpu()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values in the output"
    err = (out64 - ref).abs().max().item() if out.numel() else 0.0
    bound = atol
    if torch_out is not None and out.numel():
        bound += 2 * (torch_out.detach().cpu().to(torch.float64) - ref).abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g}"


# The CUDA-graph tests run twice: 'cuda' captures real graphs (GPU only), 'sim' runs the same
# bookkeeping on CPU with fastdiff.capture.SIMULATE (a replay re-runs the recorded body under
# the refusal of host reads). Returns the device the test puts its tensors on.
@pytest.fixture(params=[
    "sim", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not HAS_CUDA, reason="needs a CUDA GPU")])])
def dev(request, monkeypatch):
    from fastdiff import capture

    if request.param == "sim":
        monkeypatch.setattr(capture, "SIMULATE", True)
        return "cpu"
    return "cuda"


# `make test` runs the suite under pytest-xdist with --dist loadgroup: each test file is one
# group (its module fixtures made once, as with loadfile), except that the ahead-of-time compile
# (test_prebuild) and the wheel built from its Triton cache (test_wheel) are one group, run in
# that order by one worker with test_prebuilt's selection tests over the same cubins (side by
# side, each would compile every kernel again).
_GROUPS = {"test_prebuild": "ahead-of-time", "test_prebuilt": "ahead-of-time",
           "test_wheel": "ahead-of-time"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        stem = item.path.stem
        item.add_marker(pytest.mark.xdist_group(_GROUPS.get(stem, stem)))
