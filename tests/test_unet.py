"""The conditional U-Net: fused vs plain torch ops, conditioning paths, weights on disk."""
import json

import pytest
import torch

from fastdiff.unet import UNet, UNetConfig

CONFIGS = [
    # class-conditional digits-like model (the shipped architecture, narrower)
    UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2), attn_resolutions=(4,),
               head_dim=8, groups=4, num_classes=10),
    # text-like context through cross-attention + low-res image by concatenation, no classes,
    # odd channel counts per group and attention at two resolutions
    UNetConfig(image_size=16, in_channels=3, out_channels=3, base_channels=24,
               channel_mult=(1, 2), attn_resolutions=(16, 8), head_dim=12, groups=6,
               num_classes=0, context_dim=20, cond_channels=3),
]


def _randomised(cfg, seed=0):
    torch.manual_seed(seed)
    m = UNet(cfg).eval()
    with torch.no_grad():   # the zero-initialised layers would hide differences
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def _inputs(cfg, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([3.0, 500.0, 999.0])[:B]
    kw = {}
    if cfg.num_classes:
        kw["labels"] = torch.tensor([0, 7, cfg.num_classes])[:B]
    if cfg.context_dim:
        kw["context"] = torch.randn(B, 7, cfg.context_dim, generator=g)
        kw["context_mask"] = torch.tensor([[True] * 7, [True] * 3 + [False] * 4,
                                           [True] + [False] * 6])[:B]
    if cfg.cond_channels:
        kw["low_res"] = torch.randn(B, cfg.cond_channels, cfg.image_size // 2,
                                    cfg.image_size // 2, generator=g)
    return x, t, kw


@pytest.mark.parametrize("cfg", CONFIGS, ids=["class", "context+lowres"])
def test_fused_and_plain_paths_agree(cfg):
    m = _randomised(cfg)
    x, t, kw = _inputs(cfg)
    with torch.no_grad():
        fused = m(x, t, **kw)
        m.fused = False
        plain = m(x, t, **kw)
    assert fused.shape == (3, cfg.out_channels, cfg.image_size, cfg.image_size)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_padding_mask_hides_padded_tokens():
    cfg = CONFIGS[1]
    m = _randomised(cfg)
    x, t, kw = _inputs(cfg)
    with torch.no_grad():
        a = m(x, t, **kw)
        kw["context"][1, 3:] = 100.0        # change only the padded tokens of sample 1
        b = m(x, t, **kw)
    torch.testing.assert_close(a[1], b[1])


def test_condition_changes_the_output():
    cfg = CONFIGS[0]
    m = _randomised(cfg)
    x, t, kw = _inputs(cfg)
    with torch.no_grad():
        a = m(x, t, **kw)
        b = m(x, t, labels=torch.tensor([1, 2, 3]))
    assert not torch.allclose(a, b)


def test_dropout_only_in_training():
    m = _randomised(UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2),
                               attn_resolutions=(), groups=4, dropout=0.5))
    x, t, kw = _inputs(m.config)
    m.fused = False
    with torch.no_grad():
        assert torch.equal(m(x, t, **kw), m(x, t, **kw))
        m.train()
        assert not torch.equal(m(x, t, **kw), m(x, t, **kw))


@pytest.mark.parametrize("bad,msg", [
    ({"x": torch.randn(3, 1, 16, 16)}, "input 'x' must have shape \\(B, 1, 8, 8\\)"),
    ({"labels": torch.tensor([0, 11, 2])}, "'labels' must be in \\[0, 10\\]"),
    ({"labels": torch.tensor([0.0, 1.0, 2.0])}, "'labels' must be int64"),
    ({"labels": None}, "'labels' is required"),
])
def test_bad_inputs_are_named(bad, msg):
    cfg = CONFIGS[0]
    m = _randomised(cfg)
    x, t, kw = _inputs(cfg)
    args = {"x": x, **kw, **bad}
    with pytest.raises(ValueError, match=msg):
        m(args.pop("x"), t, **args)


@pytest.mark.parametrize("bad,msg", [
    ({"context": torch.randn(3, 7, 19)}, "'context' must have shape \\(B=3, L, 20\\)"),
    ({"low_res": torch.randn(3, 3, 5, 5)}, "'low_res' must have shape"),
    ({"low_res": None}, "'low_res' must have shape"),
])
def test_bad_conditioning_is_named(bad, msg):
    cfg = CONFIGS[1]
    m = _randomised(cfg)
    x, t, kw = _inputs(cfg)
    kw.update(bad)
    with pytest.raises(ValueError, match=msg):
        m(x, t, **kw)


def test_save_load_roundtrip_and_bad_checkpoints(tmp_path):
    cfg = CONFIGS[0]
    m = _randomised(cfg)
    path = str(tmp_path / "m.safetensors")
    m.save(path)
    loaded = UNet.load(path)
    x, t, kw = _inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, **kw), m(x, t, **kw), rtol=0, atol=0)
    # a corrupt weights file
    open(tmp_path / "bad.safetensors", "wb").write(b"not a safetensors file")
    (tmp_path / "bad.json").write_text((tmp_path / "m.json").read_text())
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        UNet.load(str(tmp_path / "bad.safetensors"))
    # weights that do not match their config
    cfg_json = json.loads((tmp_path / "m.json").read_text())
    cfg_json["base_channels"] = 8
    (tmp_path / "m.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ValueError, match="has shape|do not match"):
        UNet.load(path)
    with pytest.raises(FileNotFoundError, match="config .* not found"):
        UNet.load(str(tmp_path / "missing.safetensors"))


def test_config_is_validated():
    with pytest.raises(ValueError, match="divisible by groups"):
        UNetConfig(base_channels=30, groups=8)
    with pytest.raises(ValueError, match="image_size 10 must be divisible by 4"):
        UNetConfig(image_size=10, channel_mult=(1, 2, 2))


def test_unet_moves_between_devices_and_dtypes():
    """UNet must not shadow nn.Module._apply (which .to() / .cuda() / .half() go through)."""
    m = UNet(UNetConfig(image_size=8, base_channels=16, channel_mult=(1,), groups=4,
                        num_classes=3))
    assert next(m.to(torch.float64).parameters()).dtype == torch.float64
    assert next(m.to("cpu", torch.float32).parameters()).dtype == torch.float32
