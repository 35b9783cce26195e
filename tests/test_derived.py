"""accelerate's fusions over derived weights (fastdiff/integrations/diffusers/derived.py) follow
the model's weights: in-place updates (load_state_dict, LoRA fusion) and parameters replaced by
new tensors, eagerly and under the U-Net's CUDA graphs (simulated: a real replay runs no
Python, so the wrapper must make stale derived tensors again before it replays).

The fusions: every ResnetBlock2D's time projection in one batched matmul per width, its bias
summed into conv1's; a 1x1 conv_shortcut accumulated into conv2's output, the two biases
summed; self-attention's q, k, v and cross-attention's k, v each one matmul over stacked
weights.
"""
import copy

import pytest
import torch

pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff import capture  # noqa: E402
from fastdiff.integrations import diffusers as acc  # noqa: E402
from fastdiff.integrations.diffusers import derived, zoo  # noqa: E402


@pytest.fixture
def sim(monkeypatch):
    monkeypatch.setattr(capture, "SIMULATE", True)


# 'dev' (tests/conftest.py): 'sim', CPU with the graph simulation; 'cuda', real CUDA graphs


def _unet(dev="cpu"):
    torch.manual_seed(0)
    return zoo.build_unet("sd15", width=0.1, sample_size=16, layers_per_block=1).to(dev)


def _inputs(dev="cpu"):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=g).to(dev), torch.tensor([10, 500]).to(dev),
            torch.randn(2, 77, 768, generator=g).to(dev))


def _shortcut_block(u):
    return next(m for m in u.modules() if type(m).__name__ == "ResnetBlock2D"
                and m.conv_shortcut is not None)


def _block(u):
    return next(m for m in u.modules() if type(m).__name__ == "BasicTransformerBlock")


# (what, the module holding the parameter, its name)
EDITS = [
    # (not at the 32-channel level: with 32 groups each channel is normalized on its own, and
    # a per-channel time embedding cancels)
    ("time projection weight", lambda u: u.down_blocks[1].resnets[0].time_emb_proj, "weight"),
    ("time projection bias", lambda u: u.up_blocks[2].resnets[0].time_emb_proj, "bias"),
    ("conv1 bias", lambda u: u.mid_block.resnets[0].conv1, "bias"),
    ("shortcut bias", lambda u: _shortcut_block(u).conv_shortcut, "bias"),
    ("conv2 bias of a shortcut block", lambda u: _shortcut_block(u).conv2, "bias"),
    ("self-attention k", lambda u: _block(u).attn1.to_k, "weight"),
    ("cross-attention v", lambda u: _block(u).attn2.to_v, "weight"),
    # (the folded norms' shifts and folds, and the biases the block adds at its end)
    ("self-attention output bias", lambda u: _block(u).attn1.to_out[0], "bias"),
]


def _close(out, ref, rtol=None):
    # (CUDA: cuDNN convolutions run fp32 in TF32 by default, matmuls do not)
    rtol = rtol or (2e-3 if out.is_cuda else 1e-4)
    err = (out - ref).abs().max().item()
    assert err <= rtol * max(1.0, ref.abs().max().item()), f"max error {err:.3g}"


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("what,owner,name", EDITS, ids=[e[0] for e in EDITS])
def test_fused_paths_follow_weight_updates(dev, what, owner, name, graphs):
    stock = _unet(dev)
    fast = fastdiff.accelerate(copy.deepcopy(stock), cuda_graphs=graphs)
    args = _inputs(dev)
    with torch.no_grad():
        before = stock(*args).sample
        _close(fast(*args).sample, before)
        new = torch.randn(getattr(owner(stock), name).shape,
                          generator=torch.Generator().manual_seed(2)).to(dev)
        for m in (stock, fast):                               # in place
            getattr(owner(m), name).copy_(new)
        ref = stock(*args).sample
        assert not torch.allclose(ref, before, atol=1e-3)     # the edit shows in the output
        _close(fast(*args).sample, ref)
        for m in (stock, fast):                               # a new tensor
            setattr(owner(m), name, torch.nn.Parameter(getattr(owner(m), name) * -2.0))
        _close(fast(*args).sample, stock(*args).sample)
    if graphs:
        assert fast.forward.captures >= 1 and fast.forward.replays >= 1


def test_a_replay_with_a_stale_derived_weight_is_refused(sim, monkeypatch):
    """Without the refresh before a replay, a GPU would replay the old stacked weights: the
    simulated replay raises instead."""
    monkeypatch.setattr(acc.GraphedUNet, "_refresh", lambda self: None)
    fast = fastdiff.accelerate(_unet())
    args = _inputs()
    with torch.no_grad():
        fast(*args)
        _block(fast).attn1.to_k.weight.mul_(2.0)
        with pytest.raises(capture.CaptureError, match="stale during a graph replay"):
            fast(*args)


