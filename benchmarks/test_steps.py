"""The fused scheduler step against diffusers' step + CFG, per scheduler family (issue 14).

Each round runs a whole 20-step schedule at the SD1.5 latent shape (1x4x64x64, CFG batch 2) on
a scheduler built from the SD1.5 config: 'diffusers' combines the guided pair in torch
(u + g (c - u)) and calls the scheduler's own step; 'fastdiff' calls RowStep.guided (FusedStep
for the four version-1 families), the guidance combine, solver update, noise and state in one
denoise_step launch. Model outputs are fixed random tensors, so the round times the steps
alone. Medians per round / 20 = per step; compare the two systems of one family side by side.

    pytest benchmarks/test_steps.py --benchmark-columns=median,rounds
"""
import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdiff.integrations.diffusers import schedulers as SC  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

FAMILIES = ["PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
            "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
            "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
            "LCMScheduler", "LMSDiscreteScheduler"]
STEPS, SHAPE, GUIDANCE = 20, (1, 4, 64, 64), 7.5
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            skip_prk_steps=True, set_alpha_to_one=False, clip_sample=False)


def _scheduler(kind, fused):
    s = getattr(diffusers, kind).from_config(SD15)
    if fused:
        s.step = SC.FusedStep(s) if SC.unsupported(s) is None else SC.RowStep(s)
    return s


DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.mark.parametrize("system", ["diffusers", "fastdiff"])
@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("device", DEVICES)
def test_step(benchmark, kind, system, device):
    """On CUDA, fp16 (what pipelines run), synchronized once per round."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    pairs = [torch.randn(2, *SHAPE[1:], generator=g).to(device, dtype) for _ in range(4)]
    x0 = torch.randn(SHAPE, generator=g).to(device, dtype)
    sched = _scheduler(kind, system == "fastdiff")
    step = sched.step
    rows = isinstance(step, SC.RowStep)
    takes_generator = "generator" in inspect.signature(type(sched).step).parameters

    @torch.no_grad()        # as pipelines run (their __call__ is under no_grad)
    def run():
        sched.set_timesteps(STEPS)
        x = x0 * sched.init_noise_sigma
        kw = {"generator": torch.Generator(device=device).manual_seed(1)} if takes_generator else {}
        for i, t in enumerate(sched.timesteps):
            pair = pairs[i % 4]
            sched.scale_model_input(x, t)   # as pipelines do (the model input is not used here)
            if rows:
                x = step.guided(pair, GUIDANCE, t, x, return_dict=False, **kw)[0]
            else:
                u, c = pair.chunk(2)
                x = step(u + GUIDANCE * (c - u), t, x, return_dict=False, **kw)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    run()   # the tables are built on the first schedule (not timed)
    # kind/case/inner: benchmarks/report.py's step rows (per step: median / STEPS)
    benchmark.extra_info.update(kind="step", case=f"{kind} {device}", family=kind, system=system,
                                steps=STEPS, inner=STEPS, device=device)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
