"""The fused ops against torch eager and torch.compile of the same math, at the op shapes of
SD1.5 (512x512), SDXL (1024x1024), DDPM-CIFAR10 (32x32) and the digits model (see
benchmarks/cases.py for the cases, byte and flop counts)."""
import pytest
import torch

from conftest import sync
import cases


@pytest.mark.parametrize("system", cases.KERNEL_SYSTEMS)
def test_kernel(benchmark, kcase, system, device, dtype, quick):
    if system == "unfused" and kcase.op not in cases.UNFUSED_OPS:
        pytest.skip("'unfused' is for ops that replace a pair of fastdiff calls")
    if quick and system == "compile" and kcase.op != "denoise_step":
        pytest.skip("quick mode compiles one case only (torch.compile is slow on CPU)")
    if device == "cpu" and not quick and kcase.model.startswith("sdxl"):
        pytest.skip("SDXL shapes are GPU-only (minutes per case on a CPU)")
    fn = cases.kernel_fn(kcase, system, device, dtype)
    inner = 20 if device == "cuda" else 1

    @torch.no_grad()        # inference, as pipelines run: no autograd kernels on the way
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


@pytest.mark.parametrize("system", ("fastdiff", "eager"))
def test_kernel_graphed(benchmark, kcase, system, device, dtype, quick):
    """CUDA only: the same 20 calls captured once in a CUDA graph and replayed, so the median is
    the GPU's time alone, without the host's cost per call, which the plain cases measure for
    small ops (the H200, 2026-11-30: group_norm_silu's call 53.5 us, its kernels 24.9 us). A
    captured graph is what accelerate and the engine run. Reported as the case '<id> graphed'."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    fn = cases.kernel_fn(kcase, system, device, dtype)
    inner = 20
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):   # warm up (JIT, cubins, allocator)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        for _ in range(inner):
            fn()

    def run():
        graph.replay()
        sync()

    run()
    case = f"{kcase.id} graphed"
    benchmark.group = case
    benchmark.extra_info.update(kind="kernel", case=case, system=system, inner=inner,
                                bytes=kcase.bytes(torch.empty((), dtype=dtype).element_size()),
                                flops=kcase.flops(), dtype=str(dtype).replace("torch.", ""))
    benchmark.pedantic(run, rounds=3 if quick else 30, warmup_rounds=1)