@pytest.mark.parametrize("fold", ["auto", "off"])
def test_the_fusions_are_taken_and_restore_drops_them(fold, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CONV_FOLD", fold)
    unet = fastdiff.accelerate(_unet(), cuda_graphs=False)
    with torch.no_grad():
        unet(*_inputs())
    made = unet.__dict__[derived.ATTR]
    # the time projections stacked per width (32, 64, 128 at width 0.1); per transformer block
    # the cross-attention's k/v stacked, and its keys and values of the context, per context
    # tensor; its three LayerNorms folded into the GEMMs after them (a weight and a fold
    # each), the shifts its second and third norm read and the biases it adds at its end.
    # Folded convs (auto): each resnet's two convs packed (conv2 with its 1x1 shortcut) and
    # their summed biases in float32 (conv1 + time projection, conv2 [+ shortcut]), each
    # Transformer2DModel's proj_in and proj_out bias, the block's end biases in float32 (the
    # feed-forward output's epilogue). Unfolded (off): the resnets' summed biases in their dtype
    # (conv1 + time projection per resnet, conv2 + shortcut per 1x1 shortcut), the block's end
    # biases too.
    kinds = [type(m).__name__ for m in unet.modules()]
    blocks, resnets, t2d = (kinds.count(k) for k in
                            ("BasicTransformerBlock", "ResnetBlock2D", "Transformer2DModel"))
    shortcuts = sum(getattr(m, "conv_shortcut", None) is not None for m in unet.modules()
                    if type(m).__name__ == "ResnetBlock2D")
    assert blocks and resnets and t2d and shortcuts
    per_input = [d for d in made if isinstance(d, derived.PerInput)]
    made = [d for d in made if isinstance(d, derived.Derived)]

    def count(make):
        return sum(d.make is make for d in made)
    assert count(derived.stack_t) == 3
    assert count(derived.cat) == blocks
    folds = [d.make.part for d in made if isinstance(d.make, acc.blocks._LnFold)]
    assert sorted(folds) == ["fold"] * 3 * blocks + ["weight"] * 3 * blocks
    if fold == "auto":
        assert count(acc.blocks._pack) == 2 * resnets
        assert count(acc.blocks.shift_f32) == 2 * blocks + blocks + 2 * resnets + 2 * t2d
        assert count(derived.total) == 0
    else:
        assert count(acc.blocks._pack) == 0
        assert count(acc.blocks.shift_f32) == 2 * blocks
        assert count(derived.total) == resnets + shortcuts + blocks
    assert all(d.value is not None for d in made)
    assert len(per_input) == blocks and all(d._eager.value is not None for d in per_input)
    fastdiff.restore(unet)
    assert derived.ATTR not in unet.__dict__


def test_autograd_through_the_weights_takes_the_unfused_paths():
    """Derived tensors are made without autograd: with gradients recorded through the weights
    the blocks run their own layers, and every weight gets its stock gradient."""
    stock = _unet()
    fast = fastdiff.accelerate(copy.deepcopy(stock), cuda_graphs=False)
    args = _inputs()
    for m in (stock, fast):
        m(*args).sample.square().mean().backward()
    for (n, p), q in zip(stock.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=n)
    assert derived.ATTR not in fast.__dict__


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_context_keys_and_values_follow_the_context(dev, graphs):
    """Cross-attention's keys and values are made once per context tensor: again for a new
    tensor, and for the same tensor updated in place; under graphs the wrapper copies an
    unchanged context into its static buffer only once."""
    stock = _unet(dev)
    fast = fastdiff.accelerate(copy.deepcopy(stock), cuda_graphs=graphs)
    x, t, ctx = _inputs(dev)
    ctx2 = torch.randn(ctx.shape, generator=torch.Generator().manual_seed(3)).to(dev)
    with torch.no_grad():
        for c in (ctx, ctx, ctx2, ctx2):
            _close(fast(x, t, c).sample, stock(x, t, c).sample)
        ctx2.mul_(-1.5)                                       # the same tensor, new values
        _close(fast(x, t, ctx2).sample, stock(x, t, ctx2).sample)
        with torch.inference_mode():                          # no version counter: made anew
            xi, ti, ci = (a.clone() for a in (x, t, ctx))
            _close(fast(xi, ti, ci).sample, stock(xi, ti, ci).sample)
    if graphs:
        entry = next(iter(fast.forward.graphs.entries.values()))
        static = entry.state[0]
        buf = next(b for b in static if isinstance(b, torch.Tensor) and b.shape == ctx.shape)
        with torch.no_grad():
            fast(x, t, ctx2)                                  # copied in (after other inputs)
            v = buf._version
            _close(fast(x, t, ctx2).sample, stock(x, t, ctx2).sample)
        assert buf._version == v                              # unchanged: not copied again


def test_an_eager_pipeline_projects_the_context_once_per_call(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    calls = []
    real = derived.linear

    def counting(*ts):
        calls.append(ts[-1].shape)
        return real(*ts)

    monkeypatch.setattr(derived, "linear", counting)
    unet = _unet()
    pipe = diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet,
        scheduler=zoo.build_scheduler("sd15", "DDIMScheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 77, 768, generator=g),
              negative_prompt_embeds=torch.randn(1, 77, 768, generator=g), height=128,
              width=128, num_inference_steps=4, output_type="latent")
    ref = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
    fastdiff.accelerate(pipe, cuda_graphs=False)
    out = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
    _close(out, ref)
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
    assert len(calls) == blocks                               # 4 steps, one projection each
