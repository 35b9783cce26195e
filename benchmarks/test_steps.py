"""The fused scheduler step against diffusers' step + CFG, per scheduler family (issue 14).

Each round runs a whole 20-step schedule at the SD1.5 latent shape (1x4x64x64, CFG batch 2) on
a scheduler built from the SD1.5 config (set_timesteps before each round, not timed):
'diffusers' combines the guided pair in torch
(u + g (c - u)) and calls the scheduler's own step; 'fastdiff' calls the installed step's
``guided`` (RowStep, or FusedStep for the four version-1 families): the guidance combine,
solver update, noise and state in one denoise_step launch. Model outputs are fixed random
tensors, so the round times the steps alone. Medians per round / 20 = per step; compare the
two systems of one family side by side.

loop 'step' times step + CFG alone, the issue's measure: before each step the scheduler is
marked as scale_model_input leaves it (``is_scale_input_called``; every step also starts its
own step index as scale_model_input would) without computing the scaled input, which neither
system's step reads. loop 'pipeline' calls scale_model_input, as a pipeline's loop does, so
both columns carry its cost (Euler-type schedulers: ~20 us a step on the 2-core CPU).

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
@pytest.mark.parametrize("loop", ["step", "pipeline"])
@pytest.mark.parametrize("device", DEVICES)
def test_step(benchmark, kind, system, loop, device):
    """On CUDA, fp16 (what pipelines run), synchronized once per round."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    pairs = [torch.randn(2, *SHAPE[1:], generator=g).to(device, dtype) for _ in range(4)]
    x0 = torch.randn(SHAPE, generator=g).to(device, dtype)
    sched = _scheduler(kind, system == "fastdiff")
    step = sched.step
    fused = isinstance(step, (SC.RowStep, SC.FusedStep))
    scale = loop == "pipeline"
    takes_generator = "generator" in inspect.signature(type(sched).step).parameters

    def setup():            # not timed: set_timesteps (KDPM2's: ~5 ms on the 2-core CPU)
        sched.set_timesteps(STEPS)
        kw = {"generator": torch.Generator(device=device).manual_seed(1)} if takes_generator else {}
        return (x0 * sched.init_noise_sigma, kw), {}

    @torch.no_grad()        # as pipelines run (their __call__ is under no_grad)
    def run(x, kw):
        for i, t in enumerate(sched.timesteps):
            pair = pairs[i % 4]
            if scale:
                sched.scale_model_input(x, t)   # as pipelines do (its result is not used here)
            elif hasattr(sched, "is_scale_input_called"):
                sched.is_scale_input_called = True
            if fused:
                x = step.guided(pair, GUIDANCE, t, x, return_dict=False, **kw)[0]
            else:
                u, c = pair.chunk(2)
                x = step(u + GUIDANCE * (c - u), t, x, return_dict=False, **kw)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    run(*setup()[0])   # the tables are built on the first schedule (not timed)
    # kind/case/inner: benchmarks/report.py's step rows (per step: median / STEPS)
    benchmark.extra_info.update(kind="step", case=f"{kind} {device} {loop}", family=kind,
                                system=system, loop=loop, steps=STEPS, inner=STEPS, device=device)
    benchmark.pedantic(run, setup=setup, rounds=10, iterations=1, warmup_rounds=1)
