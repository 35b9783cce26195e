"""denoise_step driven by fastdiff.schedules tables against diffusers' own scheduler.step.

Each case runs a short sampling chain twice from the same start: once with the scheduler's
``step`` (guidance combined beforehand, diffusers' convention) and once with one fused
``denoise_step`` call per step, and compares every intermediate sample (and x0 where diffusers
returns it). The model output is a fixed random tensor per step plus a term in the sample, so
errors would compound along the chain.
"""
import numpy as np
import pytest
import torch
from conftest import BACKENDS, run_op

diffusers = pytest.importorskip("diffusers")

from fastdiff import schedules  # noqa: E402

SHAPE = (2, 3, 5, 7)   # odd spatial size, batch 2 (model output batch 4 with guidance)
GUIDANCE = 4.5


def make(name, steps=7, **cfg):
    sched = getattr(diffusers, name)(num_train_timesteps=1000, **cfg)
    sched.set_timesteps(steps)
    return sched


CASES = [
    # (scheduler class, config, step kwargs, table kwargs)
    ("DDPMScheduler", {}, {}, {}),
    ("DDPMScheduler", {"variance_type": "fixed_large", "prediction_type": "v_prediction"}, {}, {}),
    ("DDPMScheduler", {"prediction_type": "sample", "clip_sample": True,
                       "clip_sample_range": 0.8}, {}, {}),
    ("DDPMScheduler", {"beta_schedule": "squaredcos_cap_v2", "clip_sample": False}, {}, {}),
    ("DDIMScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                       "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
                       "steps_offset": 1}, {}, {}),
    ("DDIMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                       "clip_sample": False}, {}, {}),
    ("DDIMScheduler", {"clip_sample": True}, {"eta": 0.7},
     {"eta": 0.7}),
    ("DDIMScheduler", {"clip_sample": True, "prediction_type": "sample"},
     {"eta": 1.0, "use_clipped_model_output": True}, {"eta": 1.0, "use_clipped_model_output": True}),
    ("DPMSolverMultistepScheduler", {}, {}, {}),
    ("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction", "solver_type": "heun",
                                     "final_sigmas_type": "sigma_min"}, {}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                     "beta_schedule": "scaled_linear"}, {}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun",
                                     "prediction_type": "sample", "lower_order_final": False},
     {}, {}),
    ("EulerDiscreteScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                "beta_end": 0.012}, {}, {}),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction",
                                "timestep_spacing": "trailing"}, {}, {}),
    ("EulerDiscreteScheduler", {}, {"s_churn": 2.0}, {"s_churn": 2.0}),
]


def _noise(i, dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + i), dtype=dtype)


def _model_output(i, x):
    g = torch.Generator().manual_seed(i)
    base = torch.randn((2 * SHAPE[0],) + SHAPE[1:], generator=g)
    return base + 0.1 * torch.cat([x, x])


