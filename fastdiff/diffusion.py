"""DDPM training objective and samplers (Ho et al. 2020), the samplers on fused denoise_step.

Forward process q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I) (Eq. 4); the model
predicts the noise and is trained with L_simple (Eq. 14). Sampling: DDPM ancestral (Algorithm 2),
DDIM, DPM-Solver++ 2M or Euler, each step one ``denoise_step`` call whose coefficients come from
``fastdiff.schedules``; classifier-free guidance in diffusers' convention eps = u + s (c - u),
the model evaluated once on the batch [uncond; cond].
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from fastdiff import schedules

SOLVERS = ("ddpm", "ddpm_large", "ddim", "dpmpp_2m", "euler")


class GaussianDiffusion:
    """The fixed forward process: betas and alpha-bar in float64, T steps."""

    def __init__(self, beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02):
        self.T = num_train_timesteps
        self.betas = schedules.make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.alphas_cumprod = schedules.alphas_cumprod(self.betas)
        self._sqrt_ac = torch.tensor(np.sqrt(self.alphas_cumprod), dtype=torch.float32)
        self._sqrt_1mac = torch.tensor(np.sqrt(1 - self.alphas_cumprod), dtype=torch.float32)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps (Eq. 4); t: (B,) int64."""
        a = self._sqrt_ac.to(x0.device)[t].view(-1, *[1] * (x0.dim() - 1))
        s = self._sqrt_1mac.to(x0.device)[t].view(-1, *[1] * (x0.dim() - 1))
        return a * x0 + s * noise

    def loss(self, model, x0, labels=None, generator=None, t=None, noise=None,
             **cond) -> torch.Tensor:
        """L_simple (Eq. 14): || eps - eps_theta(x_t, t) ||^2 with t ~ U{0..T-1} and eps drawn
        from ``generator`` unless given."""
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), generator=generator, device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t.float(), labels, **cond), noise)

    def step_table(self, solver: str = "ddim", num_steps: int = 50,
                   eta: float = 0.0) -> schedules.StepTable:
        """The coefficient table of a solver, timesteps spaced as diffusers' defaults (DDPM clips
        the predicted x0 to [-1, 1], as diffusers does by default)."""
        T, ac = self.T, self.alphas_cumprod
        if solver not in SOLVERS:
            raise ValueError(f"'solver' must be one of {SOLVERS}, got {solver!r}")
        if not 1 <= num_steps <= T:
            raise ValueError(f"'num_steps' must be in [1, {T}], got {num_steps}")
        leading = (np.arange(num_steps) * (T // num_steps))[::-1]        # DDPM/DDIM default
        if solver in ("ddpm", "ddpm_large"):
            return schedules.ddpm_table(ac, leading, variance_type="fixed_large" if
                                        solver == "ddpm_large" else "fixed_small",
                                        clip_sample=True)
        if solver == "ddim":
            # No clipping: DDIM reuses the unclipped eps, and with guidance a clipped x0 next to
            # it drives samples off the data (Stable Diffusion's DDIM config does the same).
            return schedules.ddim_table(ac, leading, T, final_alpha_cumprod=1.0, eta=eta)
        sigmas = np.sqrt((1 - ac) / ac)
        if solver == "dpmpp_2m":
            ts = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
            sig = np.append(np.interp(ts, np.arange(T), sigmas), 0.0)
            return schedules.dpmpp_2m_table(sig, ts)
        ts = np.linspace(0, T - 1, num_steps)[::-1].copy()
        sig = np.append(np.interp(ts, np.arange(T), sigmas), 0.0)
        return schedules.euler_table(sig, ts)


@torch.no_grad()
def sample(model, diffusion: GaussianDiffusion, labels: torch.Tensor, *, solver: str = "ddim",
           num_steps: int = 50, guidance_scale: float = 1.5, seed: int = 0, eta: float = 0.0,
           progress_steps=(), progress_bar: bool = False, engine=None,
           sample_seeds=None, **cond):
    """Draws one sample per label. Returns (x_0 (B, C, S, S) in [-1, 1], {step: predicted x0}).

    labels: (B,) int64 class labels (the null label = unconditional). ``progress_steps`` lists
    step indices whose predicted x0 is kept (progressive decoding, Ho et al. 2020 Fig. 6).
    Same seed, same samples: the initial noise and every step's noise come from one generator.
    The loop runs on a ``fastdiff.engine.SamplingEngine`` (pass ``engine`` to reuse one and its
    CUDA graphs across calls). ``sample_seeds``: one seed per sample instead of ``seed``; each
    sample's noise (initial and per step) then comes from its own generator, so a sample does
    not depend on the batch it is drawn in (sharded generation).
    """
    from fastdiff.engine import SamplingEngine, fastdiff_model_fn

    c = model.config
    device = next(model.parameters()).device
    table = diffusion.step_table(solver, num_steps, eta)
    shape = (labels.shape[0], c.in_channels, c.image_size, c.image_size)
    if sample_seeds is not None:
        if len(sample_seeds) != shape[0]:
            raise ValueError(f"'sample_seeds' must hold one seed per label ({shape[0]}), got "
                             f"{len(sample_seeds)}")
        gen = [torch.Generator().manual_seed(int(s)) for s in sample_seeds]
        x = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gen])
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(shape, generator=gen)
    x = (x * table.init_noise_sigma).to(device)
    guided = guidance_scale != 1.0 and c.num_classes > 0
    if c.num_classes and hasattr(model, "check_labels"):
        model.check_labels(labels)          # on the host, once: the captured step cannot
    null = torch.full_like(labels, c.num_classes)
    model_cond = {"labels": (torch.cat([null, labels]) if guided else labels).to(device)}
    model_cond.update({k: (torch.cat([v, v]) if guided else v) for k, v in cond.items()
                       if v is not None})
    progressive = {}

    def keep(i, t, x, x0):
        if i in progress_steps:
            progressive[i] = x0.clone()

    if engine is None:
        engine = SamplingEngine(fastdiff_model_fn(model),
                                parameters=lambda: list(model.parameters()))
    x = engine.sample(x, table, model_cond, guidance_scale=guidance_scale, guided=guided,
                      generator=gen,
                      callback=keep if progress_steps else None,
                      progress_bar=f"sampling ({solver}, {num_steps} steps)" if progress_bar
                      else False)
    return x.clamp(-1, 1), progressive


class EMA:
    """Exponential moving average of the weights (decay per step), kept as a model copy."""

    def __init__(self, model, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p, 1 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)
