"""group_norm_silu's fused backward against torch's GroupNorm + SiLU backward (issue 15).

Each round computes the gradients of x, weight and bias (and of the AdaGN scale/shift in the
'scale_shift' cases) for one upstream gradient: 'fastdiff' calls
``torch.ops.fastdiff.group_norm_silu_backward`` once (statistics recomputed, one pass for dx);
'torch' runs ``torch.autograd.grad`` through ``F.silu(F.group_norm(x) * (1 + scale) + shift)``,
whose forward (and saved statistics) were computed before the round, so torch's side is the
backward alone. Compare the two systems of one case side by side:

    pytest benchmarks/test_backward.py --benchmark-columns=median,rounds

FASTDIFF_BENCH_THREADS=N sets torch's (and the C++ kernels') CPU threads for both systems: on a
CPU shared with other work, a parallel region of either side can wait a scheduler time slice
for a descheduled thread, which swamps these millisecond kernels.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import fastdiff  # noqa: F401  (registers torch.ops.fastdiff)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
if os.environ.get("FASTDIFF_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTDIFF_BENCH_THREADS"]))

CASES = [
    # (id, N, C, H, W, G, scale_shift): SD1.5 resnet norms at 512x512 (batch 2 = the CFG pair)
    ("sd15 2x320x64x64", 2, 320, 64, 64, 32, False),
    ("sd15 2x640x32x32", 2, 640, 32, 32, 32, False),
    ("sd15 2x1280x16x16", 2, 1280, 16, 16, 32, False),
    ("adagn 2x320x32x32 scale_shift", 2, 320, 32, 32, 32, True),
]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("system", ["fastdiff", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_group_norm_silu_backward(benchmark, case, system):
    _, N, C, H, W, G, ss = case
    g = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(N, C, H, W, generator=g).to(DEVICE, DTYPE) for _ in range(2))
    w, b = (torch.randn(C, generator=g).to(DEVICE) for _ in range(2))
    scale, shift = ((torch.randn(N, C, generator=g) * 0.5).to(DEVICE) if ss else None
                    for _ in range(2))
    if system == "fastdiff":
        def run():
            torch.ops.fastdiff.group_norm_silu_backward(dy, x, G, w, b, 1e-5, None, scale, shift,
                                                        True)
            _sync()
    else:
        leaves = [t.detach().requires_grad_() for t in (x, w, b, scale, shift) if t is not None]
        xl, wl, bl = leaves[:3]
        y = F.group_norm(xl, G, wl.to(DTYPE), bl.to(DTYPE), 1e-5)
        if ss:
            y = y * (1 + leaves[3].to(DTYPE)[:, :, None, None]) + leaves[4].to(DTYPE)[:, :, None,
                                                                                      None]
        y = F.silu(y)

        def run():
            torch.autograd.grad(y, leaves, dy, retain_graph=True)
            _sync()
    run()
    benchmark.group = case[0]
    benchmark.extra_info.update(case=case[0], system=system, device=DEVICE,
                                threads=torch.get_num_threads(),
                                dtype=str(DTYPE).replace("torch.", ""))
    benchmark.pedantic(run, rounds=15 if DEVICE == "cpu" else 50, warmup_rounds=2)
