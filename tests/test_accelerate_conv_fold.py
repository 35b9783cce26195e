"""accelerate's GroupNorm folds into the convolutions (issue 18): a ResnetBlock2D as two
``norm_conv2d`` calls after ``group_norm_scale_shift`` statistics passes, an up block's skip
concatenation read in place, a Transformer2DModel's input norm inside proj_in and its residual
inside proj_out, a folded BasicTransformerBlock's feed-forward output with its biases and
residual in one epilogue. Each equals diffusers' stock forward; FASTDIFF_CONV_FOLD=off, hooks,
FreeU and autograd keep the earlier paths."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.models.resnet import ResnetBlock2D  # noqa: E402
from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D  # noqa: E402

from fastdiff.integrations import diffusers as acc  # noqa: E402
from fastdiff.integrations.diffusers import zoo  # noqa: E402

FOLD_OPS = {"fastdiff.norm_conv2d", "fastdiff.group_norm_scale_shift"}
VIEWS = {"aten.view", "aten._unsafe_view", "aten.permute", "aten.t", "aten.transpose",
         "aten.expand", "aten.split_with_sizes", "aten.split", "aten.slice", "aten.unsqueeze",
         "aten.reshape", "aten.detach", "aten.alias"}


def _recording(ran):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Rec(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ran.append(f"{func.namespace}.{func.overloadpacket.__name__}")
            return func(*args, **(kwargs or {}))
    return Rec()


def _jiggle(m, seed=0):
    """Non-trivial norm weights and biases (diffusers initializes them to 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    return m


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.delenv("FASTDIFF_CONV_FOLD", raising=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cin,cout,temb", [(32, 32, 24), (32, 48, 24), (16, 16, None),
                                           (48, 24, None)])
def test_resnet_fold_equals_stock(dtype, cin, cout, temb):
    """Two norm_conv2d calls and two statistics passes, nothing else: no convolution, no
    GroupNorm, no add, no SiLU (the time projection's SiLU aside); a 1x1 shortcut inside
    conv2's K loop, an identity one as its residual."""
    torch.manual_seed(0)
    block = _jiggle(ResnetBlock2D(in_channels=cin, out_channels=cout,
                                  temb_channels=temb or 8, groups=8)).to(dtype).eval()
    if temb is None:
        block.time_emb_proj = None
    x = torch.randn(2, cin, 5, 7, dtype=dtype) + 0.5
    t = torch.randn(2, temb, dtype=dtype) if temb else None
    with torch.no_grad():
        ref = block(x, t)
    counts, _ = acc.blocks.patch_modules(block, acc.pipeline._State())
    assert counts["resnets"] == 1
    ran = []
    with torch.no_grad():
        block(x, t)                             # (makes the derived weights)
        with _recording(ran):
            out = block(x, t)
    torch.testing.assert_close(out, ref, **_tol(dtype))
    assert out.is_contiguous() and out.dtype == dtype
    assert ran.count("fastdiff.norm_conv2d") == 2
    assert ran.count("fastdiff.group_norm_scale_shift") == 2
    assert not {"aten.convolution", "aten.native_group_norm", "fastdiff.group_norm_silu",
                "aten.add", "aten.add_", "aten.baddbmm_", "aten.cat"} & set(ran)


def test_resnet_fold_reads_channels_last_input():
    torch.manual_seed(0)
    block = _jiggle(ResnetBlock2D(in_channels=16, out_channels=24, temb_channels=8,
                                  groups=4)).eval()
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    t = torch.randn(2, 8)
    with torch.no_grad():
        ref = block(x, t)
    acc.blocks.patch_modules(block, acc.pipeline._State())
    with torch.no_grad():
        out = block(x, t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["up", "cross"])
