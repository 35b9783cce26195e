"""End-to-end sampling: a diffusers SD pipeline (random weights, CFG, DDIM) for stock diffusers
eager, diffusers + torch.compile(unet, mode='max-autotune'), fastdiff.accelerate(pipe) and the
fastdiff engine (engine.sample_pipeline), and accelerate with every matmul on cuBLAS
(accelerate-cublas: its Triton GEMMs off, cases.CUBLAS_ENV). Time to first image (including
compile or capture) is the first call, measured before the timed rounds."""
import time

import pytest

from conftest import sync
import cases

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pipeline(ecase, device, dtype):
    return cases.build_pipeline(ecase, device, dtype)


# The baseline first: a run cut off mid-case (benchmarks/gpu.sh) still has its ratios.
@pytest.mark.parametrize("system", ["diffusers", "engine", "accelerate", "accelerate-cublas",
                                    "compile"])
def test_sampling(benchmark, ecase, system, pipeline, device, quick):
    import fastdiff

    if quick and system == "compile":
        pytest.skip("quick mode skips torch.compile of a whole U-Net (minutes on a CPU)")
    pipe, pe, ne = pipeline
    unet = pipe.unet
    try:
        fn = cases.e2e_fn(ecase, system, pipe, pe, ne)
        t0 = time.perf_counter()
        fn()
        sync()
        first = time.perf_counter() - t0

        def run():
            fn()
            sync()

        benchmark.group = ecase.id
        benchmark.extra_info.update(kind="e2e", case=ecase.id, system=system, steps=ecase.steps,
                                    batch=ecase.batch, ttfi=first)
        benchmark.pedantic(run, rounds=2 if quick else 5, warmup_rounds=0)
    finally:
        fastdiff.restore(pipe)
        pipe.unet = unet
