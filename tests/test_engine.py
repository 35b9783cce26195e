"""The sampling engine: eager on CPU against the stock diffusers pipelines; CUDA-graph capture,
replay, new shapes, weight updates and memory on a GPU (marked 'cuda', skipped without one)."""
import gc

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import fastdiff  # noqa: E402
from fastdiff import engine, schedules  # noqa: E402
from fastdiff.integrations import diffusers as acc  # noqa: E402
from fastdiff.integrations.diffusers import zoo  # noqa: E402
from fastdiff.diffusion import GaussianDiffusion  # noqa: E402


@pytest.fixture(scope="module")
def sd_unet():
    return zoo.build_unet("sd15", width=0.5, sample_size=16, layers_per_block=1)


def _sd_pipe(unet, kind, **cfg):
    p = diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet,
        scheduler=zoo.build_scheduler("sd15", kind, **cfg), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def _close(out, ref, rtol=1e-4):
    err = (out - ref).abs().max().item()
    assert err <= rtol * max(1.0, ref.abs().max().item()), f"max error {err:.3g}"


@pytest.mark.parametrize("kind,cfg", [
    ("DDIMScheduler", {}), ("DDPMScheduler", {}), ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction"}),
    # version-2 rows: SD1.5's default, two evaluations a step, and noise drawn by the step (the
    # engine draws it at the calls the scheduler does, so a seeded stream matches stock)
    ("PNDMScheduler", {}), ("HeunDiscreteScheduler", {}),
    # PNDMScheduler's own default: the Runge-Kutta warm-up, five tensors carried (was refused)
    ("PNDMScheduler", {"skip_prk_steps": False}),
    ("EulerAncestralDiscreteScheduler", {}), ("LCMScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True})])
def test_sample_pipeline_matches_stock_sd15(sd_unet, kind, cfg):
    """Before issue 14's engine work, sample_pipeline refused every family but the first four."""
    pipe = _sd_pipe(sd_unet, kind, **cfg)
    g = torch.Generator().manual_seed(0)
    pe, ne = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=128, width=128,
              num_inference_steps=4, guidance_scale=5.0)
    ref = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(1)).images
    fastdiff.accelerate(pipe)
    try:
        out = fastdiff.sample_pipeline(pipe, **kw, generator=torch.Generator().manual_seed(1))
    finally:
        fastdiff.restore(pipe)
    _close(out, ref)


def test_sample_pipeline_sdxl_and_unguided():
    unet = zoo.build_unet("sdxl", width=0.2, sample_size=16, layers_per_block=1,
                          transformer_layers_per_block=[1, 1, 1])
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=unet, scheduler=zoo.build_scheduler("sdxl", "EulerDiscreteScheduler"))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    pe, pp = torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g)
    ne, npool = torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g)
    for guidance in (1.0, 5.0):
        ref = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
                   negative_pooled_prompt_embeds=npool, height=128, width=128,
                   num_inference_steps=3, guidance_scale=guidance, output_type="latent",
                   generator=torch.Generator().manual_seed(1)).images
        out = fastdiff.sample_pipeline(
            pipe, prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
            negative_pooled_prompt_embeds=npool, height=128, width=128,
            num_inference_steps=3, guidance_scale=guidance,
            generator=torch.Generator().manual_seed(1))
        _close(out, ref)


def test_sample_pipeline_ddpm_unconditional():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                                 in_channels=3, out_channels=3,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=2, num_inference_steps=5, output_type="np",
               generator=torch.Generator().manual_seed(3)).images
    out = fastdiff.sample_pipeline(pipe, batch_size=2, num_inference_steps=5,
                                 generator=torch.Generator().manual_seed(3))
    out = (out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(out - ref).max() < 1e-4


def _toy_fn(conv):
    """A model_fn over one conv: output depends on x, the timestep and an optional ctx."""
    def fn(x, t, ctx=None):
        out = conv(x) * 0.1 + t.view(-1, 1, 1, 1).to(x.dtype) * 1e-4
        return out if ctx is None else out + ctx.view(-1, 1, 1, 1)
    return fn


def _toy_engine(seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    return engine.SamplingEngine(_toy_fn(conv), parameters=lambda: list(conv.parameters())), conv


def test_engine_callback_progress_and_reproducibility(capsys):
    d = GaussianDiffusion()
    table = d.step_table("ddpm", 6)
    eng, _ = _toy_engine()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    seen = []

    def cb(i, t, x_i, x0):
        seen.append((i, float(t)))
        return x_i * 0.5 if i == 2 else None      # a callback that changes the sample

    a = eng.sample(x, table, {"ctx": torch.zeros(4)}, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(1), callback=cb, progress_bar=True)
    b = eng.sample(x, table, {"ctx": torch.zeros(4)}, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(1), callback=cb)
    assert [i for i, _ in seen] == list(range(6)) * 2
    assert seen[0][1] == float(table.timesteps[0])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = eng.sample(x, table, {"ctx": torch.zeros(4)}, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)                  # the callback's change took effect
    assert "sampling (ddpm)" in capsys.readouterr().err


def test_engine_bad_input():
    eng, _ = _toy_engine()
    table = GaussianDiffusion().step_table("ddim", 3)
    with pytest.raises(ValueError, match="'x' must be"):
        eng.sample("x", table)
    empty = schedules.StepTable("ddim", torch.zeros(0, 8), torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="'table' has no steps"):
        eng.sample(torch.zeros(1, 3, 4, 4), empty)


# ---------------------------------------------------------------- CUDA graphs
# Each graph test runs twice (the 'dev' fixture, tests/conftest.py): 'cuda' captures real CUDA
# graphs (GPU only), 'sim' runs the same bookkeeping on CPU with fastdiff.capture.SIMULATE.

def _toy(dev, seed=0):
    eng, conv = _toy_engine(seed)
    conv.to(dev)
    return eng, conv


def _eager(conv, x, table, **kw):
    """The same loop without graphs, over the same conv."""
    return engine.SamplingEngine(_toy_fn(conv), cuda_graphs=False).sample(x, table, **kw)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "euler"])
