"""Version-2 step rows of every fused scheduler family (issue 14), chained against diffusers.

Each case builds a scheduler from its config (no download), drives it for its whole schedule
(at least 10 calls) through ``schedulers.RowStep`` (the row read by ``tables.table_for``, run by
reference.denoise_step_v2) and, in lockstep, a twin through diffusers' own ``step`` with the
same model outputs (a function of each one's own sample, so errors propagate) and the same noise
(the same generator seed). Guided cases pass [uncond; cond] to the row call, which combines
them; diffusers gets u + g (c - u). Latents are 1x4x8x8.
"""
import copy
import logging

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

from fastdiff.integrations.diffusers import schedulers as SC  # noqa: E402
from fastdiff.integrations.diffusers import tables  # noqa: E402

# diffusers' own warnings, not ours: KDPM2's np.log of a tensor (numpy 2), the deprecated
# algorithm types dpmsolver / sde-dpmsolver (tested while diffusers has them)
pytestmark = [pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context"),
              pytest.mark.filterwarnings("ignore:`algorithm_types=dpmsolver`:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`algorithm_types dpmsolver:FutureWarning")]

SHAPE = (1, 4, 8, 8)
RTOL = 1e-5
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
          beta_schedule="scaled_linear")
# SD1.5's scheduler_config.json (PNDMScheduler, its default scheduler)
SD15_PNDM = dict(SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                 trained_betas=None, clip_sample=False)
EDM = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)


def _model(x, t, k, seed):
    """A stand-in model output: depends on the sample (errors propagate) and the call."""
    g = torch.Generator().manual_seed(seed * 1000 + k)
    r = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(x.dtype)
    return 0.6 * r + 0.3 * x / (1 + x.abs().amax())


def _err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def chain(cls, cfg, steps=10, step_kw=None, set_kw=None, guided=False, dtype=torch.float32,
          rtol=RTOL, min_calls=10, begin=0, own_first=0, own=(), noise_kw=None):
    """Runs the rows and diffusers side by side; returns the RowStep. begin: the loop starts at
    that index (img2img: set_begin_index); own_first: the first calls of the rows' scheduler
    run diffusers' step (the rows take over from the state it leaves); own: calls that do too,
    between rows. noise_kw: the step's noise as a tensor argument (e.g. "variance_noise"), the
    same drawn for both, instead of a generator."""
    cls = getattr(diffusers, cls)
    a, b = cls.from_config(cfg), cls.from_config(cfg)       # as a pipeline loads it
    for s in (a, b):
        s.set_timesteps(steps, **(set_kw or {}))
        if begin:
            s.set_begin_index(begin)
    step = SC.RowStep(a)
    assert step.family.unsupported_rows(a.config) is None
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    xa = xb = (x0 * float(b.init_noise_sigma)).to(dtype)
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    kw = dict(step_kw or {})
    takes_gen = "generator" in cls.step.__code__.co_varnames
    calls = 0
    for k, t in enumerate(b.timesteps[begin:]):
        ia, ib = a.scale_model_input(xa, t), b.scale_model_input(xb, t)
        if noise_kw:
            kw[noise_kw] = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99 + k))
            takes_gen = False
        if k < own_first or k in own:
            oa = step.original(_model(ia, t, k, 1), t, xa, **kw,
                               **({"generator": ga} if takes_gen else {}))
            mb = _model(ib, t, k, 1)
        elif guided:
            ua, ca = _model(ia, t, k, 1), _model(ia, t, k, 2)
            ub, cb = _model(ib, t, k, 1), _model(ib, t, k, 2)
            oa = step.guided(torch.cat([ua, ca]), 7.5, t, xa, **kw,
                             **({"generator": ga} if takes_gen else {}))
            mb = ub + 7.5 * (cb - ub)
        else:
            oa = step(_model(ia, t, k, 1), t, xa, **kw, **({"generator": ga} if takes_gen else {}))
            mb = _model(ib, t, k, 1)
        ob = b.step(mb, t, xb, **kw, **({"generator": gb} if takes_gen else {}))
        assert type(oa) is type(ob)
        for f in ob.keys():
            va, vb = getattr(oa, f), getattr(ob, f)
            if torch.is_tensor(vb):
                assert va.dtype == vb.dtype and va.shape == vb.shape, f
                e = _err(va, vb)
                assert e <= rtol, f"call {k} (t={float(t):g}) {f}: relative error {e:.3g}"
        xa, xb = oa.prev_sample, ob.prev_sample
        calls += 1
    assert calls >= min_calls
    assert step.rows.start is not None                  # the rows ran (not diffusers' step)
    return step


def _no_fallback(caplog):
    bad = [r.getMessage() for r in caplog.records if "diffusers' step used" in r.getMessage()]
    assert not bad, bad


