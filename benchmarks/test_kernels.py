"""The fused ops against torch eager and torch.compile of the same math, at the op shapes of
SD1.5 (512x512), SDXL (1024x1024), DDPM-CIFAR10 (32x32) and the digits model (see
benchmarks/cases.py for the cases, byte and flop counts)."""
import pytest
import torch

from conftest import sync
import cases


@pytest.mark.parametrize("system", cases.KERNEL_SYSTEMS)
def test_kernel(benchmark, kcase, system, device, dtype, quick):
    if quick and system == "compile" and kcase.op != "denoise_step":
        pytest.skip("quick mode compiles one case only (torch.compile is slow on CPU)")
    if device == "cpu" and not quick and kcase.model.startswith("sdxl"):
        pytest.skip("SDXL shapes are GPU-only (minutes per case on a CPU)")
    fn = cases.kernel_fn(kcase, system, device, dtype)
    inner = 20 if device == "cuda" else 1

    def run():
        for _ in range(inner):
            fn()
        sync()

    run()                                             # compile / JIT / autotune, then time
    benchmark.group = kcase.id
    benchmark.extra_info.update(kind="kernel", case=kcase.id, system=system, inner=inner,
                                bytes=kcase.bytes(torch.empty((), dtype=dtype).element_size()),
                                flops=kcase.flops(), dtype=str(dtype).replace("torch.", ""))
    rounds = 3 if quick else (30 if device == "cuda" else 7)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
