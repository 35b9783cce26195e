"""Training through fastdiff.accelerate: gradients of an accelerated diffusers U-Net equal
stock's (fp32, CPU, 1e-4 relative) with LoRA-like adapters, full fine-tuning and gradient
checkpointing, and the fused ops are what runs (no fall-back for autograd)."""
import copy

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import fastdiff  # noqa: E402
from fastdiff import ops  # noqa: E402

RTOL = 1e-4

# diffusers' tiny test U-Nets (as in test_accelerate.py) with 8 groups: with 32 groups of 32
# channels the time embedding, added per channel before a one-channel group's norm, has an exact
# gradient of 0 (and both sides give rounding noise).
TINY_COND = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
                 out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                 norm_num_groups=8)
# AdaGN ('scale_shift' time embedding) and self-attention blocks with their own group norm
TINY_UNCOND = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                   in_channels=3, out_channels=3, norm_num_groups=8,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   resnet_time_scale_shift="scale_shift")


class LoRA(nn.Module):
    """A LoRA-like adapter: base(x) + up(down(x)), base frozen. up starts non-zero so that
    both factors get a gradient."""

    def __init__(self, base, rank=4):
        super().__init__()
        self.base = base
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride,
                                  base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def _cond_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**TINY_COND)


def _uncond_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**TINY_UNCOND)


def _inputs(unet):
    g = torch.Generator().manual_seed(1)
    c = unet.config
    x = torch.randn(2, c.in_channels, 16, 16, generator=g)
    kw = {}
    if isinstance(unet, diffusers.UNet2DConditionModel):
        kw["encoder_hidden_states"] = torch.randn(2, 7, c.cross_attention_dim, generator=g)
    target = torch.randn(2, c.out_channels, 16, 16, generator=g)
    return x, torch.tensor([10, 500]), kw, target


def _grads(unet, counts=None):
    x, t, kw, target = _inputs(unet)
    unet.zero_grad(set_to_none=True)
    loss = (unet(x, t, **kw).sample - target).square().mean()
    loss.backward()
    return {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}


@pytest.fixture
def counting(monkeypatch):
    """Counts calls of the fused ops' entry points (what the patched blocks call)."""
    counts = {"group_norm_silu": 0, "attention": 0, "denoise_step": 0}
    for name in counts:
        fn = getattr(ops, name)

        def counted(*a, _fn=fn, _name=name, **k):
            counts[_name] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(ops, name, counted)
    return counts


def _compare(stock, fast, counting, attention=True):
    ref = _grads(stock)
    counting.update(group_norm_silu=0, attention=0)
    got = _grads(fast)
    assert counting["group_norm_silu"] > 0
    if attention:
        assert counting["attention"] > 0
    assert ref.keys() == got.keys() and ref
    # Per tensor, relative to its largest element; a gradient that is 0 in exact arithmetic (a
    # key projection's bias, under softmax) is rounding noise on both sides: tensors below 1e-3
    # of the model's largest gradient are held to 1e-7 of it.
    floor = 1e-3 * max(r.abs().max().item() for r in ref.values())
    for name, r in ref.items():
        g = got[name]
        assert g is not None, f"{name}: no gradient (stock has one)"
        err = (g - r).abs().max().item()
        scale = max(r.abs().max().item(), floor)
        assert err <= RTOL * scale, f"{name}: {err:.3g} vs {scale:.3g}"


def _pair(build, adapt=None, train=False, checkpointing=False):
    stock = build()
    if adapt:
        stock.requires_grad_(False)
        adapt(stock)
    stock.train(train)
    if checkpointing:
        stock.enable_gradient_checkpointing()
    fast = copy.deepcopy(stock)
    fastdiff.accelerate(fast)
    return stock, fast


def _lora_first_resnet(unet):
    r = unet.down_blocks[0].resnets[0]
    r.conv1, r.conv2, r.time_emb_proj = LoRA(r.conv1), LoRA(r.conv2), LoRA(r.time_emb_proj)


def _lora_attention(unet):
    from diffusers.models.attention_processor import Attention
    for m in unet.modules():
        if isinstance(m, Attention):
            m.to_q, m.to_k, m.to_v = LoRA(m.to_q), LoRA(m.to_k), LoRA(m.to_v)
            m.to_out[0] = LoRA(m.to_out[0])


def test_lora_on_the_first_resnet_block_gets_stock_gradients(counting):
    """Issue 15: LoRA on conv1/conv2/time_emb_proj of the first ResnetBlock2D got None."""
    stock, fast = _pair(_cond_unet, _lora_first_resnet)
    _compare(stock, fast, counting)