# (scheduler class, config, set_timesteps steps, step kwargs, set_timesteps kwargs)
CASES = {
    # PNDM: SD1.5's default first
    "pndm-sd15": ("PNDMScheduler", SD15_PNDM, 10, None, None),
    "pndm-sd15-v": ("PNDMScheduler", dict(SD15_PNDM, prediction_type="v_prediction"), 10, None,
                    None),
    "pndm-linspace": ("PNDMScheduler", dict(SD15_PNDM, timestep_spacing="linspace",
                                            steps_offset=0), 12, None, None),
    "pndm-trailing": ("PNDMScheduler", dict(SD15_PNDM, timestep_spacing="trailing",
                                            steps_offset=0), 12, None, None),
    # Euler ancestral
    "euler-a": ("EulerAncestralDiscreteScheduler", dict(SD, steps_offset=1), 10, None, None),
    "euler-a-v-trailing-zsnr": ("EulerAncestralDiscreteScheduler",
                                dict(SD, prediction_type="v_prediction",
                                     timestep_spacing="trailing", rescale_betas_zero_snr=True),
                                10, None, None),
    "euler-a-linspace": ("EulerAncestralDiscreteScheduler", dict(SD, timestep_spacing="linspace"),
                         10, None, None),
    # Euler (the version-1 family, as rows too)
    "euler-karras-churn": ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True), 10,
                           dict(s_churn=0.5), None),
    "euler-exponential": ("EulerDiscreteScheduler", dict(SD, use_exponential_sigmas=True), 10,
                          None, None),
    "euler-beta-sample": ("EulerDiscreteScheduler", dict(SD, use_beta_sigmas=True,
                                                         prediction_type="sample"),
                          10, None, None),
    # DDPM / DDIM
    "ddpm-custom-timesteps": ("DDPMScheduler", dict(SD), None, None,
                              dict(timesteps=[980, 900, 800, 700, 560, 420, 300, 200, 120, 60,
                                              20, 0])),
    "ddpm-v-zsnr-trailing": ("DDPMScheduler", dict(SD, prediction_type="v_prediction",
                                                   rescale_betas_zero_snr=True,
                                                   timestep_spacing="trailing"), 10, None, None),
    "ddim-v-zsnr-trailing": ("DDIMScheduler", dict(SD, prediction_type="v_prediction",
                                                   rescale_betas_zero_snr=True,
                                                   timestep_spacing="trailing",
                                                   set_alpha_to_one=False), 10, None, None),
    "ddim-eta": ("DDIMScheduler", dict(SD, set_alpha_to_one=False, steps_offset=1), 10,
                 dict(eta=0.7), None),
    "ddim-clip": ("DDIMScheduler", dict(SD, clip_sample=True, clip_sample_range=1.0), 10,
                  dict(eta=0.3), None),
    # LCM
    "lcm": ("LCMScheduler", dict(SD, original_inference_steps=50, set_alpha_to_one=True,
                                 timestep_scaling=10.0), 10, None, None),
    "lcm-custom-timesteps": ("LCMScheduler", dict(SD), None, None,
                             dict(timesteps=[999, 919, 839, 759, 679, 599, 499, 399, 299, 199,
                                             99, 19])),
    # Heun, KDPM2, KDPM2 ancestral (two evaluations a step)
    "heun": ("HeunDiscreteScheduler", dict(SD), 6, None, None),
    "heun-karras-v": ("HeunDiscreteScheduler", dict(SD, use_karras_sigmas=True,
                                                    prediction_type="v_prediction"), 6, None,
                      None),
    "kdpm2": ("KDPM2DiscreteScheduler", dict(SD), 6, None, None),
    "kdpm2-karras": ("KDPM2DiscreteScheduler", dict(SD, use_karras_sigmas=True), 6, None, None),
    "kdpm2-a": ("KDPM2AncestralDiscreteScheduler", dict(SD), 6, None, None),
    "kdpm2-a-karras-v": ("KDPM2AncestralDiscreteScheduler",
                         dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), 6,
                         None, None),
    # EDM
    "edm-euler": ("EDMEulerScheduler", dict(EDM), 10, None, None),
    "edm-euler-churn": ("EDMEulerScheduler", dict(EDM), 10, dict(s_churn=1.0), None),
    "edm-euler-v-exp": ("EDMEulerScheduler", dict(EDM, prediction_type="v_prediction",
                                                  sigma_schedule="exponential"), 10, None, None),
    "lms": ("LMSDiscreteScheduler", dict(SD), 10, None, None),
}
for _order in (1, 2, 3):
    for _alg in ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"):
        if (_order, _alg) == (3, "sde-dpmsolver"):
            continue                    # no third order in diffusers: its own step fails
        # diffusers refuses final_sigmas_type='zero' (its default) for dpmsolver, sde-dpmsolver
        final = "zero" if _alg.endswith("++") else "sigma_min"
        CASES[f"dpm-o{_order}-{_alg}"] = ("DPMSolverMultistepScheduler",
                                          dict(SD, solver_order=_order, algorithm_type=_alg,
                                               final_sigmas_type=final), 10, None, None)
    for _bh in ("bh1", "bh2"):
        # bh1's last step to sigma 0 is NaN in diffusers itself (0.42): sigma_min there
        CASES[f"unipc-o{_order}-{_bh}"] = ("UniPCMultistepScheduler",
                                           dict(SD, solver_order=_order, solver_type=_bh,
                                                final_sigmas_type="sigma_min" if _bh == "bh1"
                                                else "zero"), 10, None, None)
    CASES[f"deis-o{_order}"] = ("DEISMultistepScheduler", dict(SD, solver_order=_order), 10,
                                None, None)
    for _alg in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"):
        final = "zero" if _alg.endswith("++") else "sigma_min"
        CASES[f"dpm-single-o{_order}-{_alg}"] = (
            "DPMSolverSinglestepScheduler", dict(SD, solver_order=_order, algorithm_type=_alg,
                                                 final_sigmas_type=final), 10, None, None)
    for _alg in ("dpmsolver++", "sde-dpmsolver++")[:1 + (_order < 3)]:    # sde: no order 3
        CASES[f"edm-dpm-o{_order}-{_alg}"] = ("EDMDPMSolverMultistepScheduler",
                                              dict(EDM, solver_order=_order, algorithm_type=_alg),
                                              10, None, None)
