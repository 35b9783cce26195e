"""First call: what a user waits for before an op (or the first image) runs, prebuilt vs JIT.

Each round starts cold, as a new process would (untimed set-up): the JIT path gets an empty
Triton cache directory and its in-memory kernel caches cleared (so it compiles, as on a first
install); the prebuilt path forgets its loaded cubins (so it loads them again from the wheel).
The timed call is then the op's first call, synchronized. Both paths run side by side in one
session, so their ratio is what BENCHMARKS.md reports. CUDA only (on CPU there is nothing to
compile); cases are SD1.5-shaped, fp16.

    pytest benchmarks/test_first_call.py --benchmark-json first-call.json
"""
import os
import tempfile

import pytest
import torch

from fastdiff import ops, prebuilt, schedules

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PATHS = ("prebuilt", "jit")


def _kernels():
    from fastdiff.kernels import attention, denoise_step, group_norm_silu

    return [group_norm_silu.group_norm_silu_stats, group_norm_silu.group_norm_silu_apply,
            attention.attention_fwd, denoise_step.denoise_step]


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """set-up for one round of ``path``: the state of a new process."""
    prebuilt.load_if_cuda()
    if prebuilt.count() == 0:
        pytest.skip("no prebuilt kernels installed (pip wheel . / make prebuilt)")
    root = tmp_path_factory.mktemp("triton-cache")
    saved = os.environ.get("TRITON_CACHE_DIR")

    def reset(path):
        torch.cuda.synchronize()
        if path == "jit":
            os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=root)
            for k in _kernels():
                k.device_caches.clear()
        else:
            prebuilt.forget_loaded()
        ops.set_prebuilt("require" if path == "prebuilt" else "off")

    yield reset
    ops.set_prebuilt("on")
    if saved is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = saved


def _inputs(op):
    """(function, args) of an SD1.5-shaped call (64x64 latents, fp16)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.float16)  # noqa: E731
    if op == "group_norm_silu":
        return ops.group_norm_silu, (r(2, 320, 64, 64), 32, r(320), r(320))
    if op == "attention":
        return ops.attention, (r(2, 8, 4096, 40), r(2, 8, 77, 40), r(2, 8, 77, 40))
    coeffs = torch.randn(50, schedules.ROW_LEN, device="cuda", generator=g)
    coeffs[:, schedules.absent_slot_columns(0)] = 0  # no state slots
    return ops.denoise_step, (r(2, 4, 64, 64), r(1, 4, 64, 64), coeffs,
                              torch.tensor(3, device="cuda"), r(1, 4, 64, 64), None, 7.5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", ["group_norm_silu", "attention", "denoise_step"])
def test_first_call(benchmark, cold, op, path):
    benchmark.group = f"first call: {op}"
    benchmark.extra_info.update(kind="first_call", case=op, system=path)

    def setup():
        fn, args = _inputs(op)
        cold(path)
        return (fn, *args), {}

    def first(fn, *args):
        fn(*args)
        torch.cuda.synchronize()

    benchmark.pedantic(first, setup=setup, rounds=3, iterations=1)


@pytest.mark.parametrize("path", PATHS)
def test_time_to_first_image(benchmark, cold, path):
    """The shipped digits model, 50 DDIM steps with guidance, one image: everything from the
    first kernel launch to the image (compile or load, CUDA-graph capture, the steps)."""
    from fastdiff.digits.cli import load_model
    from fastdiff.diffusion import GaussianDiffusion, sample

    model = load_model(device="cuda")
    diffusion = GaussianDiffusion()
    benchmark.group = "time to first image"
    benchmark.extra_info.update(kind="first_call", case="first image (digits, 50 steps)",
                                system=path)

    def first_image():
        x, _ = sample(model, diffusion, torch.tensor([3]), num_steps=50)
        torch.cuda.synchronize()
        return x

    benchmark.pedantic(first_image, setup=lambda: cold(path), rounds=3, iterations=1)


# ---- per call, warm: the host's cost of one launch ----

def _small_step():
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.float16)  # noqa: E731
    coeffs = torch.randn(50, schedules.ROW_LEN, device="cuda", generator=g)
    coeffs[:, schedules.absent_slot_columns(0)] = 0  # no state slots
    return (r(2, 4, 8, 8), r(1, 4, 8, 8), coeffs, torch.tensor(3, device="cuda"), r(1, 4, 8, 8),
            None, 7.5, False, 1.0, False)


def _warm_step():
    """The dispatcher's op itself (as timed since the first GPU run)."""
    return torch.ops.fastdiff.denoise_step, _small_step()


def _warm_group_norm():
    """fastdiff.ops.group_norm_silu, what accelerate calls, on 2x320x8x8 fp16 with fp16 weight
    and bias: two kernels a call."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 320, 8, 8, device="cuda", generator=g, dtype=torch.float16)
    w = torch.randn(320, device="cuda", generator=g, dtype=torch.float16)
    return ops.group_norm_silu, (x, 32, w, w, 1e-5)


# op: ((the callable, its arguments), the group, the report's case). group_norm_silu's was asked
# for by the H200 run of 2026-11-30: at SD1.5's 2x320x64x64 the op's call took 53.5 us (grad mode
# on), its kernels 24.9 us.
WARM = {"denoise_step": (_warm_step, "1x4x8x8", "warm call x100 (host overhead)"),
        "group_norm_silu": (_warm_group_norm, "2x320x8x8",
                            "warm call x100 group_norm_silu (host overhead)")}


@pytest.mark.parametrize("op", list(WARM))
@pytest.mark.parametrize("path", PATHS)
def test_warm_call_overhead(benchmark, path, op):
    """A small call (GPU time negligible or a few us): 100 calls, then one sync, so the median is
    the host's time per call: C++ op -> cuLaunchKernel vs C++ op -> Python -> the Triton
    launcher."""
    prebuilt.load_if_cuda()
    if prebuilt.count() == 0:
        pytest.skip("no prebuilt kernels installed (pip wheel . / make prebuilt)")
    make, shape, case = WARM[op]
    fn, args = make()
    prev = ops.set_prebuilt("require" if path == "prebuilt" else "off")
    try:
        with torch.no_grad():
            fn(*args)  # loads / compiles
        torch.cuda.synchronize()
        benchmark.group = f"warm call: {op} {shape}"
        benchmark.extra_info.update(kind="first_call", case=case, system=path)

        @torch.no_grad()    # inference, as pipelines run
        def hundred():
            for _ in range(100):
                fn(*args)
            torch.cuda.synchronize()

        benchmark.pedantic(hundred, rounds=20, warmup_rounds=2, iterations=1)
    finally:
        ops.set_prebuilt(prev)