def test_graph_capture_matches_eager(dev, solver):
    eng, conv = _toy(dev)
    table = GaussianDiffusion().step_table(solver, 8)
    x = torch.randn(2, 3, 16, 16, device=dev)
    cond = {"ctx": torch.randn(4, device=dev)}
    out = eng.sample(x, table, cond, guidance_scale=3.0)
    ref = _eager(conv, x, table, cond=cond, guidance_scale=3.0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert eng.captures == 1
    cond2 = {"ctx": torch.randn(4, device=dev)}       # new values, same shapes: replayed
    torch.testing.assert_close(eng.sample(x, table, cond2, guidance_scale=3.0),
                               _eager(conv, x, table, cond=cond2, guidance_scale=3.0),
                               rtol=1e-4, atol=1e-4)
    assert eng.captures == 1


def test_graph_replays_are_reproducible_with_noise(dev):
    eng, _ = _toy(dev)
    table = GaussianDiffusion().step_table("ddpm", 10)
    x = torch.randn(2, 3, 16, 16, device=dev)
    a = eng.sample(x, table, generator=torch.Generator().manual_seed(5))
    b = eng.sample(x, table, generator=torch.Generator().manual_seed(5))
    c = eng.sample(x, table, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    g = torch.Generator(device=dev).manual_seed(7)
    d = eng.sample(x, table, generator=g)
    g.manual_seed(7)
    torch.testing.assert_close(eng.sample(x, table, generator=g), d, rtol=0, atol=0)
    assert eng.captures == 1


def test_seeded_graph_is_reproducible_whatever_ran_before(dev):
    """A seeded call draws the same sample on a fresh engine, after an unseeded call and twice
    in a row. (The graph cache key once ignored which generator a graph draws from: after an
    unseeded call, seeded calls replayed a graph drawing from the default generator.)"""
    table = GaussianDiffusion().step_table("ddpm", 6)
    x = torch.randn(2, 3, 16, 16, device=dev)

    def seeded(eng):
        return eng.sample(x, table, generator=torch.Generator().manual_seed(5))

    fresh = seeded(_toy(dev)[0])
    eng, _ = _toy(dev)
    unseeded = eng.sample(x, table)                    # the default generator's noise
    first, second = seeded(eng), seeded(eng)
    for out in (first, second):
        torch.testing.assert_close(out, fresh, rtol=0, atol=0)
    assert not torch.equal(unseeded, fresh)
    assert eng.captures == 2                           # one graph per generator kind
    assert not torch.equal(eng.sample(x, table), unseeded)   # unseeded still draws afresh


def test_seeded_sample_pipeline_is_reproducible_after_an_unseeded_call(dev):
    dtype = torch.float16 if dev == "cuda" else torch.float32
    unet = zoo.build_unet("sd15", width=0.1, sample_size=16, layers_per_block=1, device=dev,
                          dtype=dtype)
    pipe = _sd_pipe(unet, "DDPMScheduler").to(dev)
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 77, 768, generator=g).to(dev, dtype),
              negative_prompt_embeds=torch.randn(1, 77, 768, generator=g).to(dev, dtype),
              height=128, width=128, num_inference_steps=3, guidance_scale=5.0,
              latents=torch.randn(1, 4, 16, 16, generator=g).to(dev, dtype))

    def seeded():
        return fastdiff.sample_pipeline(pipe, **kw, generator=torch.Generator().manual_seed(5))

    fresh = seeded()
    acc.pipeline._ENGINES.pop(unet).close()            # a fresh engine for the next calls
    fastdiff.sample_pipeline(pipe, **kw)
    for _ in range(2):
        torch.testing.assert_close(seeded(), fresh, rtol=0, atol=0)