CASES.update({
    "dpm-o2-karras-midpoint-v": ("DPMSolverMultistepScheduler",
                                 dict(SD, use_karras_sigmas=True, solver_type="midpoint",
                                      prediction_type="v_prediction"), 10, None, None),
    "dpm-o2-sde++-karras-zero": ("DPMSolverMultistepScheduler",
                                 dict(SD, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++",
                                      final_sigmas_type="zero"), 10, None, None),
    "dpm-o3-exponential-trailing": ("DPMSolverMultistepScheduler",
                                    dict(SD, solver_order=3, use_exponential_sigmas=True,
                                         timestep_spacing="trailing"), 10, None, None),
    "dpm-o2-lu-lambdas-euler-final": ("DPMSolverMultistepScheduler",
                                      dict(SD, use_lu_lambdas=True, euler_at_final=True), 10,
                                      None, None),
    "unipc-o2-no-corrector-first": ("UniPCMultistepScheduler",
                                    dict(SD, disable_corrector=[0, 1, 5]), 10, None, None),
    "unipc-o3-no-lower-order-final-v": ("UniPCMultistepScheduler",
                                        dict(SD, solver_order=3, lower_order_final=False,
                                             prediction_type="v_prediction",
                                             final_sigmas_type="sigma_min"), 10, None, None),
    "unipc-o2-karras-bh1-noise-pred": ("UniPCMultistepScheduler",
                                       dict(SD, use_karras_sigmas=True, solver_type="bh1",
                                            predict_x0=False, final_sigmas_type="sigma_min"),
                                       10, None, None),
    "unipc-o2-leading-zsnr-v-sigma-min": ("UniPCMultistepScheduler",
                                          dict(SD, timestep_spacing="leading", steps_offset=1,
                                               rescale_betas_zero_snr=True,
                                               prediction_type="v_prediction",
                                               final_sigmas_type="sigma_min"), 10, None, None),
    "dpm-o2-beta-sigmas": ("DPMSolverMultistepScheduler", dict(SD, use_beta_sigmas=True), 10,
                           None, None),
    "dpm-o2-sample": ("DPMSolverMultistepScheduler", dict(SD, prediction_type="sample"), 10,
                      None, None),
    "unipc-o2-sample-exponential": ("UniPCMultistepScheduler",
                                    dict(SD, prediction_type="sample",
                                         use_exponential_sigmas=True), 10, None, None),
    "kdpm2-beta-sigmas": ("KDPM2DiscreteScheduler", dict(SD, use_beta_sigmas=True), 6, None,
                          None),
    "lcm-v-trailing": ("LCMScheduler", dict(SD, prediction_type="v_prediction",
                                            timestep_spacing="trailing"), 10, None, None),
    "dpm-o2-flow-sigmas": ("DPMSolverMultistepScheduler",
                           dict(SD, use_flow_sigmas=True, flow_shift=3.0,
                                prediction_type="flow_prediction"), 10, None, None),
    "unipc-o2-flow-sigmas": ("UniPCMultistepScheduler",
                             dict(SD, use_flow_sigmas=True, flow_shift=3.0,
                                  prediction_type="flow_prediction"), 10, None, None),
    "dpm-o2-sde++-heun-lambda-clipped": ("DPMSolverMultistepScheduler",
                                         dict(SD, solver_type="heun", lambda_min_clipped=-5.1,
                                              algorithm_type="sde-dpmsolver++"), 10, None, None),
    "unipc-o3-25-steps": ("UniPCMultistepScheduler", dict(SD, solver_order=3), 25, None, None),
    "euler-continuous-v": ("EulerDiscreteScheduler", dict(SD, timestep_type="continuous",
                                                          prediction_type="v_prediction"), 10,
                           None, None),
    "lms-order-2": ("LMSDiscreteScheduler", dict(SD), 10, dict(order=2), None),
    "deis-o2-karras": ("DEISMultistepScheduler", dict(SD, use_karras_sigmas=True), 10, None,
                       None),
    "dpm-single-o2-karras-v": ("DPMSolverSinglestepScheduler",
                               dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"),
                               10, None, None),
})