# Interpreted Triton is slow: it runs the first case of each scheduler.
_FIRST = {name: i for i, (name, *_) in reversed(list(enumerate(CASES)))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{c[0][:-9]}-{i}" for i, c in enumerate(CASES)])
def test_chain_matches_diffusers(backend, case):
    name, cfg, step_kw, table_kw = CASES[case]
    if backend == "triton" and _FIRST[name] != case:
        pytest.skip("interpreted Triton: the first case of each scheduler is enough")
    steps = 7
    ref_sched, sched = make(name, steps, **cfg), make(name, steps, **cfg)
    table = schedules.table_from_scheduler(sched, **table_kw)
    assert len(table) == len(sched.timesteps)
    torch.testing.assert_close(table.timesteps.double(), sched.timesteps.double())

    x0_init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    x_ref = x_ours = x0_init * float(sched.init_noise_sigma)
    state = torch.zeros(table.slots, *SHAPE) if table.slots else None
    for i, t in enumerate(ref_sched.timesteps):
        # diffusers: guidance, then step (noise from the same seeded stream we pass in)
        u, c = _model_output(i, x_ref).chunk(2)
        kw = dict(step_kw)
        if name in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
            kw["variance_noise"] = _noise(i)
        else:  # DDPM and Euler draw their noise from the generator
            kw["generator"] = torch.Generator().manual_seed(1000 + i)
        out = ref_sched.step(u + GUIDANCE * (c - u), t, x_ref, **kw)
        ours, x0 = run_op(backend, "denoise_step", _model_output(i, x_ours), x_ours, table.coeffs,
                          torch.tensor(i), _noise(i) if table.needs_noise else None, state,
                          GUIDANCE, table.clip_sample, table.clip_sample_range, True)
        scale = 1 + out.prev_sample.abs().max().item()
        torch.testing.assert_close(ours, out.prev_sample, atol=2e-5 * scale, rtol=2e-5,
                                   msg=lambda m: f"step {i} (t={int(t)}): {m}")
        if getattr(out, "pred_original_sample", None) is not None:
            torch.testing.assert_close(x0, out.pred_original_sample, atol=2e-5 * scale, rtol=2e-5)
        x_ref, x_ours = out.prev_sample, ours


def test_model_input_scale_matches_euler():
    sched = make("EulerDiscreteScheduler", 9)
    table = schedules.table_from_scheduler(sched)
    x = torch.ones(1)
    for i, t in enumerate(sched.timesteps):
        sched._step_index = i  # scale_model_input reads the scheduler's step counter
        expected = sched.scale_model_input(x, t)
        assert float(table.model_input_scale[i]) == pytest.approx(float(expected), rel=1e-6)
    assert table.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma))


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_match_diffusers(kind):
    sched = diffusers.DDPMScheduler(beta_schedule=kind, beta_start=0.00085, beta_end=0.012)
    ours = schedules.make_betas(kind, 1000, 0.00085, 0.012)
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, sched.betas.double().numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(schedules.alphas_cumprod(ours), sched.alphas_cumprod.double().numpy(),
                               rtol=1e-5, atol=1e-10)


def test_unsupported_scheduler_is_named():
    sched = diffusers.PNDMScheduler()
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="PNDMScheduler is not supported"):
        schedules.table_from_scheduler(sched)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="prediction_type"):
        schedules.ddpm_table(np.linspace(0.99, 0.01, 10), [9, 5, 0], prediction_type="eps")
    with pytest.raises(ValueError, match="variance_type"):
        schedules.ddpm_table(np.linspace(0.99, 0.01, 10), [9, 5, 0], variance_type="learned")
    with pytest.raises(ValueError, match="solver_order"):
        schedules.dpmpp_2m_table(np.array([2.0, 1.0, 0.0]), [9, 0], solver_order=3)
    with pytest.raises(ValueError, match="set_timesteps"):
        schedules.table_from_scheduler(diffusers.DDIMScheduler())


@pytest.mark.parametrize("kind", ["DDIMScheduler", "DDPMScheduler"])
@pytest.mark.parametrize("cfg,match", [
    ({"beta_end": 2.0}, "a beta reaches 1.*beta_end=2.0"),
    ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
     "zero terminal SNR.*rescale_betas_zero_snr=True"),
])
def test_degenerate_schedules_are_refused_naming_the_setting(kind, cfg, match):
    """Found by diffusers' own scheduler tests with the fused step installed: these raised
    ZeroDivisionError inside fastdiff, where diffusers' step returns non-finite values. The table
    is refused, so FusedStep runs diffusers' own step (equal to it by construction)."""
    from fastdiff.integrations.diffusers import schedulers as fused

    sched = getattr(diffusers, kind)(**cfg)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match=match):
        schedules.table_from_scheduler(sched)
    stock = getattr(diffusers, kind)(**cfg)
    stock.set_timesteps(10)
    step = fused.FusedStep(sched)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t = sched.timesteps[0]
    a = step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    b = stock.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(a, b, equal_nan=True)


def test_zero_terminal_snr_with_v_prediction_is_fused():
    cfg = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
               prediction_type="v_prediction")
    sched = diffusers.DDIMScheduler(**cfg)
    sched.set_timesteps(10)
    table = schedules.table_from_scheduler(sched)
    assert torch.isfinite(table.coeffs).all()