def test_graph_new_shape_is_a_new_capture(dev):
    eng, conv = _toy(dev)
    table = GaussianDiffusion().step_table("ddim", 5)
    for shape in [(2, 3, 16, 16), (1, 3, 16, 16), (2, 3, 24, 8), (2, 3, 16, 16)]:
        x = torch.randn(*shape, device=dev)
        torch.testing.assert_close(eng.sample(x, table), _eager(conv, x, table),
                                   rtol=1e-4, atol=1e-4)
    assert eng.captures == 3
    eng.sample(x, GaussianDiffusion().step_table("ddim", 7))   # another step count
    assert eng.captures == 4


def test_graph_sees_in_place_weight_updates_and_replaced_weights(dev):
    eng, conv = _toy(dev)
    table = GaussianDiffusion().step_table("ddim", 5)
    x = torch.randn(2, 3, 16, 16, device=dev)
    eng.sample(x, table)
    with torch.no_grad():
        conv.weight.mul_(1.5)                         # in place: same storage (LoRA fusion)
    torch.testing.assert_close(eng.sample(x, table), _eager(conv, x, table), rtol=1e-4, atol=1e-4)
    assert eng.captures == 1
    conv.weight = torch.nn.Parameter(conv.weight.detach() * 0.5)   # a new tensor
    torch.testing.assert_close(eng.sample(x, table), _eager(conv, x, table), rtol=1e-4, atol=1e-4)
    assert eng.captures == 2


def test_graph_memory_is_freed(dev):
    eng, conv = _toy(dev)
    table = GaussianDiffusion().step_table("ddim", 5)
    if dev == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
    for n in (1, 2, 4):
        eng.sample(torch.randn(n, 3, 64, 64, device=dev), table)
    assert len(eng.graphs) == 3
    if dev == "cuda":
        assert torch.cuda.memory_allocated() > before
    eng.close()
    assert not eng.graphs and eng.graphs.pool is None
    if dev == "cuda":
        del eng, conv
        gc.collect()
        torch.cuda.empty_cache()
        assert torch.cuda.memory_allocated() <= before + 4096


def test_accelerated_unet_graphs(dev):
    """GraphedUNet: replay equals eager, a new batch size is a new capture, weights updated in
    place are seen, restore frees the graphs."""
    dtype = torch.float16 if dev == "cuda" else torch.float32
    tol = 2e-2 if dev == "cuda" else 1e-4
    unet = zoo.build_unet("sd15", width=0.5, sample_size=16, layers_per_block=1, device=dev,
                          dtype=dtype)
    x = torch.randn(2, 4, 16, 16, device=dev, dtype=dtype)
    ctx = torch.randn(2, 77, 768, device=dev, dtype=dtype)
    with torch.no_grad():
        ref = unet(x, 10, ctx).sample
        fastdiff.accelerate(unet)
        graphs = unet.__dict__[fastdiff.integrations.diffusers.STATE_ATTR].graphs
        fused = unet(x, 10, ctx).sample
        assert graphs.captures == 1
        torch.testing.assert_close(fused, ref, rtol=tol, atol=tol)
        ts = torch.tensor([10, 20], device=dev)
        torch.testing.assert_close(unet(x, ts[0], ctx).sample, fused, rtol=0, atol=0)
        out_t = unet(x, ts[1], ctx, return_dict=False)[0]   # int and int64 tensor: one graph
        assert graphs.captures == 1 and graphs.replays == 3
        assert not torch.equal(out_t, fused)
        unet(x[:1], 10, ctx[:1])
        assert graphs.captures == 2
        unet.conv_out.weight.mul_(2.0)
        out2 = unet(x, 10, ctx).sample
        fastdiff.restore(unet)
        torch.testing.assert_close(out2, unet(x, 10, ctx).sample, rtol=tol, atol=tol)
        assert not graphs.graphs and graphs.graphs.pool is None
    assert "forward" not in unet.__dict__


def test_accelerated_pipeline_on_graphs_matches_stock(dev):
    dtype = torch.float16 if dev == "cuda" else torch.float32
    unet = zoo.build_unet("sd15", width=0.5, sample_size=16, layers_per_block=1, device=dev,
                          dtype=dtype)
    pipe = _sd_pipe(unet, "DDIMScheduler").to(dev)
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 77, 768, generator=g).to(dev, dtype)
    ne = torch.randn(1, 77, 768, generator=g).to(dev, dtype)
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=128, width=128,
              num_inference_steps=6, guidance_scale=7.5)
    ref = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(1)).images
    fastdiff.accelerate(pipe)
    out_pipe = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(1)).images
    graphs = pipe.__dict__[fastdiff.integrations.diffusers.STATE_ATTR].graphs
    assert graphs.captures == 1 and graphs.replays == 6
    out_eng = fastdiff.sample_pipeline(pipe, **kw, generator=torch.Generator().manual_seed(1))
    assert acc.engine_for(pipe.unet).captures == 1
    fastdiff.restore(pipe)
    tol = 0.02 if dev == "cuda" else 1e-4
    for out in (out_pipe, out_eng):
        err = (out.float() - ref.float()).abs().max().item()
        assert err <= tol * ref.float().abs().max().item()
