"""fastdiff.accelerate on diffusers pipelines: parity with the stock pipelines on CPU.

Models are built offline with random weights: diffusers' own tiny test configurations and the
SD1.5 / SDXL / DDPM-CIFAR10 configurations scaled down in width (head dims kept) and resolution.
Text pipelines get prompt_embeds and return latents, so no tokenizer or VAE is needed.
"""
import inspect
import logging

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")      # StableDiffusion(XL)Pipeline needs it importable

from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.integrations import diffusers as acc  # noqa: E402
from fastdiff.integrations.diffusers import zoo  # noqa: E402

STEPS = 3

# diffusers' tiny test U-Nets (tests/pipelines/stable_diffusion, tests/pipelines/ddpm)
TINY_COND = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                 out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                 norm_num_groups=32)
TINY_UNCOND = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=3,
                   out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"))

# (id, scheduler class, config overrides, pipeline call overrides)
SCHEDULERS = [
    ("ddim", "DDIMScheduler", {}, {}),
    ("ddim-eta", "DDIMScheduler", {"clip_sample": True, "set_alpha_to_one": True}, {"eta": 0.7}),
    ("ddpm", "DDPMScheduler", {}, {}),
    ("ddpm-large-clip", "DDPMScheduler", {"variance_type": "fixed_large", "clip_sample": True}, {}),
    ("dpm2m", "DPMSolverMultistepScheduler", {}, {}),
    ("dpm2m-heun", "DPMSolverMultistepScheduler", {"solver_type": "heun"}, {}),
    ("dpm-sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("euler", "EulerDiscreteScheduler", {}, {}),
]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return kw


@pytest.fixture(scope="module")
def sd_unet():
    return zoo.build_unet("sd15", width=0.5, sample_size=16, layers_per_block=1)


@pytest.fixture(scope="module")
def sdxl_unet():
    return zoo.build_unet("sdxl", width=0.2, sample_size=16, layers_per_block=1,
                          transformer_layers_per_block=[1, 1, 1])


@pytest.fixture(scope="module")
def ddpm_unet():
    return zoo.build_unet("ddpm_cifar10", sample_size=16, layers_per_block=1)


def _sd_pipe(unet, scheduler):
    p = diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                          scheduler=scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def _embeds(n, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 77, dim, generator=g), torch.randn(n, 77, dim, generator=g)


def _assert_parity(pipe, call, rtol=1e-4):
    """Stock output, then accelerated, then restored: accelerated ~ stock, restored == stock."""
    ref = call()
    fastdiff.accelerate(pipe)
    try:
        out = call()
    finally:
        fastdiff.restore(pipe)
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= rtol * max(scale, 1.0), \
        f"max |accelerated - stock| = {err:.3g} (scale {scale:.3g})"
    torch.testing.assert_close(call(), ref, rtol=0, atol=0)
    return out


def _sched(name, kind, cfg, **extra):
    return zoo.build_scheduler(name, kind, **cfg, **extra)


# ---------------------------------------------------------------- parity, pipelines

@pytest.mark.parametrize("sid,kind,cfg,call_kw", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_sd15_parity(sd_unet, sid, kind, cfg, call_kw):
    pipe = _sd_pipe(sd_unet, _sched("sd15", kind, cfg))
    pe, ne = _embeds(1, 768)
    _assert_parity(pipe, lambda: torch.as_tensor(pipe(
        prompt_embeds=pe, negative_prompt_embeds=ne, height=128, width=128,
        num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
        generator=torch.Generator().manual_seed(1), **call_kw).images))


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
@pytest.mark.parametrize("kind", ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                                  "EulerDiscreteScheduler"])
def test_sd15_prediction_types(sd_unet, kind, prediction):
    pipe = _sd_pipe(sd_unet, _sched("sd15", kind, {"prediction_type": prediction}))
    pe, ne = _embeds(1, 768)
    _assert_parity(pipe, lambda: torch.as_tensor(pipe(
        prompt_embeds=pe, negative_prompt_embeds=ne, height=128, width=128,
        num_inference_steps=STEPS, guidance_scale=3.0, output_type="latent",
        generator=torch.Generator().manual_seed(2)).images))


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_sd15_guidance_and_batch(sd_unet, guidance):
    """No guidance (batch N to the U-Net) and guidance with two images per prompt."""
    pipe = _sd_pipe(sd_unet, _sched("sd15", "DDIMScheduler", {}))
    pe, ne = _embeds(2, 768)
    _assert_parity(pipe, lambda: torch.as_tensor(pipe(
        prompt_embeds=pe, negative_prompt_embeds=ne, height=96, width=128,
        num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent",
        generator=torch.Generator().manual_seed(3)).images))


def test_tiny_sd_parity_with_attention_mask():
    """diffusers' tiny SD U-Net, called directly with a cross-attention padding mask."""
    unet = diffusers.UNet2DConditionModel(**_model(**TINY_COND)).eval()
    x = torch.randn(2, 4, 32, 32)
    ctx = torch.randn(2, 7, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        ref = unet(x, 10, ctx, encoder_attention_mask=mask).sample
        fastdiff.accelerate(unet)
        out = unet(x, 10, ctx, encoder_attention_mask=mask).sample
        fastdiff.restore(unet)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                                  "EulerDiscreteScheduler"])
