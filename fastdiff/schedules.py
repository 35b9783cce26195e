"""Noise schedules (float64) and the per-step coefficient tables that drive ``denoise_step``.

A sampler step of any supported solver is, per element, an affine map of a few tensors with
per-step scalar coefficients: the sample x, the guided model output m, the noise n and up to
five state slots the solver keeps between model evaluations. ``denoise_step`` reads one row of
such a table (``step_index`` is a device tensor, so a captured CUDA graph can be replayed for
every step) and updates the slots in place; the row's layout and meaning are "the step row,
version 2" at the end of this file (kernels/denoise_step.py keeps a copy of the layout for the
C++, held to this one by the tests).

The builders below compute, in float64 with the formulas of diffusers' schedulers
(scheduling_ddpm.py, scheduling_ddim.py, scheduling_dpmsolver_multistep.py,
scheduling_euler_discrete.py) and the same order-selection rules, the eight coefficients of
their common form

    x_hat = x + H * n                                  (Euler "churn", else H = 0)
    x0    = P_x * x_hat + P_m * m
    x0c   = clip(x0, -r, r) if clip_sample else x0
    out   = K_x * x_hat + K_0 * x0c + K_m * m + K_p * prev_x0 + K_n * n

and ``_row`` turns them into a version-2 row (prev_x0 is slot 0, which the multistep rows write
with x0c). ``table_from_scheduler`` reads a configured diffusers scheduler. The guidance
convention is diffusers': m = u + s * (c - u).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class StepTable:
    """Everything a sampling loop needs, per step i of S.

    coeffs: (S, ROW_LEN) float32 rows for ``denoise_step`` ("the step row, version 2");
    timesteps: (S,) model timesteps; model_input_scale: (S,) factor applied to the sample before
    the model (Euler's ``scale_model_input``, 1 elsewhere); init_noise_sigma: std of the initial
    noise. needs_noise: some row reads the noise (``noise_rows`` says which). slots: how many
    state slots the rows use: a sampling loop passes ``denoise_step`` a state of
    (slots, *sample.shape), zeros before the first step (none when 0). draws: (S,) bool, the
    steps at which an eager loop draws noise (None: those whose row reads it; a table read from
    a diffusers scheduler says where its step draws, so a seeded generator's stream matches).
    threshold: (ratio, max_value) of dynamic thresholding (DDPM, DDIM), applied to the row's x0
    after the op (``apply_threshold``); None: none.
    """

    solver: str
    coeffs: torch.Tensor
    timesteps: torch.Tensor
    model_input_scale: torch.Tensor
    init_noise_sigma: float = 1.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    needs_noise: bool = False
    slots: int = 0
    draws: torch.Tensor | None = None
    threshold: tuple | None = None

    def __len__(self):
        return self.coeffs.shape[0]

    def to(self, device) -> "StepTable":
        return StepTable(**{**self.__dict__, "coeffs": self.coeffs.to(device)})


# ---------------------------------------------------------------- noise schedules (float64)

def make_betas(kind: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> np.ndarray:
    """beta_1..beta_T in float64: 'linear' (Ho et al. 2020, Sec. 4), 'scaled_linear' (Stable
    Diffusion: linear in sqrt(beta)) or 'squaredcos_cap_v2' (cosine, Nichol & Dhariwal 2021, Eq. 17)."""
    T = num_train_timesteps
    if kind == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    if kind in ("squaredcos_cap_v2", "cosine"):
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    raise ValueError(f"beta schedule 'kind' must be 'linear', 'scaled_linear' or "
                     f"'squaredcos_cap_v2', got {kind!r}")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """alpha-bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, Eq. 4), float64."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


# ---------------------------------------------------------------- per-solver tables

def _check_prediction(prediction_type):
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"'prediction_type' must be one of {PREDICTION_TYPES}, got "
                         f"{prediction_type!r}")


