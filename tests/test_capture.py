"""The CUDA-graph simulation refuses what a real capture refuses, and every captured path of
fastdiff runs under it: the digits sampler (``fastdiff sample``, ``generate``), the engine over
SD-like and SDXL-like diffusers U-Nets for every scheduler it supports (``sample_pipeline``).
The accelerated U-Net's graph wrapper runs under it in tests/test_engine.py ('sim' cases).

A real capture fails on a host read of a tensor value ("operation not permitted when stream is
capturing"); before the simulation refused them, ``fastdiff sample`` passed every CPU test and
crashed on the first GPU (the U-Net's label range check read ``labels.min()`` in the capture).
"""
import re

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import capture, engine
from fastdiff.digits import cli
from fastdiff.integrations import diffusers as acc
from fastdiff.integrations.diffusers import zoo
from fastdiff.__main__ import main
from fastdiff.diffusion import GaussianDiffusion, sample


@pytest.fixture
def sim(monkeypatch):
    monkeypatch.setattr(capture, "SIMULATE", True)


def _recorded(fn):
    """Runs fn() as the body of a simulated capture (record, then one replay)."""
    g, _ = capture.capture(fn, capture.new_pool())
    g.replay()


# ---------------------------------------------------------------- the refusal itself

_READS = {
    "item": lambda t: t.item(),
    "tolist": lambda t: t.tolist(),
    "numpy": lambda t: t.numpy(),
    "int": lambda t: int(t),
    "float": lambda t: float(t),
    "bool": lambda t: bool(t),
    "if": lambda t: 1 if t else 0,
    "index": lambda t: [0, 1, 2][t],
    "format": lambda t: f"{t:.3f}",
    "np.asarray": lambda t: np.asarray(t),
    "nonzero": lambda t: torch.nonzero(t),
    "masked_select": lambda t: t.masked_select(t > 0),
    "bool mask": lambda t: t[t > 0],
    "unique": lambda t: t.unique(),
}


@pytest.mark.parametrize("name", sorted(_READS))
def test_host_reads_are_refused_with_the_offending_line(sim, name):
    t = torch.tensor(1)

    with pytest.raises(capture.CaptureError) as err:
        _recorded(lambda: (t * 2, _READS[name](t)))
    msg = str(err.value)
    assert "inside a CUDA-graph capture" in msg
    # the innermost line of the caller's code: the entry of _READS that reads
    assert re.search(r"test_capture\.py:\d+ in <lambda>: " + re.escape(f'"{name}": lambda t:'),
                     msg), msg


def test_synchronize_is_refused(sim):
    with pytest.raises(capture.CaptureError, match=r"synchronize.*test_capture\.py"):
        _recorded(lambda: torch.cuda.synchronize())
    assert torch.cuda.synchronize is not capture._refused_synchronize   # restored after


def test_a_read_in_a_replay_only_is_refused(sim):
    calls = []

    def body():
        calls.append(1)
        out = torch.ones(2)
        if len(calls) > 1:
            out.sum().item()
        return out

    g, _ = capture.capture(body, capture.new_pool())
    with pytest.raises(capture.CaptureError, match="Tensor.item"):
        g.replay()


def test_device_work_warm_up_and_outside_reads_are_allowed(sim):
    t = torch.arange(4.0)
    state = {}

    def body():
        state.setdefault("capturing", []).append(capture.capturing())
        state["shape"] = int(t.shape[0])             # shapes are host values: allowed
        return torch.where(t > 1, t, -t).cumsum(0) + t.index_select(0, torch.tensor([1]))

    capture.warm_up(lambda: body()[0].item(), 1)     # warm-up is not captured: reads allowed
    g, out = capture.capture(body, capture.new_pool())
    t.add_(1)
    g.replay()
    torch.testing.assert_close(out, torch.where(t > 1, t, -t).cumsum(0) + t[1])
    assert state["capturing"] == [False, True, True]  # warm-up, record, replay
    assert not capture.capturing() and out.sum().item() > 0


# ---------------------------------------------------------------- the digits sampler

def test_digits_sampler_with_labels_under_capture(sim):
    """The shipped model with class labels on the graph engine (the path of `fastdiff sample`):
    refused before the U-Net stopped reading label values inside the capture."""
    model = cli.load_model()
    labels = torch.tensor([0, 3, 9, 10])             # 10: the null label
    eng = engine.SamplingEngine(engine.fastdiff_model_fn(model),
                                parameters=lambda: list(model.parameters()))
    x, _ = sample(model, GaussianDiffusion(), labels, num_steps=4, engine=eng, seed=1)
    assert eng.captures == 1 and torch.isfinite(x).all()
    capture.SIMULATE = False                          # the same draw, eager
    ref, _ = sample(model, GaussianDiffusion(), labels, num_steps=4, seed=1)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def test_bad_labels_are_refused_on_the_host_before_any_capture(sim):
    model = cli.load_model()
    eng = engine.SamplingEngine(engine.fastdiff_model_fn(model))
    with pytest.raises(ValueError, match=r"'labels' must be in \[0, 10\].*got values 0\.\.11"):
        sample(model, GaussianDiffusion(), torch.tensor([0, 11]), num_steps=2, engine=eng)
    assert eng.captures == 0


def test_fastdiff_sample_command_under_capture(sim, tmp_path, capsys):
    out = tmp_path / "d.png"
    assert main(["sample", "--label", "7", "--num", "2", "--steps", "3", "--progressive",
                 "--out", str(out)]) == 0
    assert out.exists() and (tmp_path / "d-progressive.png").exists()
    assert "wrote" in capsys.readouterr().out