def test_sdxl_parity(sdxl_unet, kind):
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=sdxl_unet, scheduler=_sched("sdxl", kind, {}))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(4)
    pe, ne = torch.randn(1, 77, 2048, generator=g), torch.randn(1, 77, 2048, generator=g)
    pp, npool = torch.randn(1, 1280, generator=g), torch.randn(1, 1280, generator=g)
    _assert_parity(pipe, lambda: torch.as_tensor(pipe(
        prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp,
        negative_pooled_prompt_embeds=npool, height=128, width=128, num_inference_steps=STEPS,
        guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(5)
    ).images))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_pipeline_parity(ddpm_unet, prediction):
    """DDPM-CIFAR10's U-Net (single 256-wide attention head, group_norm, residual, rescale)."""
    pipe = diffusers.DDPMPipeline(unet=ddpm_unet, scheduler=_sched(
        "ddpm_cifar10", "DDPMScheduler", {"prediction_type": prediction}))
    pipe.set_progress_bar_config(disable=True)
    _assert_parity(pipe, lambda: torch.as_tensor(pipe(
        batch_size=2, num_inference_steps=STEPS, output_type="np",
        generator=torch.Generator().manual_seed(6)).images), rtol=2e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_parity_tiny_scale_shift(eta):
    """diffusers' tiny unconditional U-Net with resnet_time_scale_shift='scale_shift'."""
    unet = diffusers.UNet2DModel(**_model(**TINY_UNCOND, resnet_time_scale_shift="scale_shift"))
    pipe = diffusers.DDIMPipeline(unet=unet.eval(), scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    _assert_parity(pipe, lambda: torch.as_tensor(pipe(
        batch_size=2, num_inference_steps=STEPS, eta=eta, output_type="np",
        generator=torch.Generator().manual_seed(7)).images), rtol=2e-4)


# ---------------------------------------------------------------- what gets swapped, and undo

def test_accelerate_patches_counts_idempotent_and_restore(sd_unet):
    pipe = _sd_pipe(sd_unet, _sched("sd15", "DDIMScheduler", {}))
    sig = inspect.signature(pipe.__call__)
    keys = list(sd_unet.state_dict())
    procs = {n: type(p) for n, p in sd_unet.attn_processors.items()}
    cls = type(pipe)
    assert fastdiff.accelerate(pipe) is pipe
    state = pipe.__dict__[acc.STATE_ATTR]
    counts = dict(state.counts)
    assert counts["resnets"] > 0 and counts["attention"] == len(procs) and counts["norm_out"] == 1
    assert counts["scheduler"] == 1
    from diffusers.models.activations import GEGLU
    assert counts["geglu"] == sum(type(m) is GEGLU for m in sd_unet.modules()) > 0
    from diffusers.models.attention import BasicTransformerBlock
    assert counts["transformer_blocks"] == sum(type(m) is BasicTransformerBlock
                                               for m in sd_unet.modules()) > 0
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    assert counts["transformers"] == sum(type(m) is Transformer2DModel
                                         for m in sd_unet.modules()) > 0
    assert all(isinstance(p, acc.FastdiffAttnProcessor) for p in sd_unet.attn_processors.values())
    fastdiff.accelerate(pipe)                      # twice: nothing more is patched
    assert pipe.__dict__[acc.STATE_ATTR].counts["resnets"] == counts["resnets"]
    assert isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
    assert inspect.signature(pipe.__call__) == sig
    assert list(sd_unet.state_dict()) == keys
    fastdiff.restore(pipe)
    assert type(pipe) is cls
    assert {n: type(p) for n, p in sd_unet.attn_processors.items()} == procs
    assert "step" not in pipe.scheduler.__dict__
    assert not any("forward" in m.__dict__ or "_get_output_for_continuous_inputs" in m.__dict__
                   for m in sd_unet.modules())
    assert acc.derived.ATTR not in sd_unet.__dict__
    fastdiff.restore(pipe)                         # restoring twice is harmless


def test_scheduler_swapped_after_accelerate_gets_fused_step(sd_unet):
    pipe = _sd_pipe(sd_unet, _sched("sd15", "DDIMScheduler", {}))
    fastdiff.accelerate(pipe)
    try:
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        assert "step" not in pipe.scheduler.__dict__
        pe, ne = _embeds(1, 768)
        pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64,
             num_inference_steps=2, output_type="latent")
        assert isinstance(pipe.scheduler.__dict__["step"], acc.FusedStep)
    finally:
        fastdiff.restore(pipe)


def test_unsupported_scheduler_runs_stock_and_logs(sd_unet, caplog):
    """A scheduler no family covers (TCD) is not fused: its step is kept, the reason logged
    once."""
    pipe = _sd_pipe(sd_unet, _sched("sd15", "TCDScheduler", {}))
    pe, ne = _embeds(1, 768)
    fastdiff.ops._logged.clear()
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        _assert_parity(pipe, lambda: torch.as_tensor(pipe(
            prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64,
            num_inference_steps=STEPS, output_type="latent",
            generator=torch.Generator().manual_seed(8)).images))
    assert "scheduler TCDScheduler not supported" in caplog.text


def test_accelerate_rejects_other_objects():
    with pytest.raises(ValueError, match="'obj' must be a diffusers pipeline"):
        fastdiff.accelerate(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'obj' must be a diffusers pipeline"):
        fastdiff.accelerate(object())


def test_gradients_backpropagate_through_the_fused_ops():
    unet = diffusers.UNet2DModel(**_model(**TINY_UNCOND))
    fastdiff.accelerate(unet)
    x = torch.randn(1, 3, 32, 32)
    loss = unet(x, 5).sample.square().mean()
    loss.backward()
    assert unet.conv_in.weight.grad is not None
    fastdiff.restore(unet)


@pytest.mark.parametrize("backend", ["auto", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_patched_equals_stock_and_keeps_autograd(dtype, backend, monkeypatch):
    """A patched GEGLU (linear_geglu; with FASTDIFF_GEGLU=split its projection, then
    fastdiff.geglu) equals diffusers' forward, and gradients flow through it."""
    from diffusers.models.activations import GEGLU

    monkeypatch.setenv("FASTDIFF_GEGLU", backend)
    torch.manual_seed(0)
    ff = diffusers.models.attention.FeedForward(40, activation_fn="geglu").to(dtype).eval()
    geglu = ff.net[0]
    assert type(geglu) is GEGLU
    h = torch.randn(2, 9, 40, dtype=dtype)
    with torch.no_grad():
        ref = ff(h)
    state = acc.pipeline._State()
    counts, _ = acc.blocks.patch_modules(ff, state)
    assert counts["geglu"] == 1 and "forward" in geglu.__dict__
    ran = []
    with torch.no_grad(), _recording_ops(ran):
        out = ff(h)
    fused = "fastdiff.linear_geglu" in ran
    assert fused == (backend == "auto") and ("fastdiff.geglu" in ran) != fused
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    x = h.float().requires_grad_()
    ff.float()
    ff(x).sum().backward()
    assert x.grad is not None and ff.net[0].proj.weight.grad is not None


@pytest.mark.parametrize("fold", ["auto", "off"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["self+cross", "self only", "only_cross", "no affine"])
def test_transformer_block_patched_equals_stock(dtype, kind, fold, monkeypatch):
    """A patched BasicTransformerBlock equals diffusers' forward: with its LayerNorms folded
    into the GEMMs after them (layer_norm_linear; FASTDIFF_NORM_FOLD=auto) and the attention
    projections accumulating into the residual stream, or (off, and blocks the fold does not
    take: only_cross) each residual add + LayerNorm as one add_layer_norm; autograd runs the
    unfolded path."""
    from diffusers.models.attention import BasicTransformerBlock

    monkeypatch.setenv("FASTDIFF_NORM_FOLD", fold)
    torch.manual_seed(0)
    kw = dict(cross_attention_dim=None if kind == "self only" else 24,
              only_cross_attention=kind == "only_cross",
              norm_elementwise_affine=kind != "no affine")
    block = BasicTransformerBlock(40, 2, 20, **kw).to(dtype).eval()
    for p in block.parameters():       # LayerNorms away from 1 and 0
        p.data += 0.1 * torch.randn_like(p)
    h = torch.randn(2, 9, 40, dtype=dtype)
    ctx = None if kind == "self only" else torch.randn(2, 5, 24, dtype=dtype)
    with torch.no_grad():
        ref = block(h, encoder_hidden_states=ctx)
    state = acc.pipeline._State()
    counts, _ = acc.blocks.patch_modules(block, state)
    assert counts["transformer_blocks"] == 1
    ran = []
    with torch.no_grad():
        block(h, encoder_hidden_states=ctx)          # (makes the derived weights)
        with _recording_ops(ran):
            out = block(h, encoder_hidden_states=ctx)
    if fold == "auto" and kind != "only_cross":
        # q/k/v, (q of the cross-attention,) GEGLU's projection: each reads its norm's input;
        # the feed-forward's output (a 1x1 norm_conv2d over the tokens, FASTDIFF_CONV_FOLD)
        # adds every bias the stream owes and the stream itself in its epilogue
        assert ran.count("fastdiff.layer_norm_linear") == (2 if kind == "self only" else 3)
        assert not {"fastdiff.add_layer_norm", "aten.native_layer_norm"} & set(ran)
        views = {"aten.view", "aten.permute", "aten._unsafe_view"}
        assert [r for r in ran if r not in views][-1] == "fastdiff.norm_conv2d"
        assert not {"aten.add", "aten.add_"} & set(ran)
    else:
        assert ran.count("fastdiff.add_layer_norm") == (1 if kind == "self only" else 2)
        # the feed-forward's output projection accumulates into the residual: no add at the end
        assert ran[-1] == "aten.addmm_" and "aten.add" not in ran
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    x = h.float().requires_grad_()
    block.float()
    block(x, encoder_hidden_states=None if ctx is None else ctx.float()).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("linear", [False, True], ids=["conv-proj", "linear-proj"])
def test_transformer_input_and_output_patched_equal_stock(dtype, linear, monkeypatch):
    """A patched Transformer2DModel equals diffusers' forward: its GroupNorm writes the
    tokens' (channels_last) layout, so proj_in runs on contiguous tokens with no copy before
    the first LayerNorm; proj_out runs on the tokens and the residual add reads them through a
    permuted view into a contiguous NCHW output."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    # (with FASTDIFF_CONV_FOLD=auto the norm runs inside proj_in and the residual inside
    # proj_out: tests/test_accelerate_conv_fold.py)
    monkeypatch.setenv("FASTDIFF_CONV_FOLD", "off")
    torch.manual_seed(0)
    t2d = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                             norm_num_groups=4, cross_attention_dim=12,
                             use_linear_projection=linear).to(dtype).eval()
    for p in t2d.parameters():
        p.data += 0.1 * torch.randn_like(p)
    x = torch.randn(2, 16, 3, 5, dtype=dtype)
    ctx = torch.randn(2, 4, 12, dtype=dtype)
    with torch.no_grad():
        ref = t2d(x, encoder_hidden_states=ctx, return_dict=False)[0]
        eager = []
        with _recording_ops(eager):
            t2d(x, encoder_hidden_states=ctx, return_dict=False)
    counts, _ = acc.blocks.patch_modules(t2d, acc.pipeline._State())
    assert counts["transformers"] == 1
    ran = []
    with torch.no_grad():
        t2d(x, encoder_hidden_states=ctx, return_dict=False)   # (makes the derived weights)
        with _recording_ops(ran):
            out = t2d(x, encoder_hidden_states=ctx, return_dict=False)[0]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert out.is_contiguous()
    # the end: proj_out accumulates into x + its bias (which the input norm wrote) in place,
    # reading the tokens transposed; eager copies the tokens to NCHW (a clone), runs proj_out
    # and adds the residual
    assert ran[-1] == "aten.baddbmm_" and "aten.add" not in ran
    assert "aten.clone" in eager[len(eager) - 1 - eager[::-1].index("aten.permute"):]
    head = ran[:ran.index("fastdiff.layer_norm_linear")]     # (the block's folded norm1)
    assert "fastdiff.group_norm_silu_residual" in head and "aten.clone" not in head
    assert "aten.convolution" not in ran                   # 1x1 convs run as Linears


@pytest.mark.parametrize("dim,flip,shift,scale", [(320, True, 0, 1), (256, False, 1, 1),
                                                   (7, True, 1, 1), (64, False, 0, 1000.0)])
@pytest.mark.parametrize("tdtype", [torch.int64, torch.float32, torch.float64, torch.float16])
def test_timesteps_patched_equal_stock_exactly(dim, flip, shift, scale, tdtype):
    """The patched Timesteps (frequencies made once, sine and cosine written into their
    halves) gives diffusers' values bit for bit, in 3 kernels where diffusers runs 11."""
    from diffusers.models.embeddings import Timesteps

    m = Timesteps(dim, flip, shift, scale)
    t = torch.tensor([0, 1, 999, 500, 37]).to(tdtype)
    if tdtype.is_floating_point:
        t = t + 0.25
    ref = m(t)
    eager = []
    with _recording_ops(eager):
        m(t)
    counts, _ = acc.blocks.patch_modules(m, acc.pipeline._State())
    assert counts["timesteps"] == 1
    for _ in range(2):                            # the second call: frequencies cached
        ran = []
        with _recording_ops(ran):
            out = m(t)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    kernels = [op for op in ran if op not in ("aten.slice", "aten.unsqueeze", "aten.empty",
                                              "aten.select", "aten.view")]
    extra = (scale != 1) + (dim % 2) + (tdtype == torch.float64)
    assert len(kernels) == 3 + extra and len(eager) > len(ran), (kernels, eager)


def _recording_ops(ran):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Rec(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ran.append(f"{func.namespace}.{func.overloadpacket.__name__}")
            return func(*args, **(kwargs or {}))
    return Rec()


def test_transformer_block_other_norm_types_keep_diffusers_forward():
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 2, 16, norm_type="ada_norm_zero",
                                  num_embeds_ada_norm=10).eval()
    h, t, cls = torch.randn(2, 4, 32), torch.tensor([1, 2]), torch.tensor([0, 3])
    with torch.no_grad():
        ref = block(h, timestep=t, class_labels=cls)
    acc.blocks.patch_modules(block, acc.pipeline._State())
    ran = []
    with torch.no_grad(), _recording_ops(ran):
        out = block(h, timestep=t, class_labels=cls)
    assert "fastdiff.add_layer_norm" not in ran and "fastdiff.attention" in ran
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- attention processor

@pytest.mark.parametrize("head_dim,heads,cross", [(40, 2, False), (80, 2, True), (160, 1, True),
                                                  (256, 1, False), (320, 1, False)])
def test_attention_processor_matches_sdpa(head_dim, heads, cross, caplog):
    """SD1.5's head dims, UNet2DModel's single 256-wide head, and > 256 (SDPA fallback)."""
    torch.manual_seed(0)
    dim = head_dim * heads
    attn = Attention(dim, cross_attention_dim=48 if cross else None, heads=heads,
                     dim_head=head_dim).eval()
    x = torch.randn(2, 37, dim)
    ctx = torch.randn(2, 11, 48) if cross else None
    mask = torch.zeros(2, 1, 11 if cross else 37)
    mask[1, :, 5:] = -10000.0
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        ref = attn(x, ctx, attention_mask=mask)
        attn.set_processor(acc.FastdiffAttnProcessor())
        fastdiff.ops._logged.clear()
        with caplog.at_level(logging.INFO, logger="fastdiff"):
            out = attn(x, ctx, attention_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert ("SDPA used" in caplog.text) == (head_dim > 256)


def test_folded_transformer_block_follows_weight_updates():
    """The folded weights are derived tensors: a LayerNorm weight, a projection weight and an
    output bias updated in place (or replaced) after the first call are seen by the next."""
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(40, 2, 20, cross_attention_dim=24).eval()
    h, ctx = torch.randn(2, 9, 40) + 2.0, torch.randn(2, 5, 24)
    acc.blocks.patch_modules(block, acc.pipeline._State())
    with torch.no_grad():
        block(h, encoder_hidden_states=ctx)
        block.norm2.weight.mul_(1.5)
        block.attn1.to_out[0].bias.add_(0.25)
        block.ff.net[0].proj.weight.add_(0.01)
        block.norm3.bias = torch.nn.Parameter(torch.full((40,), 0.5))
        out = block(h, encoder_hidden_states=ctx)
        ref = type(block).forward(block, h, encoder_hidden_states=ctx)    # (diffusers' own)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_folded_transformer_block_leaves_hooked_modules_to_their_forward():
    """The folded block computes its attentions, norms and projections without calling them:
    with a forward hook on one (an attention-map probe), or a forward of its own, it runs the
    unfolded path, where the hook fires, and equals stock."""
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(40, 2, 20, cross_attention_dim=24).eval()
    h, ctx = torch.randn(2, 9, 40), torch.randn(2, 5, 24)
    with torch.no_grad():
        ref = block(h, encoder_hidden_states=ctx)
    acc.blocks.patch_modules(block, acc.pipeline._State())
    seen = []
    handle = block.attn2.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    ran = []
    with torch.no_grad(), _recording_ops(ran):
        out = block(h, encoder_hidden_states=ctx)
    handle.remove()
    assert seen == [(2, 9, 40)] and "fastdiff.layer_norm_linear" not in ran
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    block.attn1.to_q.forward = lambda x: torch.nn.functional.linear(x, block.attn1.to_q.weight)
    with torch.no_grad(), _recording_ops(ran):
        out = block(h, encoder_hidden_states=ctx)
    assert "fastdiff.layer_norm_linear" not in ran
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_norm_fold_choice(monkeypatch):
    monkeypatch.delenv("FASTDIFF_NORM_FOLD", raising=False)
    assert acc.blocks.norm_fold_backend() == "auto"
    monkeypatch.setenv("FASTDIFF_NORM_FOLD", "on")
    with pytest.raises(ValueError, match="FASTDIFF_NORM_FOLD must be one of"):
        acc.blocks.norm_fold_backend()


def test_geglu_backend_choice(monkeypatch):
    monkeypatch.delenv("FASTDIFF_GEGLU", raising=False)
    assert acc.blocks.geglu_backend() == "fused"
    monkeypatch.setenv("FASTDIFF_GEGLU", "split")
    assert acc.blocks.geglu_backend() == "split"
    monkeypatch.setenv("FASTDIFF_GEGLU", "cublas")
    with pytest.raises(ValueError, match="FASTDIFF_GEGLU must be one of"):
        acc.blocks.geglu_backend()


def test_attention_backend_choice(monkeypatch):
    """FASTDIFF_ATTENTION: 'auto' (default) is SDPA on CUDA, where fastdiff's kernel measured
    slower (H200, 2026-11-30), and fastdiff's elsewhere; 'fastdiff' / 'sdpa' force one."""
    class OnCuda:  # attention_backend reads the tensor's is_cuda alone
        is_cuda = True
    cpu = torch.zeros(1)
    monkeypatch.delenv("FASTDIFF_ATTENTION", raising=False)
    assert acc.blocks.attention_backend(cpu) == "fastdiff"
    assert acc.blocks.attention_backend(OnCuda()) == "sdpa"
    monkeypatch.setenv("FASTDIFF_ATTENTION", "fastdiff")
    assert acc.blocks.attention_backend(OnCuda()) == "fastdiff"
    monkeypatch.setenv("FASTDIFF_ATTENTION", "sdpa")
    assert acc.blocks.attention_backend(cpu) == "sdpa"
    assert acc.blocks.attention_policy() == "torch SDPA (FASTDIFF_ATTENTION=sdpa)"
    monkeypatch.setenv("FASTDIFF_ATTENTION", "flash")
    with pytest.raises(ValueError, match="FASTDIFF_ATTENTION must be one of"):
        acc.blocks.attention_backend(cpu)
    assert "invalid FASTDIFF_ATTENTION='flash'" in acc.blocks.attention_policy()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("backend", [None, "fastdiff", "sdpa"])
def test_attention_processor_follows_the_backend(device, backend, monkeypatch):
    if backend is None:
        monkeypatch.delenv("FASTDIFF_ATTENTION", raising=False)
    else:
        monkeypatch.setenv("FASTDIFF_ATTENTION", backend)
    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    attn = Attention(80, heads=2, dim_head=40).eval().to(device, dtype)
    x = torch.randn(2, 37, 80, device=device, dtype=dtype)
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        ref = attn(x)
        attn.set_processor(acc.FastdiffAttnProcessor())
        ran = []
        with _recording_ops(ran):
            out = attn(x)
    want = backend or ("sdpa" if device == "cuda" else "fastdiff")
    assert ("fastdiff.attention" in ran) == (want == "fastdiff")
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_attention_processor_group_norm_residual_rescale():
    torch.manual_seed(0)
    attn = Attention(64, heads=1, dim_head=64, norm_num_groups=32, residual_connection=True,
                     rescale_output_factor=2.0, bias=True, upcast_softmax=True,
                     _from_deprecated_attn_block=True).eval()
    x = torch.randn(2, 64, 6, 5)
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        ref = attn(x)
        attn.set_processor(acc.FastdiffAttnProcessor())
        out = attn(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