def _x0_from_alpha_sigma(prediction_type, alpha, sigma):
    """(P_x, P_m) with x0 = P_x x + P_m m, for x = alpha x0 + sigma eps (VP form)."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma
    return 0.0, 1.0


def _eps_from_alpha_sigma(prediction_type, alpha, sigma):
    """(E_x, E_m) with eps = E_x x + E_m m, before any clipping of x0."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return sigma, alpha
    return 1.0 / sigma, -alpha / sigma


def _row(h, px, pm, kx, k0, km, kp, kn, keep_x0=False) -> list[float]:
    """The version-2 row of the eight coefficients above (float64): x_hat expanded, prev_x0 read
    from slot 0; keep_x0: the row also writes x0c into slot 0 for the next step to read."""
    return step_row(p={"x": px, "m": pm, "n": px * h},
                    o={"x": kx, "m": km, "n": kx * h + kn, "s0": kp, "x0": k0},
                    writes={0: {"x0": 1.0}} if keep_x0 else None)


def _table(rows) -> torch.Tensor:
    return torch.tensor(np.asarray(rows, dtype=np.float64).reshape(-1, ROW_LEN),
                        dtype=torch.float32)


def noise_rows(coeffs: torch.Tensor) -> torch.Tensor:
    """(S,) bool: the rows of a table that read the noise (a non-zero coefficient of n in the
    x0, the next sample or a slot the row writes): the steps at which a loop draws it."""
    c = coeffs.to(torch.float64)
    written = c[:, ROW_W:ROW_S] != 0
    slots = (c[:, ROW_S:].reshape(-1, SLOTS, NUM_V + 1)[:, :, V_N] != 0) & written
    return (c[:, ROW_P + V_N] != 0) | (c[:, ROW_O + V_N] != 0) | slots.any(1)