# Where diffusers' float32 step itself is off by more than RTOL. euler-a zero-SNR: sigma 4096 at
# the first call, where the x / (sigma^2 + 1) term cancels; against the step in float64 the
# rows are 4e-6 off, diffusers 1.8e-5.
RTOLS = {"euler-a-v-trailing-zsnr": 3e-5}


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("case", list(CASES))
def test_rows_match_diffusers(case, guided, caplog):
    cls, cfg, steps, step_kw, set_kw = CASES[case]
    caplog.set_level(logging.INFO, logger="fastdiff")
    chain(cls, cfg, steps, step_kw, set_kw, guided=guided, rtol=RTOLS.get(case, RTOL))
    _no_fallback(caplog)


# One case of each family (the widest state: order 3, two evaluations a step, noise) through
# the Triton kernel under the interpreter instead of the C++ kernel: the same rows, the other
# implementation of the op.
TRITON_CASES = ["pndm-sd15", "euler-a", "euler-karras-churn", "ddpm-v-zsnr-trailing",
                "ddim-eta", "lcm", "heun-karras-v", "kdpm2", "kdpm2-a-karras-v", "edm-euler-churn",
                "lms", "dpm-o3-dpmsolver++", "dpm-o2-sde-dpmsolver++", "unipc-o3-bh2", "deis-o3",
                "dpm-single-o3-dpmsolver++", "edm-dpm-o2-sde-dpmsolver++"]


def _triton_v2(model_output, sample, coeffs, step_index, noise=None, state=None,
               guidance_scale=1.0, clip_sample=False, clip_sample_range=1.0, guided=None):
    """schedulers._op_v2 with the Triton launcher (interpreted on CPU) in place of the op."""
    from fastdiff import kernels, ops

    dt = sample.dtype
    st = None if state is None else state.to(dtype=dt).clone()
    args = (model_output.contiguous(), sample.contiguous(), coeffs.float().contiguous(),
            step_index, None if noise is None else noise.to(dtype=dt).contiguous(), st,
            float(guidance_scale), clip_sample, float(clip_sample_range), True, guided)
    ops.check("denoise_step", *args)
    out, x0 = kernels.launch("denoise_step", *args)
    return out, x0, st


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs where no GPU is")
@pytest.mark.parametrize("case", TRITON_CASES)
def test_rows_match_diffusers_through_the_triton_interpreter(case, caplog, monkeypatch):
    import os
    assert os.environ.get("TRITON_INTERPRET") == "1"             # tests/conftest.py sets it
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return _triton_v2(*a, **k)

    monkeypatch.setattr(SC, "V2_OP", counting)
    cls, cfg, steps, step_kw, set_kw = CASES[case]
    caplog.set_level(logging.INFO, logger="fastdiff")
    chain(cls, cfg, steps, step_kw, set_kw, guided=True, rtol=RTOLS.get(case, RTOL))
    _no_fallback(caplog)
    assert calls


# ---------------------------------------------------------------- custom schedules, mid-run starts

MORE = {
    "euler-custom-sigmas": ("EulerDiscreteScheduler", dict(SD), None, None,
                            dict(sigmas=[14.6, 9.0, 6.0, 4.0, 2.7, 1.8, 1.1, 0.7, 0.4, 0.2,
                                         0.08, 0.03])),
    "dpm-o2-custom-timesteps": ("DPMSolverMultistepScheduler", dict(SD), None, None,
                                dict(timesteps=[999, 900, 800, 700, 600, 500, 400, 300, 200,
                                                120, 60, 20])),
    "lcm-img2img-strength": ("LCMScheduler", dict(SD), 20, None, dict(strength=0.5)),
    "heun-custom-timesteps": ("HeunDiscreteScheduler", dict(SD), None, None,
                              dict(timesteps=[999, 800, 600, 400, 250, 100])),
    # EDMEulerScheduler's sigmas are the ramp in [0, 1] its sigma_schedule maps
    "edm-euler-custom-ramp": ("EDMEulerScheduler", dict(EDM), None, None,
                              dict(sigmas=torch.tensor([0.0, 0.05, 0.15, 0.3, 0.45, 0.6, 0.72,
                                                        0.82, 0.9, 0.96, 1.0]))),
}


@pytest.mark.parametrize("case", list(MORE))
def test_custom_schedules(case, caplog):
    cls, cfg, steps, step_kw, set_kw = MORE[case]
    caplog.set_level(logging.INFO, logger="fastdiff")
    chain(cls, cfg, steps, step_kw, set_kw)
    _no_fallback(caplog)


@pytest.mark.parametrize("case", ["dpm-o2-dpmsolver++", "unipc-o3-bh2", "heun", "pndm-sd15",
                                  "euler-a"])
def test_img2img_begin_index(case, caplog):
    """A loop that starts later (img2img's strength): the table starts at the begin index."""
    cls, cfg, steps, step_kw, set_kw = CASES[case]
    caplog.set_level(logging.INFO, logger="fastdiff")
    if cls == "PNDMScheduler":
        pytest.skip("PNDMScheduler has no set_begin_index (its counter restarts at 0)")
    begin = 4
    step = chain(cls, cfg, 14, step_kw, set_kw, begin=begin)
    assert step.rows.start == begin
    _no_fallback(caplog)