def test_up_block_reads_the_skip_in_place(kind):
    """An up block's resnets get the hidden states and the skip as norm_conv2d's two inputs:
    the concatenation is never written (no aten.cat), and the block equals stock."""
    torch.manual_seed(0)
    if kind == "up":
        block = UpBlock2D(in_channels=16, prev_output_channel=24, out_channels=24,
                          temb_channels=12, num_layers=2, resnet_groups=4, add_upsample=True)
    else:
        block = CrossAttnUpBlock2D(in_channels=16, out_channels=24, prev_output_channel=24,
                                   temb_channels=12, num_layers=2, resnet_groups=4,
                                   cross_attention_dim=10, num_attention_heads=2,
                                   add_upsample=False)
    block = _jiggle(block).eval()
    h = torch.randn(2, 24, 4, 6)
    skips = (torch.randn(2, 16, 4, 6), torch.randn(2, 24, 4, 6))
    t = torch.randn(2, 12)
    kw = {"encoder_hidden_states": torch.randn(2, 3, 10)} if kind == "cross" else {}
    with torch.no_grad():
        ref = block(h, skips, t, **kw)
    counts, _ = acc.blocks.patch_modules(block, acc.pipeline._State())
    assert counts["up_blocks"] == 1
    ran = []
    with torch.no_grad():
        block(h, skips, t, **kw)                # (makes the derived weights)
        with _recording(ran):
            out = block(h, skips, t, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert "aten.cat" not in ran and ran.count("fastdiff.norm_conv2d") >= 4


def test_up_block_with_freeu_or_fold_off_keeps_the_concatenation(monkeypatch):
    torch.manual_seed(0)
    block = _jiggle(UpBlock2D(in_channels=8, prev_output_channel=8, out_channels=8,
                              temb_channels=4, num_layers=1, resnet_groups=4,
                              add_upsample=False)).eval()
    h, skips, t = torch.randn(1, 8, 3, 3), (torch.randn(1, 8, 3, 3),), torch.randn(1, 4)
    block.resolution_idx = 0
    block.s1, block.s2, block.b1, block.b2 = 0.9, 0.2, 1.2, 1.4          # FreeU on
    with torch.no_grad():              # (FreeU scales the hidden states in place: clones)
        ref = block(h.clone(), skips, t)
    acc.blocks.patch_modules(block, acc.pipeline._State())
    ran = []
    with torch.no_grad(), _recording(ran):
        out = block(h.clone(), skips, t)
    assert "aten.cat" in ran
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    block.s1 = block.s2 = block.b1 = block.b2 = None
    monkeypatch.setenv("FASTDIFF_CONV_FOLD", "off")
    ran.clear()
    with torch.no_grad(), _recording(ran):
        block(h, skips, t)
    assert "aten.cat" in ran and not FOLD_OPS & set(ran)


def test_resnet_fold_follows_weight_updates():
    """The packed conv weights and summed biases are derived tensors: a conv weight updated in
    place, a bias replaced and a norm weight changed are seen by the next call."""
    torch.manual_seed(0)
    block = _jiggle(ResnetBlock2D(in_channels=16, out_channels=24, temb_channels=8,
                                  groups=4)).eval()
    x, t = torch.randn(2, 16, 5, 5), torch.randn(2, 8)
    acc.blocks.patch_modules(block, acc.pipeline._State())
    with torch.no_grad():
        block(x, t)
        block.conv1.weight.mul_(1.5)
        block.conv_shortcut.weight.add_(0.1)
        block.conv2.bias = torch.nn.Parameter(torch.full((24,), 0.25))
        block.norm2.weight.mul_(0.5)
        out = block(x, t)
        ref = type(block).forward(block, x, t)          # (diffusers' own)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_resnet_fold_leaves_hooked_modules_and_autograd_to_the_unfolded_path():
    torch.manual_seed(0)
    block = _jiggle(ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=8,
                                  groups=4)).eval()
    x, t = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    with torch.no_grad():
        ref = block(x, t)
    acc.blocks.patch_modules(block, acc.pipeline._State())
    seen = []
    handle = block.conv2.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    ran = []
    with torch.no_grad(), _recording(ran):
        out = block(x, t)
    handle.remove()
    assert seen == [(2, 16, 4, 4)] and not FOLD_OPS & set(ran)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ran.clear()
    with _recording(ran):                      # autograd records through the weights
        out = block(x, t)
    assert not FOLD_OPS & set(ran)
    out.sum().backward()
    assert block.conv1.weight.grad is not None