@pytest.mark.parametrize("build", [_cond_unet, _uncond_unet], ids=["cross", "self-scale-shift"])
def test_lora_on_attention_projections_gets_stock_gradients(build, counting):
    stock, fast = _pair(build, _lora_attention)
    _compare(stock, fast, counting)


@pytest.mark.parametrize("build", [_cond_unet, _uncond_unet], ids=["cross", "self-scale-shift"])
def test_full_fine_tuning_gets_stock_gradients(build, counting):
    stock, fast = _pair(build, train=True)
    _compare(stock, fast, counting)


def test_gradient_checkpointing_gets_stock_gradients(counting):
    stock, fast = _pair(_cond_unet, train=True, checkpointing=True)
    _compare(stock, fast, counting)


def test_training_steps_match_stock():
    """A few optimizer steps on both models leave the same weights."""
    stock, fast = _pair(_uncond_unet, train=True)
    for unet in (stock, fast):
        opt = torch.optim.SGD(unet.parameters(), lr=0.05)
        for _ in range(3):
            _grads(unet)
            opt.step()
    for (name, a), b in zip(stock.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_scheduler_step_under_autograd_is_fused(counting):
    """A stateless scheduler step (DDIM, DDPM, Euler) with a gradient runs denoise_step and
    backpropagates as diffusers' step does; a multistep solver's step (state slots) is left to
    diffusers."""
    for kind, fused_calls in (("DDIMScheduler", 1), ("DDPMScheduler", 1),
                              ("EulerDiscreteScheduler", 1), ("DPMSolverMultistepScheduler", 0)):
        stock = getattr(diffusers, kind)(num_train_timesteps=1000)
        stock.set_timesteps(5)
        pipe = diffusers.DDPMPipeline(unet=_uncond_unet(), scheduler=copy.deepcopy(stock))
        fastdiff.accelerate(pipe)
        g = torch.Generator().manual_seed(3)
        sample, m = torch.randn(2, 1, 3, 4, 4, generator=g)
        grads = []
        counting["denoise_step"] = 0
        for sched in (stock, pipe.scheduler):
            mo = m.clone().requires_grad_()
            out = sched.step(mo, sched.timesteps[0], sample).prev_sample
            grads.append(torch.autograd.grad((out * sample).sum(), mo)[0])
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
        assert counting["denoise_step"] == fused_calls, kind


def _patched(model):
    """A copy of ``model`` with its blocks on the fused ops, as accelerate patches a pipeline's
    VAE and ControlNet."""
    from types import SimpleNamespace

    from fastdiff.integrations.diffusers import blocks
    fast = copy.deepcopy(model)
    counts, _ = blocks.patch_modules(fast, SimpleNamespace(patched=[], processors=[]))
    assert counts["resnets"] > 0
    return fast


def _model_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["vae", "controlnet"])
def test_vae_and_controlnet_training_gets_stock_gradients(kind, counting):
    """The VAE (encoder and decoder) and a ControlNet, fine-tuned in full on the fused ops."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    if kind == "vae":
        model = diffusers.AutoencoderKL(block_out_channels=[32, 64], in_channels=3,
                                        out_channels=3, norm_num_groups=8,
                                        down_block_types=["DownEncoderBlock2D"] * 2,
                                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4)
        x = torch.randn(1, 3, 16, 16, generator=g)

        def loss(m):
            return (m(x).sample - x).square().mean()
    else:
        model = diffusers.ControlNetModel(
            block_out_channels=(32, 64), layers_per_block=1, in_channels=4, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
            conditioning_embedding_out_channels=(16, 32))
        x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
        cond = torch.randn(2, 3, 16, 16, generator=g)   # (16, 32): one 2x downsampling

        def loss(m):
            down, mid = m(x, torch.tensor([10, 500]), ctx, cond, return_dict=False)
            return sum(t.square().mean() for t in (*down, mid))
    model.train()
    ref = _model_grads(model, loss)
    counting.update(group_norm_silu=0, attention=0)
    got = _model_grads(_patched(model), loss)
    assert counting["group_norm_silu"] > 0 and counting["attention"] > 0
    floor = 1e-3 * max(r.abs().max().item() for r in ref.values() if r is not None)  # as above
    for name, r in ref.items():
        if r is None:
            assert got[name] is None, name
            continue
        err = (got[name] - r).abs().max().item()
        assert err <= RTOL * max(r.abs().max().item(), floor), f"{name}: {err:.3g}"