@pytest.mark.parametrize("case,own", [("dpm-o3-dpmsolver++", 2), ("unipc-o3-bh2", 3),
                                      ("unipc-o2-bh1", 1), ("heun", 3), ("kdpm2-a", 1),
                                      ("pndm-sd15", 2), ("dpm-single-o3-dpmsolver++", 4),
                                      ("deis-o3", 2), ("lms", 3)])
def test_rows_take_over_from_diffusers(case, own, caplog):
    """The first calls run diffusers' own step; the rows start from the tensors it holds then
    (they become the table's first slots)."""
    cls, cfg, steps, step_kw, set_kw = CASES[case]
    caplog.set_level(logging.INFO, logger="fastdiff")
    step = chain(cls, cfg, steps, step_kw, set_kw, own_first=own)
    assert step.rows.start == own
    _no_fallback(caplog)


@pytest.mark.parametrize("case", ["dpm-o3-dpmsolver++", "unipc-o3-bh2", "heun", "kdpm2-a",
                                  "pndm-sd15", "dpm-single-o3-dpmsolver++", "lms"])
def test_rows_diffusers_rows(case, caplog):
    """Rows, then diffusers' own step for two calls (the scheduler's tensors then views of the
    rows' state buffer, and new ones), then rows again: the same table, its slots refilled."""
    cls, cfg, steps, step_kw, set_kw = CASES[case]
    caplog.set_level(logging.INFO, logger="fastdiff")
    chain(cls, cfg, steps, step_kw, set_kw, own=(3, 4))
    _no_fallback(caplog)


@pytest.mark.parametrize("case", ["ddim-eta", "dpm-o2-sde-dpmsolver++", "dpm-o3-sde-dpmsolver++"])
def test_variance_noise_argument(case, caplog):
    """The noise given as the step's variance_noise (no generator) is the row's noise."""
    cls, cfg, steps, step_kw, set_kw = CASES[case]
    caplog.set_level(logging.INFO, logger="fastdiff")
    chain(cls, cfg, steps, step_kw, set_kw, noise_kw="variance_noise")
    _no_fallback(caplog)


def test_pndm_prk_warmup_is_rows(caplog, monkeypatch):
    """skip_prk_steps=False (PNDMScheduler's default): the whole Runge-Kutta warm-up is rows,
    its last step (calls 8-11) with five tensors live between calls (the five slots), and the
    PLMS calls after it; none runs diffusers' step."""
    caplog.set_level(logging.INFO, logger="fastdiff")
    ran = []
    own = SC.reference.denoise_step_v2

    def counting(*args, **kwargs):
        ran.append(int(args[3]))
        if args[5] is not None:
            slots.append(args[5].shape[0])
        return own(*args, **kwargs)

    slots = []
    monkeypatch.setattr(SC, "v2_executor", lambda: counting)
    step = chain("PNDMScheduler", dict(SD15_PNDM, skip_prk_steps=False), 10)
    assert step.rows.start == 0
    assert ran == list(range(len(step.scheduler.timesteps)))
    assert max(slots) == 5
    _no_fallback(caplog)


# ---------------------------------------------------------------- settings that are not rows

REFUSED = {
    "dpm-thresholding": ("DPMSolverMultistepScheduler", dict(SD, thresholding=True),
                         "thresholding=True"),
    "unipc-thresholding": ("UniPCMultistepScheduler", dict(SD, thresholding=True),
                           "thresholding=True"),
    "deis-thresholding": ("DEISMultistepScheduler", dict(SD, thresholding=True),
                          "thresholding=True"),
    "dpm-single-thresholding": ("DPMSolverSinglestepScheduler", dict(SD, thresholding=True),
                                "thresholding=True"),
    "edm-dpm-thresholding": ("EDMDPMSolverMultistepScheduler", dict(EDM, thresholding=True),
                             "thresholding=True"),
    "lcm-thresholding": ("LCMScheduler", dict(SD, thresholding=True), "thresholding=True"),
    "ddpm-thresholding": ("DDPMScheduler", dict(SD, thresholding=True), "thresholding=True"),
    "lcm-clip": ("LCMScheduler", dict(SD, clip_sample=True), "clip_sample=True"),
    "heun-clip": ("HeunDiscreteScheduler", dict(SD, clip_sample=True), "clip_sample=True"),
    "ddpm-learned-range": ("DDPMScheduler", dict(SD, variance_type="learned_range"),
                           "variance_type='learned_range'"),
    "unipc-solver-p": ("UniPCMultistepScheduler", dict(SD), "solver_p"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_settings_warn_and_run_diffusers(case, caplog):
    """The family names the setting (unsupported / unsupported_rows); the step logs it once at
    WARNING and runs diffusers' own step, so the results are diffusers' exactly."""
    name, cfg, why = REFUSED[case]
    cls = getattr(diffusers, name)
    if case == "unipc-solver-p":
        a, b = (cls(**cfg, solver_p=diffusers.DPMSolverSinglestepScheduler(**SD))
                for _ in range(2))
    else:
        a, b = cls.from_config(cfg), cls.from_config(cfg)
    fam = SC.FAMILIES_V2[name]
    reason = fam.unsupported_rows(a.config)
    assert reason and why in reason
    if name not in SC.FAMILIES:                       # a v2-only family: unsupported is the same
        assert fam.unsupported(a.config) == reason
    for s in (a, b):
        s.set_timesteps(10)
        if case == "unipc-solver-p":
            s.solver_p.set_timesteps(10)
    step = SC.RowStep(a)
    caplog.set_level(logging.INFO, logger="fastdiff")
    chans = 8 if "learned" in case else 4
    xa = xb = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)) * float(
        b.init_noise_sigma)
    takes_gen = "generator" in cls.step.__code__.co_varnames
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for k, t in enumerate(b.timesteps):
        m = torch.randn((1, chans, 8, 8), generator=torch.Generator().manual_seed(k))
        oa = step(m, t, a.scale_model_input(xa, t), **({"generator": ga} if takes_gen else {}))
        ob = b.step(m, t, b.scale_model_input(xb, t), **({"generator": gb} if takes_gen else {}))
        assert torch.equal(oa.prev_sample, ob.prev_sample)
        xa, xb = oa.prev_sample, ob.prev_sample
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and why in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert step.rows.start is None                   # no table was built