@pytest.mark.parametrize("linear", [False, True])
def test_transformer_norm_inside_proj_in_and_residual_inside_proj_out(linear):
    """A Transformer2DModel: statistics pass, proj_in normalizing on load and writing the
    tokens' layout, the blocks, proj_out adding the input back in its epilogue; the folded
    block's feed-forward output is a norm_conv2d too (its biases and the stream in its
    epilogue: no add_ at the block's end)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    t2d = _jiggle(Transformer2DModel(num_attention_heads=2, attention_head_dim=8,
                                     in_channels=16, norm_num_groups=4, cross_attention_dim=12,
                                     use_linear_projection=linear)).eval()
    x, ctx = torch.randn(2, 16, 3, 5), torch.randn(2, 4, 12)
    with torch.no_grad():
        ref = t2d(x, encoder_hidden_states=ctx, return_dict=False)[0]
    acc.blocks.patch_modules(t2d, acc.pipeline._State())
    ran = []
    with torch.no_grad():
        t2d(x, encoder_hidden_states=ctx, return_dict=False)   # (makes the derived weights)
        with _recording(ran):
            out = t2d(x, encoder_hidden_states=ctx, return_dict=False)[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert out.is_contiguous()
    ran = [r for r in ran if r not in VIEWS]
    assert ran[:2] == ["fastdiff.group_norm_scale_shift", "fastdiff.norm_conv2d"]
    assert ran[-1] == "fastdiff.norm_conv2d" and ran.count("fastdiff.norm_conv2d") == 3
    # (the cross-attention's output projection still accumulates into the stream)
    assert ran.count("aten.addmm_") == 1
    assert not {"aten.add", "aten.add_", "aten.baddbmm_", "fastdiff.group_norm_silu_residual",
                "aten.convolution"} & set(ran)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_unet_with_the_conv_fold_equals_the_unet_without(model, monkeypatch):
    """A whole U-Net: every resnet, up block and transformer on the fold, equal to the same
    model patched with FASTDIFF_CONV_FOLD=off and to stock."""
    kw = (dict(width=0.5, sample_size=8, layers_per_block=1) if model == "sd15" else
          dict(width=0.2, sample_size=8, layers_per_block=1,
               transformer_layers_per_block=[1, 1, 2]))
    unet = zoo.build_unet(model, **kw).eval()
    stock = copy.deepcopy(unet)
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, unet.config.cross_attention_dim)
    add = ({} if model == "sd15" else dict(added_cond_kwargs={
        "text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)}))
    with torch.no_grad():
        ref = stock(x, 321, ctx, **add).sample
    acc.blocks.patch_modules(unet, acc.pipeline._State())
    ran = []
    with torch.no_grad():
        unet(x, 321, ctx, **add)                # (makes the derived weights)
        with _recording(ran):
            out = unet(x, 321, ctx, **add).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    resnets = sum(type(m) is ResnetBlock2D for m in unet.modules())
    assert ran.count("fastdiff.group_norm_scale_shift") >= 2 * resnets
    monkeypatch.setenv("FASTDIFF_CONV_FOLD", "off")
    off_ran = []
    with torch.no_grad(), _recording(off_ran):
        off = unet(x, 321, ctx, **add).sample
    assert not FOLD_OPS & set(off_ran)
    torch.testing.assert_close(off, ref, rtol=1e-4, atol=1e-4)
    # every up block resnet's skip concatenation is gone
    skips = sum(len(b.resnets) for b in unet.up_blocks)
    assert ran.count("aten.cat") == off_ran.count("aten.cat") - skips


def test_conv_fold_choice(monkeypatch):
    assert acc.blocks.conv_fold_backend() == "auto"
    monkeypatch.setenv("FASTDIFF_CONV_FOLD", "off")
    assert acc.blocks.conv_fold_backend() == "off"
    monkeypatch.setenv("FASTDIFF_CONV_FOLD", "on")
    with pytest.raises(ValueError, match="FASTDIFF_CONV_FOLD must be one of"):
        acc.blocks.conv_fold_backend()
