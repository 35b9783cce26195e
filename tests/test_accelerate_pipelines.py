"""fastdiff.accelerate around real pipeline use: copies and pickles, torch.compile in either
order, gradients, every component (VAE, ControlNet), the user's later choices (attention
processors, fused QKV, from_pipe, swapped schedulers), the report, and sample_pipeline against
the pipeline it wraps (prompts encoded by the pipeline, img2img). Tiny random-weight components
built offline; a tiny CLIP tokenizer is written to a temporary folder."""
import copy
import gc
import json
import logging
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.models.attention_processor import AttnProcessor, FusedAttnProcessor2_0  # noqa

import fastdiff  # noqa: E402
from fastdiff.integrations import diffusers as acc  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                 out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                 norm_num_groups=32)
PROMPT = "a cat"


def _unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**TINY_UNET).eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny VAE, ControlNet, CLIP text encoder and tokenizer (vocabulary written here)."""
    d = tmp_path_factory.mktemp("tok")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "c": 3, "a": 4, "t</w>": 5}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    return dict(
        tokenizer=transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"),
                                             model_max_length=77),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=100)).eval(),
        vae=diffusers.AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                    down_block_types=["DownEncoderBlock2D"] * 2,
                                    up_block_types=["UpDecoderBlock2D"] * 2,
                                    latent_channels=4).eval(),
        controlnet=diffusers.ControlNetModel(
            block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
            conditioning_embedding_out_channels=(16, 32), norm_num_groups=32).eval())


def _scheduler(kind="DDIMScheduler"):
    """kind: a scheduler class; "PNDMScheduler-prk": PNDM with its Runge-Kutta warm-up."""
    kind, prk = kind.removesuffix("-prk"), kind.endswith("-prk")
    # from_config: settings a class does not take (steps_offset) are ignored, as in SD configs
    return getattr(diffusers, kind).from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        **{"DDIMScheduler": {"clip_sample": False, "set_alpha_to_one": False},
           "PNDMScheduler": {"skip_prk_steps": not prk}}.get(kind, {})))


def _pipe(parts, cls="StableDiffusionPipeline", kind="DDIMScheduler", unet=None):
    kw = {k: v for k, v in parts.items() if k != "controlnet"}
    if "ControlNet" in cls:
        kw["controlnet"] = parts["controlnet"]
    p = getattr(diffusers, cls)(unet=unet or _unet(), scheduler=_scheduler(kind),
                                safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False, **kw)
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, num_inference_steps=3, **kw):
    return pipe(prompt=PROMPT, num_inference_steps=num_inference_steps, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).images


def _close(out, ref, rtol=2e-3):
    err = (out - ref).abs().max().item()
    assert err <= rtol * max(1.0, ref.abs().max().item()), f"max error {err:.3g}"


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 77, 32, generator=g))


# ---------------------------------------------------------------- copies and pickles

def test_a_deep_copy_is_accelerated_over_its_own_weights():
    unet = fastdiff.accelerate(_unet())
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        dup = copy.deepcopy(unet)
        dup.conv_out.weight.mul_(0.5)
        dup.conv_out.bias.mul_(0.5)
        out = dup(x, t, ctx).sample
        assert not torch.allclose(out, ref, atol=1e-3)       # the copy's own weights
        stock = fastdiff.restore(copy.deepcopy(dup))
        _close(out, stock(x, t, ctx).sample, 1e-4)
        torch.testing.assert_close(unet(x, t, ctx).sample, ref, rtol=0, atol=0)
    dup.train()                                              # training the copy: its gradients
    dup(x, t, ctx).sample.square().mean().backward()
    assert dup.conv_out.weight.grad is not None and unet.conv_out.weight.grad is None
    fastdiff.restore(dup)                                    # restore(copy) leaves the original
    assert acc.STATE_ATTR in unet.__dict__ and "forward" in unet.__dict__
    keep = copy.deepcopy(unet)
    del unet
    gc.collect()
    with torch.no_grad():
        assert torch.isfinite(keep(x, t, ctx).sample).all()  # survives the original's deletion


def test_pickle_round_trips_of_unet_and_pipeline(parts):
    pipe = _pipe(parts)
    ref = _run(pipe)
    fastdiff.accelerate(pipe)
    back = pickle.loads(pickle.dumps(pipe))
    assert type(back).__name__ == type(pipe).__name__ and acc.STATE_ATTR in back.__dict__
    assert isinstance(back.scheduler.__dict__["step"], acc.FusedStep)
    _close(_run(back), ref)
    unet = pickle.loads(pickle.dumps(pipe.unet))
    assert isinstance(unet.__dict__["forward"], acc.GraphedUNet) and unet.forward.unet is unet
    fastdiff.restore(back)
    assert "step" not in back.scheduler.__dict__ and "step" in pipe.scheduler.__dict__
    fastdiff.restore(pipe)


# ---------------------------------------------------------------- torch.compile

def _recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


@pytest.mark.parametrize("order", ["compile-then-accelerate", "accelerate-then-compile"])
def test_compile_in_either_order_keeps_the_fused_ops_in_one_graph(order):
    torch._dynamo.reset()
    x, t, ctx = _inputs()
    unet = _unet()
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        graphs = []
        backend = _recording_backend(graphs)
        if order == "compile-then-accelerate":
            model = fastdiff.accelerate(torch.compile(unet, backend=backend, fullgraph=True))
        else:
            model = torch.compile(fastdiff.accelerate(unet), backend=backend, fullgraph=True)
        out = model(x, t, ctx).sample
    _close(out, ref, 1e-4)
    assert len(graphs) == 1                                 # fullgraph: no break
    targets = {str(n.target) for n in graphs[0].graph.nodes}
    assert any("fastdiff.group_norm_silu" in s for s in targets), sorted(targets)[:20]
    assert any("fastdiff.attention" in s for s in targets)
    fastdiff.restore(model)
    torch._dynamo.reset()


# ---------------------------------------------------------------- gradients

def test_lora_style_gradients_on_a_block_reach_its_layers():
    """Only the first ResnetBlock2D's conv1 trains (a LoRA on it): the block must run a path
    with gradients (before: its fused path ran and the gradient was None)."""
    x, t, ctx = _inputs()
    grads = []
    for fused in (False, True):
        unet = _unet()
        unet.requires_grad_(False)
        conv = unet.down_blocks[0].resnets[0].conv1
        conv.weight.requires_grad_(True)
        if fused:
            fastdiff.accelerate(unet)
        unet(x, t, ctx).sample.square().mean().backward()
        assert conv.weight.grad is not None
        grads.append(conv.weight.grad)
    _close(grads[1], grads[0], 1e-4)


# ---------------------------------------------------------------- every component

@pytest.mark.parametrize("cls,extra", [
    ("StableDiffusionPipeline", {}),
    ("StableDiffusionImg2ImgPipeline", {"image": "image", "strength": 0.7}),
    ("StableDiffusionInpaintPipeline", {"image": "image", "mask_image": "mask"}),
    ("StableDiffusionControlNetPipeline", {"image": "image"}),
])
def test_every_component_is_accelerated_and_matches_stock(parts, cls, extra):
    g = torch.Generator().manual_seed(3)
    values = {"image": torch.rand(1, 3, 64, 64, generator=g),  # [0, 1]: diffusers' image range
              "mask": (torch.rand(1, 1, 64, 64, generator=g) > 0.5).float()}
    kw = {k: values.get(v, v) for k, v in extra.items()}
    pipe = _pipe(parts, cls)
    ref = _run(pipe, **kw)
    fastdiff.accelerate(pipe)
    try:
        report = pipe.__dict__[acc.STATE_ATTR].report
        assert report.components["unet"]["resnets"] > 0
        assert report.components["vae"]["resnets"] > 0 and report.components["vae"]["attention"]
        if "ControlNet" in cls:
            assert report.components["controlnet"]["resnets"] > 0
        _close(_run(pipe, **kw), ref)
    finally:
        fastdiff.restore(pipe)
    assert not any("forward" in m.__dict__ for m in pipe.vae.modules())


# ---------------------------------------------------------------- the user's choices

def test_processors_set_after_accelerate_are_kept_and_restore_leaves_them(parts):
    pipe = fastdiff.accelerate(_pipe(parts))
    pipe.unet.set_attn_processor(AttnProcessor())
    assert all(type(p) is AttnProcessor for p in pipe.unet.attn_processors.values())
    fastdiff.restore(pipe)
    assert all(type(p) is AttnProcessor for p in pipe.unet.attn_processors.values())


@pytest.mark.parametrize("when", ["before", "after"])
def test_fused_qkv_projections_before_or_after_are_fused(parts, when):
    pipe = _pipe(parts)
    pipe.unet.fuse_qkv_projections()
    ref = _run(pipe)
    pipe.unet.unfuse_qkv_projections()
    if when == "before":
        pipe.unet.fuse_qkv_projections()
    fastdiff.accelerate(pipe)
    if when == "after":
        pipe.unet.fuse_qkv_projections()
    assert all(type(p) is acc.FastdiffFusedAttnProcessor
               for p in pipe.unet.attn_processors.values())
    _close(_run(pipe), ref)
    fastdiff.restore(pipe)
    assert all(type(p) is FusedAttnProcessor2_0 for p in pipe.unet.attn_processors.values())


def test_from_pipe_of_an_accelerated_pipeline_is_accelerated(parts):
    pipe = fastdiff.accelerate(_pipe(parts))
    euler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    new = diffusers.StableDiffusionPipeline.from_pipe(pipe, scheduler=euler)
    assert acc.STATE_ATTR in new.__dict__
    assert isinstance(new.scheduler.__dict__["step"], acc.FusedStep)
    fastdiff.restore(new)
    fastdiff.restore(pipe)


def test_a_swapped_out_scheduler_keeps_nothing_after_restore(parts):
    pipe = fastdiff.accelerate(_pipe(parts))
    old = pipe.scheduler
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(old.config)
    _run(pipe)
    new = pipe.scheduler
    assert isinstance(new.__dict__["step"], acc.FusedStep)
    fastdiff.restore(pipe)
    assert "step" not in old.__dict__ and "step" not in new.__dict__


# ---------------------------------------------------------------- the report

def test_explain_reports_and_unfused_parts_warn_once_or_raise(parts, caplog, capsys):
    pipe = _pipe(parts, kind="TCDScheduler")
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        fastdiff.accelerate(pipe)
        _run(pipe)
        _run(pipe)
    warned = [r for r in caplog.records if "TCDScheduler not supported" in r.message]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    report = fastdiff.explain(pipe)
    text = capsys.readouterr().out
    assert "unet:" in text and "vae:" in text and "TCDScheduler: diffusers' step" in text
    assert report.unfused and "CUDA graphs: on" in text
    assert "attention product: torch SDPA on CUDA, fastdiff.attention elsewhere" in text
    fastdiff.restore(pipe)
    with pytest.raises(ValueError, match="strict=True.*TCDScheduler not supported"):
        fastdiff.accelerate(_pipe(parts, kind="TCDScheduler"), strict=True)
    with pytest.raises(ValueError, match="is not accelerated"):
        fastdiff.explain(pipe)


# ---------------------------------------------------------------- the engine equals the pipeline

@pytest.mark.parametrize("cls,extra", [
    ("StableDiffusionPipeline", {}),                      # the empty negative prompt, encoded
    ("StableDiffusionImg2ImgPipeline", {"strength": 0.6}),
])
def test_sample_pipeline_equals_the_pipeline(parts, cls, extra):
    """The pipeline prepares its own inputs: before, sample_pipeline used zeros for a missing
    negative prompt where the pipeline encodes "" (0.33 relative difference)."""
    pipe = _pipe(parts, cls)
    if cls.endswith("Img2ImgPipeline"):
        extra = dict(extra, image=torch.rand(1, 3, 64, 64,
                                             generator=torch.Generator().manual_seed(4)))
    ref = _run(pipe, **extra)
    out = fastdiff.sample_pipeline(pipe, prompt=PROMPT, num_inference_steps=3,
                                   generator=torch.Generator().manual_seed(0), **extra)
    _close(out, ref, 1e-4)


def test_sample_pipeline_refuses_what_it_cannot_run(parts):
    pipe = _pipe(parts, kind="TCDScheduler")     # (PNDM, refused before issue 14, now runs)
    with pytest.raises(ValueError, match="TCDScheduler not supported"):
        fastdiff.sample_pipeline(pipe, prompt=PROMPT, num_inference_steps=2)
    pipe = _pipe(parts, "StableDiffusionControlNetPipeline")
    with pytest.raises(ValueError, match="down_block_additional_residuals"):
        fastdiff.sample_pipeline(pipe, prompt=PROMPT, image=torch.rand(1, 3, 64, 64),
                                 num_inference_steps=2)


# ---------------------------------------------------------------- on a GPU

@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_cuda_graph_wrapper_in_fp16_pipelines_matches_stock(model):
    from fastdiff.integrations.diffusers import zoo

    kw = {"transformer_layers_per_block": [1, 1, 1]} if model == "sdxl" else {}
    unet = zoo.build_unet(model, width=0.25, sample_size=32, layers_per_block=1, device="cuda",
                          dtype=torch.float16, **kw)
    sched = zoo.build_scheduler(model, "DDIMScheduler")
    if model == "sd15":
        pipe = diffusers.StableDiffusionPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        dims, extra = 768, {}
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            unet=unet, scheduler=sched)
        dims = 2048
        g = torch.Generator().manual_seed(2)
        extra = {k: torch.randn(1, 1280, generator=g).cuda().half()
                 for k in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")}
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    pe, ne = (torch.randn(1, 77, dims, generator=g).cuda().half() for _ in range(2))
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=256, width=256,
              num_inference_steps=4, output_type="latent", **extra)
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    fastdiff.accelerate(pipe)
    # Under FASTDIFF_PREBUILT=require (gpu.sh's prebuilt and wheel phases) the tiny SD1.5's 80
    # channels have no add_layer_norm cubin (C < 129 runs on the JIT, by design), which require
    # refuses (the H200's wheel phase): this test is about the graphs, so it runs under 'on'.
    prev = fastdiff.ops.set_prebuilt("on") if fastdiff.prebuilt.mode() == "require" else None
    try:
        out = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    finally:
        if prev is not None:
            fastdiff.ops.set_prebuilt(prev)
    assert pipe.__dict__[acc.STATE_ATTR].graphs.captures >= 1
    fastdiff.restore(pipe)
    _close(out.float(), ref.float(), 2e-2)


# ---------------------------------------------------------------- every scheduler family

FAMILY_KINDS = ["PNDMScheduler", "PNDMScheduler-prk", "EulerAncestralDiscreteScheduler",
                "UniPCMultistepScheduler", "LCMScheduler", "HeunDiscreteScheduler",
                "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                "DPMSolverSinglestepScheduler",
                "DEISMultistepScheduler", "LMSDiscreteScheduler", "DDPMScheduler",
                "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"]


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_every_family_runs_one_fused_step_per_model_evaluation(parts, kind):
    """Issue 14's done-when: the SD pipeline with each family (PNDM: SD1.5's default) runs one
    denoise_step per model evaluation after accelerate, and equals stock within 2e-3."""
    unet = _unet()
    pipe = _pipe(parts, kind=kind, unet=unet)
    # the Runge-Kutta warm-up takes 12 calls; diffusers' own set_timesteps needs 5+ steps for it
    kw = dict(guidance_scale=5.0, num_inference_steps=6 if kind.endswith("-prk") else 3)
    ref = _run(pipe, **kw)
    fastdiff.accelerate(pipe)
    calls = {"unet": 0, "step": 0}
    step_op = torch.ops.fastdiff.denoise_step

    def counting_forward(*a, **k):
        calls["unet"] += 1
        return forward(*a, **k)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is step_op:
                calls["step"] += 1
            return func(*args, **(kwargs or {}))

    forward = pipe.unet.forward
    pipe.unet.forward = counting_forward
    try:
        with Count():
            out = _run(pipe, **kw)
    finally:
        del pipe.unet.forward
    assert calls["unet"] > 0 and calls["step"] == calls["unet"], calls
    _close(out, ref)
