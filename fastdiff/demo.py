"""``fastdiff demo``: each fused op next to the unfused torch code it replaces.

For each op at a U-Net-like shape it prints the max error of fastdiff and of torch against the
float64 reference, and the median time of each (same run, same inputs).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fastdiff import ops, reference, schedules


def _median_time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _cases(device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    # GroupNorm + scale-shift + SiLU at an SD1.5 ResNet block (64x64 latent, 320 channels).
    x, w, b, sc, sh = rnd(2, 320, 32, 32), rnd(320), rnd(320), rnd(2, 320), rnd(2, 320)
    yield ("group_norm_silu  (2,320,32,32) G=32 +scale/shift",
           lambda: ops.group_norm_silu(x, 32, w, b, scale=sc, shift=sh),
           lambda: F.silu(F.group_norm(x, 32, w, b) * (1 + sc[:, :, None, None])
                          + sh[:, :, None, None]),
           lambda: reference.group_norm_silu(x, 32, w, b, 1e-5, None, sc, sh, True))

    # Cross-attention of 1024 image tokens to a 77-token context, 8 heads of 40 (SD1.5).
    q, k, v = rnd(2, 8, 1024, 40), rnd(2, 8, 77, 40), rnd(2, 8, 77, 40)
    yield ("attention        q(2,8,1024,40) kv 77 keys",
           lambda: ops.attention(q, k, v),
           lambda: F.scaled_dot_product_attention(q, k, v),
           lambda: reference.attention(q, k, v))

    # One guided DDIM step on a batch of 4 SD latents, against the diffusers-style chain.
    sched_ac = schedules.alphas_cumprod(schedules.make_betas("scaled_linear", 1000, 0.00085, 0.012))
    table = schedules.ddim_table(sched_ac, list(range(999, 0, -20)), 1000, sched_ac[0])
    coeffs, idx = table.coeffs.to(device), torch.tensor(10, device=device)
    mo, xs = rnd(8, 4, 64, 64), rnd(4, 4, 64, 64)
    a_t, a_prev = float(sched_ac[table.timesteps[10]]), float(sched_ac[table.timesteps[10] - 20])

    def torch_step():
        u, c = mo.chunk(2)
        eps = u + 7.5 * (c - u)
        x0 = (xs - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps

    yield ("denoise_step     DDIM, CFG 7.5, (4,4,64,64)",
           lambda: ops.denoise_step(mo, xs, coeffs, idx, guidance_scale=7.5)[0],
           torch_step,
           lambda: reference.denoise_step(mo, xs, table.coeffs, idx.cpu(), guidance_scale=7.5)[0])


def run_demo(device: str | None = None, repeats: int = 20) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device == "cuda" else torch.float32
    print(f"fastdiff demo on {device} ({dtype}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'op':48s} {'err fastdiff':>13s} {'err torch':>10s} {'fastdiff':>10s} "
          f"{'torch':>10s} {'speed-up':>8s}")
    ok = True
    for name, fused, unfused, ref in _cases(device, dtype):
        r = ref()
        err_f = (fused().double().cpu() - r).abs().max().item()
        err_t = (unfused().double().cpu() - r).abs().max().item()
        t_f = _median_time(fused, repeats, device)
        t_t = _median_time(unfused, repeats, device)
        ok &= err_f <= 2 * err_t + 1e-4
        print(f"{name:48s} {err_f:13.2e} {err_t:10.2e} {t_f * 1e3:8.2f}ms {t_t * 1e3:8.2f}ms "
              f"{t_t / t_f:7.2f}x")
    print("agreement: " + ("OK (error within 2x torch's own + 1e-4)" if ok else "FAILED"))
    return 0 if ok else 1
