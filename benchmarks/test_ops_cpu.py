"""CPU benchmarks of the three fused ops against the torch eager code they replace.

Each group times fastdiff and its baseline on the same inputs in the same run; report.py turns
the JSON into speed-up ratios. Run: ``make bench`` (or ``pytest benchmarks --benchmark-json F``).
Shapes are U-Net-like and sized for a small CPU.
"""
import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops, schedules

diffusers = pytest.importorskip("diffusers")

IMPLS = ["fastdiff", "torch"]


def _rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


GN_SHAPES = [
    # (N, C, H, W): SD1.5 ResNet blocks at a 256x256 image (32x32 latent) and the 8x8 bottleneck
    (2, 320, 32, 32),
    (2, 640, 16, 16),
    (2, 1280, 8, 8),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", GN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu(benchmark, impl, layout, shape):
    benchmark.group = f"group_norm_silu {'x'.join(map(str, shape))} {layout}"
    x = _rnd(*shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w, b = _rnd(shape[1]), _rnd(shape[1])
    if impl == "fastdiff":
        benchmark(ops.group_norm_silu, x, 32, w, b)
    else:
        benchmark(lambda: F.silu(F.group_norm(x, 32, w, b)))


@pytest.mark.parametrize("impl", IMPLS)
def test_group_norm_scale_shift_silu(benchmark, impl):
    """AdaGN: norm(h) * (1 + scale) + shift, then SiLU - fused vs the unfused chain."""
    benchmark.group = "group_norm_silu 2x320x32x32 scale_shift"
    x, w, b = _rnd(2, 320, 32, 32), _rnd(320), _rnd(320)
    sc, sh = _rnd(2, 320), _rnd(2, 320)
    if impl == "fastdiff":
        benchmark(lambda: ops.group_norm_silu(x, 32, w, b, scale=sc, shift=sh))
    else:
        benchmark(lambda: F.silu(F.group_norm(x, 32, w, b) * (1 + sc[:, :, None, None])
                                 + sh[:, :, None, None]))


ATTN_SHAPES = [
    # (B, H, Lq, Lk, D): SD1.5 self-attention at 32x32 latents (D=40), 16x16 (D=80), 8x8 (D=160),
    # and cross-attention to a 77-token context
    (2, 8, 1024, 1024, 40),
    (2, 8, 256, 256, 80),
    (2, 8, 64, 64, 160),
    (2, 8, 1024, 77, 40),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention(benchmark, impl, shape):
    B, H, Lq, Lk, D = shape
    benchmark.group = f"attention {'x'.join(map(str, shape))}"
    q, k, v = _rnd(B, H, Lq, D), _rnd(B, H, Lk, D), _rnd(B, H, Lk, D)
    fn = ops.attention if impl == "fastdiff" else F.scaled_dot_product_attention
    benchmark(fn, q, k, v)


SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
              "EulerDiscreteScheduler"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_denoise_step(benchmark, impl, name):
    """One guided step on 2 SD latents (4x64x64): diffusers' CFG arithmetic + scheduler.step."""
    benchmark.group = f"denoise_step {name[:-9]} CFG 2x4x64x64"
    sched = getattr(diffusers, name)()
    sched.set_timesteps(50)
    mo, x = _rnd(4, 4, 64, 64), _rnd(2, 4, 64, 64)
    i = 10
    t = sched.timesteps[i]
    if impl == "fastdiff":
        table = schedules.table_from_scheduler(sched)
        idx = torch.tensor(i)
        prev = x if table.needs_prev_x0 else None

        def step():
            # diffusers draws the step's noise inside step(): draw ours in the timed call too
            n = (torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
                 if table.needs_noise else None)
            return ops.denoise_step(mo, x, table.coeffs, idx, n, prev, 7.5, table.clip_sample,
                                    table.clip_sample_range, False)[0]
        benchmark(step)
    else:
        def step():
            if hasattr(sched, "_step_index"):
                sched._step_index = i  # keep the multistep schedulers at the same step
            if name == "DPMSolverMultistepScheduler":
                sched.model_outputs = [x, x]
                sched.lower_order_nums = 1
            u, c = mo.chunk(2)
            return sched.step(u + 7.5 * (c - u), t, x,
                              generator=torch.Generator().manual_seed(0)).prev_sample
        benchmark(step)
