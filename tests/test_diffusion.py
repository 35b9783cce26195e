"""DDPM forward process, L_simple and the samplers built on denoise_step."""
import numpy as np
import pytest
import torch

from fastdiff.diffusion import SOLVERS, EMA, GaussianDiffusion, sample
from fastdiff.unet import UNet, UNetConfig

TINY = UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2), attn_resolutions=(4,),
                  head_dim=8, groups=4, num_classes=10, dropout=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = UNet(TINY).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def test_q_sample_matches_eq4():
    d = GaussianDiffusion()
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    ac = torch.tensor(d.alphas_cumprod)[t].view(-1, 1, 1, 1)
    expected = ac.sqrt() * x0.double() + (1 - ac).sqrt() * noise.double()
    torch.testing.assert_close(d.q_sample(x0, t, noise).double(), expected, rtol=1e-5, atol=1e-6)
    assert d.betas.dtype == np.float64 and d.betas[0] == 1e-4 and d.betas[-1] == 0.02


def test_loss_is_l_simple(model):
    d = GaussianDiffusion()
    x0 = torch.randn(5, 1, 8, 8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    loss = d.loss(model, x0, torch.arange(5), generator=g1)
    t = torch.randint(0, d.T, (5,), generator=g2)
    noise = torch.randn(x0.shape, generator=g2)
    with torch.no_grad():
        pred = model(d.q_sample(x0, t, noise), t.float(), torch.arange(5))
    torch.testing.assert_close(loss.detach(), ((pred - noise) ** 2).mean())


@pytest.mark.parametrize("solver", SOLVERS)
def test_same_seed_same_samples_and_fused_matches_plain(model, solver):
    d = GaussianDiffusion()
    labels = torch.tensor([0, 3, 9])
    a, _ = sample(model, d, labels, solver=solver, num_steps=8, guidance_scale=3.0, seed=5)
    b, _ = sample(model, d, labels, solver=solver, num_steps=8, guidance_scale=3.0, seed=5)
    assert torch.equal(a, b)
    c, _ = sample(model, d, labels, solver=solver, num_steps=8, guidance_scale=3.0, seed=6)
    assert not torch.equal(a, c)
    model.fused = False
    try:
        p, _ = sample(model, d, labels, solver=solver, num_steps=8, guidance_scale=3.0, seed=5)
    finally:
        model.fused = True
    torch.testing.assert_close(a, p, rtol=1e-4, atol=1e-4)


def test_progressive_x0(model):
    d = GaussianDiffusion()
    x, prog = sample(model, d, torch.tensor([1, 2]), num_steps=10, progress_steps=(0, 5, 9))
    assert sorted(prog) == [0, 5, 9]
    torch.testing.assert_close(prog[9].clamp(-1, 1), x)   # DDIM's last step lands on its x0


def test_bad_sampler_arguments():
    d = GaussianDiffusion()
    with pytest.raises(ValueError, match="'solver' must be one of"):
        d.step_table("heun")
    with pytest.raises(ValueError, match="'num_steps' must be in"):
        d.step_table("ddim", 0)


def test_ema_moves_towards_the_weights():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.9)
    before = ema.model.weight.clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    torch.testing.assert_close(ema.model.weight, before + 0.1)