def ddpm_table(alphas_cumprod: np.ndarray, timesteps, prediction_type: str = "epsilon",
               variance_type: str = "fixed_small", clip_sample: bool = False,
               clip_sample_range: float = 1.0) -> StepTable:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2 and Eq. 7), as diffusers'
    DDPMScheduler: x_{t'} = c0 x0 + ct x_t + sigma_t n, with t' the next timestep of the list.
    variance_type: 'fixed_small' (sigma^2 = beta-tilde) or 'fixed_large' (sigma^2 = beta)."""
    _check_prediction(prediction_type)
    if variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise ValueError("'variance_type' must be 'fixed_small', 'fixed_small_log' or "
                         f"'fixed_large', got {variance_type!r}")
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    ts = [int(t) for t in timesteps]
    rows = []
    for i, t in enumerate(ts):
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else 1.0
        alpha_t = a_t / a_prev
        beta_t = 1.0 - alpha_t
        px, pm = _x0_from_alpha_sigma(prediction_type, math.sqrt(a_t), math.sqrt(1 - a_t))
        if variance_type == "fixed_large":
            var = beta_t
        else:
            var = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
        rows.append(_row(0.0, px, pm,
                         math.sqrt(alpha_t) * (1 - a_prev) / (1 - a_t),   # K_x
                         math.sqrt(a_prev) * beta_t / (1 - a_t),          # K_0
                         0.0, 0.0,
                         math.sqrt(var) if t > 0 else 0.0))               # K_n
    return StepTable("ddpm", _table(rows), torch.tensor(ts), torch.ones(len(ts), dtype=torch.float64),
                     clip_sample=clip_sample, clip_sample_range=clip_sample_range, needs_noise=True)


def ddim_table(alphas_cumprod: np.ndarray, timesteps, num_train_timesteps: int,
               final_alpha_cumprod: float = 1.0, eta: float = 0.0,
               prediction_type: str = "epsilon", clip_sample: bool = False,
               clip_sample_range: float = 1.0, use_clipped_model_output: bool = False) -> StepTable:
    """DDIM (Song et al. 2021, Eq. 12) as diffusers' DDIMScheduler: the previous timestep is
    t - T // S, sigma_t = eta * sqrt(beta-tilde) (Eq. 16)."""
    _check_prediction(prediction_type)
    if not eta >= 0:
        raise ValueError(f"'eta' must be >= 0, got {eta}")
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    ts = [int(t) for t in timesteps]
    step = num_train_timesteps // len(ts)
    rows = []
    for t in ts:
        prev = t - step
        a_t = ac[t]
        a_prev = ac[prev] if prev >= 0 else float(final_alpha_cumprod)
        alpha, sigma = math.sqrt(a_t), math.sqrt(1 - a_t)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * math.sqrt(var)
        d = math.sqrt(max(1 - a_prev - std ** 2, 0.0))      # direction pointing to x_t
        px, pm = _x0_from_alpha_sigma(prediction_type, alpha, sigma)
        kx, k0, km = 0.0, math.sqrt(a_prev), 0.0
        if use_clipped_model_output:                        # eps from the clipped x0
            kx, k0 = d / sigma, k0 - d * alpha / sigma
        else:
            ex, em = _eps_from_alpha_sigma(prediction_type, alpha, sigma)
            kx, km = d * ex, d * em
        rows.append(_row(0.0, px, pm, kx, k0, km, 0.0, std))
    return StepTable("ddim", _table(rows), torch.tensor(ts), torch.ones(len(ts), dtype=torch.float64),
                     clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                     needs_noise=eta > 0)


def dpmpp_2m_table(sigmas: np.ndarray, timesteps, prediction_type: str = "epsilon",
                   algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                   solver_order: int = 2, lower_order_final: bool = True,
                   euler_at_final: bool = False, final_sigmas_type: str = "zero",
                   start: int = 0) -> StepTable:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) as diffusers' DPMSolverMultistepScheduler.

    sigmas: (S + 1,) with sigma = sqrt((1 - alpha-bar) / alpha-bar), the last one final.
    Order selection as diffusers: first order at the first step taken (``start``: a loop that
    begins later, as img2img's does, has no history there) and, under lower_order_final, at the
    last step; the multistep update reads the previous step's x0 from state slot 0, which every
    row of a second-order table writes (``slots`` = 1). The table holds the rows from ``start``
    on."""
    _check_prediction(prediction_type)
    if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
        raise ValueError("'algorithm_type' must be 'dpmsolver++' or 'sde-dpmsolver++', got "
                         f"{algorithm_type!r}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"'solver_type' must be 'midpoint' or 'heun', got {solver_type!r}")
    if solver_order not in (1, 2):
        raise ValueError(f"'solver_order' must be 1 or 2, got {solver_order}")
    sig = np.asarray(sigmas, dtype=np.float64)
    S = len(sig) - 1
    alphas = 1.0 / np.sqrt(sig ** 2 + 1)
    sigmas_t = sig * alphas
    with np.errstate(divide="ignore"):
        lambdas = np.log(alphas) - np.log(sigmas_t)
    sde = algorithm_type == "sde-dpmsolver++"
    rows = []
    for i in range(start, S):
        lower_final = i == S - 1 and (euler_at_final or (lower_order_final and S < 15)
                                      or final_sigmas_type == "zero")
        first = solver_order == 1 or i == start or lower_final
        a_t, s_t, s_s0 = alphas[i + 1], sigmas_t[i + 1], sigmas_t[i]
        h = lambdas[i + 1] - lambdas[i]
        px, pm = _x0_from_alpha_sigma(prediction_type, alphas[i], sigmas_t[i])
        em1 = math.expm1(-h) if math.isfinite(h) else -1.0            # exp(-h) - 1
        e2 = -math.expm1(-2 * h) if math.isfinite(h) else 1.0         # 1 - exp(-2h)
        kx = s_t / s_s0 * (1 + em1 if sde else 1.0)
        kn = s_t * math.sqrt(e2) if sde else 0.0
        c0 = a_t * e2 if sde else -a_t * em1                          # weight of D0
        kp = 0.0
        k0 = c0
        if not first:
            r0 = (lambdas[i] - lambdas[i - 1]) / h
            if solver_type == "midpoint":
                c1 = 0.5 * c0
            elif sde:
                c1 = a_t * (e2 / (-2 * h) + 1.0)
            else:
                c1 = a_t * (em1 / h + 1.0)
            # D1 = (x0 - prev_x0) / r0
            k0, kp = c0 + c1 / r0, -c1 / r0
        rows.append(_row(0.0, px, pm, kx, k0, 0.0, kp, kn, keep_x0=solver_order == 2))
    return StepTable(algorithm_type, _table(rows),
                     torch.as_tensor(np.asarray(timesteps))[start:],
                     torch.ones(S - start, dtype=torch.float64), needs_noise=sde,
                     slots=1 if solver_order == 2 else 0)


def euler_table(sigmas: np.ndarray, timesteps, prediction_type: str = "epsilon",
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                s_noise: float = 1.0, init_noise_sigma: float | None = None) -> StepTable:
    """Euler (Karras et al. 2022, Algorithm 2) as diffusers' EulerDiscreteScheduler: sigmas are
    (S + 1,) in the variance-exploding parametrisation; the model sees x / sqrt(sigma^2 + 1)."""
    _check_prediction(prediction_type)
    sig = np.asarray(sigmas, dtype=np.float64)
    S = len(sig) - 1
    rows = []
    for i in range(S):
        s = sig[i]
        gamma = min(s_churn / S, 2 ** 0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (gamma + 1)
        h = s_noise * math.sqrt(s_hat ** 2 - s ** 2) if gamma > 0 else 0.0
        if prediction_type == "epsilon":
            px, pm = 1.0, -s_hat
        elif prediction_type == "v_prediction":
            px, pm = 1.0 / (s ** 2 + 1), -s / math.sqrt(s ** 2 + 1)
        else:
            px, pm = 0.0, 1.0
        dt = sig[i + 1] - s_hat
        rows.append(_row(h, px, pm, 1.0 + dt / s_hat, -dt / s_hat, 0.0, 0.0, 0.0))
    return StepTable("euler", _table(rows), torch.as_tensor(np.asarray(timesteps)),
                     torch.tensor(1.0 / np.sqrt(sig[:-1] ** 2 + 1)),
                     init_noise_sigma=(math.sqrt(sig.max() ** 2 + 1) if init_noise_sigma is None
                                       else float(init_noise_sigma)),
                     needs_noise=s_churn > 0)


# ---------------------------------------------------------------- from a diffusers scheduler

def table_from_scheduler(scheduler, eta: float = 0.0, use_clipped_model_output: bool = False,
                         s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                         s_noise: float = 1.0, start: int = 0) -> StepTable:
    """The table of a diffusers scheduler on which ``set_timesteps`` has been called.

    Supports DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler (dpmsolver++ and
    sde-dpmsolver++, order <= 2) and EulerDiscreteScheduler; the step-call options (eta, churn)
    are arguments here because diffusers passes them to ``step``. start: the step a loop begins
    at (img2img skips the first ones): the rows from there on, as the scheduler steps them
    when its first ``step`` call is that one.
    """
    _check_schedule(scheduler)
    try:
        table = _full_table(scheduler, eta, use_clipped_model_output, s_churn, s_tmin, s_tmax,
                            s_noise, start)
    except (ZeroDivisionError, OverflowError) as err:
        raise ValueError(f"{type(scheduler).__name__}: degenerate schedule ({err}) with "
                         f"{_settings(scheduler.config)}") from None
    if start and len(table) != len(scheduler.timesteps) - start:
        table = StepTable(**{**table.__dict__, "coeffs": table.coeffs[start:],
                             "timesteps": table.timesteps[start:],
                             "model_input_scale": table.model_input_scale[start:]})
    return table


def _settings(cfg) -> str:
    keys = ("beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
            "prediction_type", "timestep_spacing")
    return ", ".join(f"{k}={cfg[k]!r}" for k in keys if k in cfg and cfg[k] is not None)


def _check_schedule(scheduler) -> None:
    """Refuses, naming the scheduler's settings, a schedule whose steps are undefined: cumulative
    alphas outside [0, 1] (betas >= 1 before the end, e.g. beta_end > 1), or a zero one (zero
    terminal SNR) where an epsilon prediction must be divided by it. diffusers' own step returns
    non-finite values there; FusedStep then runs that step."""
    name = type(scheduler).__name__
    cfg = scheduler.config
    if name not in ("DDPMScheduler", "DDIMScheduler"):
        return                                          # sigma-parametrised: finite sigmas
    ac = scheduler.alphas_cumprod.double()[scheduler.timesteps.long().cpu()]
    if not (torch.isfinite(ac).all() and (ac >= 0).all() and (ac <= 1).all()):
        raise ValueError(f"{name}: alphas_cumprod leaves [0, 1] (betas reach 1: "
                         f"{_settings(cfg)}); its steps are undefined")
    if cfg.prediction_type == "epsilon" and (ac == 0).any():
        why = ("zero terminal SNR" if cfg.get("rescale_betas_zero_snr") else
               "a beta reaches 1")
        raise ValueError(f"{name}: alphas_cumprod is 0 at a sampled timestep ({why}) and an "
                         f"epsilon prediction cannot give x0 there ({_settings(cfg)})")


def _full_table(scheduler, eta, use_clipped_model_output, s_churn, s_tmin, s_tmax, s_noise,
                start):
    name = type(scheduler).__name__
    cfg = scheduler.config
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError(f"call {name}.set_timesteps(...) before building its table")
    threshold = None
    if cfg.get("thresholding", False):
        if name not in ("DDPMScheduler", "DDIMScheduler"):
            raise ValueError(f"{name} with thresholding=True is not supported by denoise_step")
        # diffusers thresholds instead of clipping: the rows' x0 runs unclipped through the op
        threshold = (float(cfg.dynamic_thresholding_ratio), float(cfg.sample_max_value))
    ac = scheduler.alphas_cumprod.double().cpu().numpy()
    ts = scheduler.timesteps.cpu()
    clip = bool(cfg.get("clip_sample", False)) and threshold is None
    if name == "DDPMScheduler":
        table = ddpm_table(ac, ts, cfg.prediction_type, cfg.variance_type, clip,
                           cfg.clip_sample_range)
        return StepTable(**{**table.__dict__, "threshold": threshold})
    if name == "DDIMScheduler":
        table = ddim_table(ac, ts, cfg.num_train_timesteps, float(scheduler.final_alpha_cumprod),
                           eta, cfg.prediction_type, clip, cfg.clip_sample_range,
                           use_clipped_model_output)
        return StepTable(**{**table.__dict__, "threshold": threshold})
    if name == "DPMSolverMultistepScheduler":
        return dpmpp_2m_table(scheduler.sigmas.double().cpu().numpy(), ts, cfg.prediction_type,
                              cfg.algorithm_type, cfg.solver_type, cfg.solver_order,
                              cfg.lower_order_final, cfg.euler_at_final, cfg.final_sigmas_type,
                              start)
    if name == "EulerDiscreteScheduler":
        return euler_table(scheduler.sigmas.double().cpu().numpy(), ts, cfg.prediction_type,
                           s_churn, s_tmin, s_tmax, s_noise, float(scheduler.init_noise_sigma))
    raise ValueError(f"scheduler {name} is not supported; expected DDPMScheduler, DDIMScheduler, "
                     "DPMSolverMultistepScheduler or EulerDiscreteScheduler")


# ---------------------------------------------------------------- the step row, version 2
# One row per model evaluation, over the inputs v = (x, m, n, s_0, ..., s_4): the sample, the
# (guided) model output, this step's noise and five state slots (multistep histories, a saved
# sample, a derivative: whatever the solver keeps between evaluations; five for PNDM's
# Runge-Kutta warm-up). A row is three affine
# maps of v and the slot updates:
#   x0  = sum_k P_k v_k,  x0c = clip(x0, -r, r) if clip_sample else x0     (the returned x0)
#   out = sum_k O_k v_k + O_x0 * x0c                                       (the next sample)
#   s_j <- sum_k S_jk v_k + S_j,x0 * x0c   for every slot j with W_j != 0  (old slots read)
# Unwritten slots keep their values; coefficients of slots a call does not pass must be 0. The
# table grows with the solvers (one kernel still serves all); solvers that keep no state use
# only P and O. ROW_* are the column offsets; a table is (S, ROW_LEN) float32.
SLOTS = 5
V_X, V_M, V_N = 0, 1, 2                     # v index of x, m and n; slot j is V_S + j
V_S = 3
NUM_V = V_S + SLOTS                         # 8 inputs; index NUM_V in O and S rows: x0c
ROW_P = 0
ROW_O = ROW_P + NUM_V
ROW_W = ROW_O + NUM_V + 1
ROW_S = ROW_W + SLOTS
ROW_LEN = ROW_S + SLOTS * (NUM_V + 1)       # 67


def step_row(p=None, o=None, writes=None) -> list[float]:
    """A row from named coefficients: p and o map input names ('x', 'm', 'n', 's0'..'s4'; o
    also 'x0') to coefficients; writes maps a slot index to such a mapping (its new value)."""
    names = {"x": V_X, "m": V_M, "n": V_N, **{f"s{j}": V_S + j for j in range(SLOTS)},
             "x0": NUM_V}
    row = [0.0] * ROW_LEN
    for k, c in (p or {}).items():
        if k == "x0":
            raise ValueError("x0 cannot depend on itself")
        row[ROW_P + names[k]] = float(c)
    for k, c in (o or {}).items():
        row[ROW_O + names[k]] = float(c)
    for j, coefs in (writes or {}).items():
        row[ROW_W + j] = 1.0
        for k, c in coefs.items():
            row[ROW_S + j * (NUM_V + 1) + names[k]] = float(c)
    return row


def threshold_x0(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Sec. 2.3; diffusers' ``_threshold_sample``):
    per sample, s = the ``ratio`` quantile of |x0| clamped to [1, max_value]; x0 clamped to
    [-s, s] and divided by s. In float32 (float64 stays), as diffusers computes it."""
    dt = x0.dtype if x0.dtype == torch.float64 else torch.float32
    flat = x0.to(dt).reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(1.0, max_value).unsqueeze(1)
    return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape)