def test_tables_refuse_by_name():
    """table_for names the setting too (for callers that build tables themselves)."""
    s = diffusers.DPMSolverMultistepScheduler.from_config(dict(SD, thresholding=True))
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="thresholding=True"):
        tables.table_for(s)


@pytest.mark.parametrize("case", ["pndm-sd15", "euler-a", "euler-karras-churn", "edm-euler",
                                  "dpm-o2-sde-dpmsolver++", "heun", "unipc-o2-bh2", "lcm",
                                  "ddim-eta"])
def test_half_outputs_keep_diffusers_dtypes(case):
    """float16 model outputs: the outputs come back in the dtypes diffusers' step returns (the
    Euler family's x0 stays float32, its upcast) and agree to half precision."""
    cls, cfg, steps, step_kw, set_kw = CASES[case]
    chain(cls, cfg, steps, step_kw, set_kw, dtype=torch.float16, rtol=1e-2)


def test_accelerate_installs_rows_once_the_op_runs_them(monkeypatch, caplog):
    """With V2_OP set (the one switch: the op by default, here the reference), ``patch``
    installs RowStep on a family FusedStep cannot serve, and refuses a setting by name, which
    accelerate warns about; unset (None), the version-1 behaviour stays (UniPC is not fused)."""
    cfg = dict(SD, solver_order=3)
    monkeypatch.setattr(SC, "V2_OP", None)
    assert "not supported" in SC.patch(diffusers.UniPCMultistepScheduler.from_config(cfg))
    monkeypatch.setattr(SC, "V2_OP", SC.reference.denoise_step_v2)
    a, b = (diffusers.UniPCMultistepScheduler.from_config(cfg) for _ in range(2))
    assert SC.patch(a) is None and isinstance(a.__dict__["step"], SC.RowStep)
    for s in (a, b):
        s.set_timesteps(10)
    x = xb = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    for k, t in enumerate(b.timesteps):
        x = a.step(_model(x, t, k, 1), t, x).prev_sample
        xb = b.step(_model(xb, t, k, 1), t, xb).prev_sample
    assert _err(x, xb) <= RTOL
    twin = copy.deepcopy(a)
    assert isinstance(twin.__dict__["step"], SC.RowStep) and twin.step.scheduler is twin
    SC.unpatch(a)
    assert "step" not in a.__dict__
    bad = diffusers.UniPCMultistepScheduler.from_config(dict(cfg, thresholding=True))
    assert "thresholding=True" in SC.patch(bad) and "step" not in bad.__dict__


@pytest.mark.parametrize("case", ["unipc-o3-bh2", "dpm-o3-dpmsolver++", "heun", "pndm-sd15",
                                  "lcm"])
def test_second_run_on_the_same_scheduler(case, caplog):
    """set_timesteps again (another step count, then the first again): new tables, the state
    of the previous run not carried over."""
    cls, cfg, steps, step_kw, set_kw = CASES[case]
    caplog.set_level(logging.INFO, logger="fastdiff")
    klass = getattr(diffusers, cls)
    a, b = klass.from_config(cfg), klass.from_config(cfg)
    step = SC.RowStep(a)
    takes_gen = "generator" in klass.step.__code__.co_varnames
    for run, n in enumerate((steps, steps + 2, steps)):
        for s in (a, b):
            s.set_timesteps(n)
        xa = xb = torch.randn(SHAPE, generator=torch.Generator().manual_seed(run)) * float(
            b.init_noise_sigma)
        ga, gb = torch.Generator().manual_seed(run), torch.Generator().manual_seed(run)
        for k, t in enumerate(b.timesteps):
            ia, ib = a.scale_model_input(xa, t), b.scale_model_input(xb, t)
            oa = step(_model(ia, t, k, run), t, xa, **({"generator": ga} if takes_gen else {}))
            ob = b.step(_model(ib, t, k, run), t, xb, **({"generator": gb} if takes_gen else {}))
            assert _err(oa.prev_sample, ob.prev_sample) <= RTOL, (run, k)
            xa, xb = oa.prev_sample, ob.prev_sample
    _no_fallback(caplog)