def test_generate_under_capture(sim, tmp_path):
    from fastdiff.digits.generate import generate, load

    generate(cli.load_model(), str(tmp_path), 3, shard_size=2, batch_size=2, steps=2,
             progress=False)
    assert load(str(tmp_path))["samples"].shape == (3, 1, 8, 8)


# ---------------------------------------------------------------- diffusers U-Nets

# (scheduler, its config, whether a step draws noise): every scheduler family the engine runs.
SCHEDULERS = [
    ("DDIMScheduler", {}, False),
    ("DDIMScheduler", {"prediction_type": "v_prediction"}, False),
    ("DDPMScheduler", {}, True),
    ("DDIMScheduler", {"thresholding": True, "sample_max_value": 2.0}, False),
    ("DDPMScheduler", {"thresholding": True}, True),
    ("DPMSolverMultistepScheduler", {}, False),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, True),
    ("DPMSolverMultistepScheduler", {"solver_order": 1}, False),
    ("EulerDiscreteScheduler", {}, False),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction"}, False),
    # version-2 rows (issue 14): every other family accelerate fuses
    ("PNDMScheduler", {}, False),
    ("EulerAncestralDiscreteScheduler", {}, True),
    ("UniPCMultistepScheduler", {}, False),
    ("UniPCMultistepScheduler", {"solver_order": 3, "lower_order_final": False,
                                 "final_sigmas_type": "sigma_min"}, False),
    ("LCMScheduler", {}, True),
    ("HeunDiscreteScheduler", {}, False),
    ("KDPM2DiscreteScheduler", {}, False),
    ("KDPM2AncestralDiscreteScheduler", {}, True),
    ("DPMSolverSinglestepScheduler", {}, False),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "dpmsolver",
                                     "final_sigmas_type": "sigma_min"}, False),
    ("DEISMultistepScheduler", {}, False),
    ("LMSDiscreteScheduler", {}, False),
    ("EDMEulerScheduler", {}, False),
    ("EDMDPMSolverMultistepScheduler", {}, False),
]


@pytest.fixture(scope="module")
def sd15_unet():
    return zoo.build_unet("sd15", width=0.1, sample_size=16, layers_per_block=1)


@pytest.fixture(scope="module")
def sdxl_unet():
    return zoo.build_unet("sdxl", width=0.1, sample_size=16, layers_per_block=1,
                          transformer_layers_per_block=[1, 1, 1])


def _pipe(model, unet, kind, cfg):
    diffusers = pytest.importorskip("diffusers")
    sched = zoo.build_scheduler(model, kind, **cfg)
    if model == "sd15":
        p = diffusers.StableDiffusionPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        p = diffusers.StableDiffusionXLPipeline(
            vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            unet=unet, scheduler=sched)
    p.set_progress_bar_config(disable=True)
    return p


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    dim = 768 if model == "sd15" else 2048
    pe, ne = torch.randn(1, 77, dim, generator=g), torch.randn(1, 77, dim, generator=g)
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=128, width=128,
              num_inference_steps=3, guidance_scale=5.0)
    if model == "sdxl":
        kw.update(pooled_prompt_embeds=torch.randn(1, 1280, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 1280, generator=g))
    return kw


V1_KINDS = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
            "EulerDiscreteScheduler")


def _cases():
    """Every scheduler on the SD-like U-Net; one of each version-1 family on the SDXL-like one
    (its difference is in the U-Net's added conditioning, not the step: the version-2 rows run
    through the same engine step); both stock (not accelerated) under DDIM."""
    for model in ("sd15", "sdxl"):
        for kind, cfg, noisy in SCHEDULERS:
            if model == "sdxl" and (cfg or kind not in V1_KINDS):
                continue
            name = "-".join(f"{k}={v}" for k, v in cfg.items()) or "default"
            yield pytest.param(model, kind, cfg, noisy, True, id=f"{model}-{kind}-{name}")
        yield pytest.param(model, "DDIMScheduler", {}, False, False, id=f"{model}-stock-unet")


@pytest.mark.filterwarnings("ignore:`algorithm_types dpmsolver:FutureWarning")
@pytest.mark.parametrize("model,kind,cfg,noisy,fused", _cases())
def test_sample_pipeline_under_capture(sim, request, model, kind, cfg, noisy, fused):
    """sample_pipeline on graphs (simulated, with the refusal): no host read in the step; equal
    to the stock pipeline where no noise is drawn, reproducible where it is. The U-Net is
    accelerated (fused blocks and attention) except in the stock-unet case."""
    unet = request.getfixturevalue(f"{model}_unet")
    pipe = _pipe(model, unet, kind, cfg)
    kw = _inputs(model)

    def run():
        return fastdiff.sample_pipeline(pipe, **kw, generator=torch.Generator().manual_seed(1))

    if fused:
        fastdiff.accelerate(pipe)
    try:
        out = run()
        again = run() if noisy else None
        assert acc.engine_for(unet).captures == 1 and torch.isfinite(out).all()
    finally:
        fastdiff.restore(pipe)
        acc.pipeline._ENGINES.pop(unet, None)
    if noisy:
        torch.testing.assert_close(again, out, rtol=0, atol=0)
        return
    ref = pipe(**kw, output_type="latent",
               generator=torch.Generator().manual_seed(1)).images
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), f"max error {err:.3g}"