def apply_threshold(out: torch.Tensor, x0: torch.Tensor, coeffs: torch.Tensor,
                    step_index: torch.Tensor, ratio: float, max_value: float):
    """(next sample, x0) of a thresholded row from the op's unthresholded ones: the row's next
    sample reads its x0 only through O_x0 (the clip path), so it moves by O_x0 (x0t - x0).
    A few small kernels after the op, all on the device (the row's O_x0 is gathered there)."""
    x0t = threshold_x0(x0, ratio, max_value)
    k = coeffs.index_select(0, step_index.reshape(-1).long())[0, ROW_O + NUM_V]
    new = out.to(x0t.dtype) + k.to(x0t.dtype) * (x0t - x0.to(x0t.dtype))
    return new.to(out.dtype), x0t.to(x0.dtype)


def absent_slot_columns(k: int) -> list[int]:
    """The columns that must be 0 in a row run with k state slots (slots k..SLOTS-1 not passed):
    their coefficients in the x0 and next-sample maps, their W, and their coefficients in the
    new values of the k slots passed. (denoise_step checks them on the CPU; on a GPU they are
    read as zeros.)"""
    cols = []
    for j in range(k, SLOTS):
        cols += [ROW_P + V_S + j, ROW_O + V_S + j, ROW_W + j]
        cols += [ROW_S + i * (NUM_V + 1) + V_S + j for i in range(k)]
    return cols