@pytest.mark.parametrize("kind", ["EulerDiscreteScheduler", "DDPMScheduler",
                                  "DPMSolverMultistepScheduler", "HeunDiscreteScheduler"])
def test_step_arguments_bind_as_inspect_does(kind):
    """FusedStep / RowStep bind step's arguments on every call with a cached binder (inspect's
    bind + apply_defaults cost ~30 us a step): the same arguments, defaults and errors."""
    import inspect

    step = type(getattr(diffusers, kind)()).step
    sig = inspect.signature(step)
    fast = SC._Binder(sig)
    calls = [((1, 2, 3), {}), ((1, 2, 3), {"return_dict": False}),
             ((1,), {"timestep": 2, "sample": 3}),
             ((1, 2, 3), {"generator": None, "return_dict": False})]
    names = list(sig.parameters)
    for args, kwargs in calls:
        args = (object(),) + args     # self
        if not kwargs.keys() <= set(names):      # (Heun's step takes no generator)
            with pytest.raises(TypeError):
                fast(*args, **kwargs)
            continue
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        assert fast(*args, **kwargs) == dict(bound.arguments)
    for args, kwargs in [((object(), 1, 2, 3), {"no_such_argument": 1}),
                         ((object(), 1, 2), {}),
                         ((object(), 1, 2, 3), {"sample": 3}),
                         ((object(),) + tuple(range(len(names) + 1)), {})]:
        with pytest.raises(TypeError):
            sig.bind(*args, **kwargs)
        with pytest.raises(TypeError):
            fast(*args, **kwargs)


@pytest.mark.parametrize("kind", ["HeunDiscreteScheduler", "DDIMScheduler",
                                  "EulerDiscreteScheduler", "PNDMScheduler"])
def test_calls_that_change_their_arguments_mid_run(kind, caplog):
    """RowStep takes a call that continues the last one's run (same schedule, configuration,
    arguments and tensor kinds) without the generic checks; a change in between (guided or
    not, return_dict, a table option, the scheduler's own step) takes the generic path, and
    every call equals diffusers' step."""
    caplog.set_level(logging.INFO, logger="fastdiff")
    klass = getattr(diffusers, kind)
    a, b = klass.from_config(SD15_PNDM), klass.from_config(SD15_PNDM)
    step = SC.RowStep(a)
    continued = []
    real = step._continued

    def spy(*args):
        planned = real(*args)
        continued.append(planned is not None)
        return planned

    step._continued = spy
    option = {"DDIMScheduler": {"eta": 0.5},
              "EulerDiscreteScheduler": {"s_churn": 0.5}}.get(kind, {})
    takes_gen = "generator" in klass.step.__code__.co_varnames
    for s in (a, b):
        s.set_timesteps(12)
    xa = xb = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * float(
        b.init_noise_sigma)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    #        call: 0-2 plain, 3-4 guided, 5 return_dict=False, 6-7 an option, 8 diffusers' own
    for k, t in enumerate(b.timesteps):
        ia, ib = a.scale_model_input(xa, t), b.scale_model_input(xb, t)
        kw = dict(option if k in (6, 7) else {}, return_dict=k != 5)
        kw_a = dict(kw, **({"generator": ga} if takes_gen else {}))
        kw_b = dict(kw, **({"generator": gb} if takes_gen else {}))
        ma, mb = _model(ia, t, k, 1), _model(ib, t, k, 1)
        if k == 8:
            oa = step.original(ma, t, xa, **kw_a)
        elif k in (3, 4):
            ua, ub = _model(ia, t, k, 2), _model(ib, t, k, 2)
            oa = step.guided(torch.cat([ua, ma]), 2.0, t, xa, **kw_a)
            mb = ub + 2.0 * (mb - ub)
        else:
            oa = step(ma, t, xa, **kw_a)
        ob = b.step(mb, t, xb, **kw_b)
        pa, pb = (oa[0], ob[0]) if k == 5 else (oa.prev_sample, ob.prev_sample)
        assert type(oa) is type(ob), k
        assert _err(pa, pb) <= RTOL, k
        xa, xb = pa, pb
    # calls 1-7 and 9 on (call 0 has none before it): generic at 3 (guided), 5 (not guided
    # again; its return_dict=False alone would not matter: not a table option), 6 where an
    # option changes, and 9 (after diffusers' step at 8)
    n = len(b.timesteps)
    assert continued == ([True, True, False, True, False, not option, True, False]
                         + [True] * (n - 10))
    _no_fallback(caplog)


# ---------------------------------------------------------------- the state buffers (issue 14)

STATE_CASES = ["heun", "kdpm2-a", "pndm-sd15", "unipc-o3-bh2", "dpm-single-o3-dpmsolver++",
               "deis-o3", "lms"]


def _carried(s, name):
    """The tensors the scheduler carries between calls (tables.LAYOUTS), by attribute path."""
    found = {}
    for attr in tables.LAYOUTS[name]:
        v = s.__dict__.get(attr)
        for i, t in enumerate(v if isinstance(v, list) else [v]):
            if torch.is_tensor(t):
                found[(attr, i)] = t
    return found


@pytest.mark.parametrize("case", STATE_CASES)
def test_handed_out_state_keeps_its_values(case, caplog):
    """The op updates its state slots in place: the rows run it on the current buffer only
    when nothing but the scheduler's own attributes sees it, else on a second buffer (the one
    before the last, reused): a tensor the scheduler carried at any earlier call, or a view of
    one, held since, keeps the values it had then, as diffusers' own tensors do. With nothing
    held, the run needs at most two buffers, not one per call."""
    cls, cfg, steps, step_kw, set_kw = CASES[case]
    caplog.set_level(logging.INFO, logger="fastdiff")
    s = getattr(diffusers, cls).from_config(cfg)
    s.step = step = SC.RowStep(s)
    s.set_timesteps(steps, **(set_kw or {}))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g) * float(s.init_noise_sigma)
    held, buffers = [], set()
    kw = dict(step_kw or {})
    for k, t in enumerate(s.timesteps):
        pair = torch.randn((2, *SHAPE[1:]), generator=g)
        x = step.guided(pair, 3.0, t, s.scale_model_input(x, t), return_dict=False, **kw)[0]
        # held: the tensors themselves at even calls, views of them (the storage) at odd ones
        held += [(t if k % 2 else t[0], t.clone() if k % 2 else t[0].clone())
                 for t in _carried(s, cls).values()]
        buffers.add(step.rows.state.untyped_storage().data_ptr())
    assert held
    for t, then in held:
        assert torch.equal(t, then)
    _no_fallback(caplog)
    # the same run holding nothing: the buffer before the last is reused
    s.set_timesteps(steps, **(set_kw or {}))
    buffers = set()
    for k, t in enumerate(s.timesteps):
        pair = torch.randn((2, *SHAPE[1:]), generator=g)
        x = step.guided(pair, 3.0, t, s.scale_model_input(x, t), return_dict=False, **kw)[0]
        buffers.add(step.rows.state.untyped_storage().data_ptr())
    assert len(buffers) <= 3    # the run's first buffer (a new table's), then two in turn
    _no_fallback(caplog)


@pytest.mark.parametrize("case", ["heun", "kdpm2-a"])
def test_rows_writing_no_slot_copy_nothing(case, monkeypatch):
    """A row that writes no slot (Heun's and KDPM2's second halves) runs the op on the current
    state buffer itself (the op leaves it as it is): no copy of it; one that writes them all
    without reading them (their first halves) copies none of it either."""
    cls, cfg, steps, step_kw, set_kw = CASES[case]
    s = getattr(diffusers, cls).from_config(cfg)
    s.step = step = SC.RowStep(s)
    s.set_timesteps(steps, **(set_kw or {}))
    coeffs, info = SC.content_table(s, 0, {})
    assert [info.copies(coeffs, c) for c in range(info.calls)][1:5] == [None, (), None, ()]
    copied = []
    real_copy, real_clone = torch.Tensor.copy_, torch.Tensor.clone

    def copy_(self, src, *a, **k):
        copied.append(tuple(src.shape))
        return real_copy(self, src, *a, **k)

    def clone(self, *a, **k):
        copied.append(tuple(self.shape))
        return real_clone(self, *a, **k)

    x = torch.randn(SHAPE) * float(s.init_noise_sigma)
    x = step(torch.randn(SHAPE), s.timesteps[0], s.scale_model_input(x, s.timesteps[0]),
             return_dict=False)[0]          # the run's first call: its buffer made
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    monkeypatch.setattr(torch.Tensor, "clone", clone)
    for t in s.timesteps[1:6]:
        x = step(torch.randn(SHAPE), t, s.scale_model_input(x, t), return_dict=False)[0]
    monkeypatch.undo()
    assert not [c for c in copied if c[-3:] == SHAPE[-3:]]   # no sample-sized copy


@pytest.mark.parametrize("gen", ["none", "cpu", "list"])
def test_noise_as_randn_tensor(gen):
    """schedulers._randn draws what diffusers' randn_tensor draws (same generator state after)."""
    from diffusers.utils.torch_utils import randn_tensor

    def make():
        if gen == "none":
            torch.manual_seed(5)
            return None
        if gen == "cpu":
            return torch.Generator().manual_seed(5)
        return [torch.Generator().manual_seed(5 + i) for i in range(2)]

    shape, dev = (2, 4, 8, 8), torch.device("cpu")
    ga = make()
    a = [SC._randn(shape, ga, dev, torch.float32) for _ in range(2)]
    gb = make()
    b = [randn_tensor(shape, generator=gb, device=dev, dtype=torch.float32) for _ in range(2)]
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and torch.equal(u, v)


@pytest.mark.parametrize("guided", [False, True])
def test_pndm_prk_warmup_through_the_op(guided, caplog):
    """The Runge-Kutta warm-up's rows (five slots live between calls) through the op, which runs
    them on the current buffer or a second one (Rows.unshared / Rows.target): as diffusers."""
    caplog.set_level(logging.INFO, logger="fastdiff")
    chain("PNDMScheduler", dict(SD15_PNDM, skip_prk_steps=False), 10, guided=guided)
    _no_fallback(caplog)
