"""Public U-Net architectures built offline with random weights (benchmarks and parity tests).

``configs/unet_configs.json`` holds the published configurations of Stable Diffusion 1.5's and
SDXL's U-Nets and DDPM's CIFAR-10 U-Net (with their schedulers): the facts, not the weights.
``build_unet`` builds one with seeded random weights; ``width`` scales the channel counts and
the number of heads together, so a narrow model keeps the original head dims (SD1.5: 40/80/160).
Nothing is downloaded.
"""
from __future__ import annotations

import json
from importlib import resources

import torch

MODELS = ("sd15", "sdxl", "ddpm_cifar10")


def config(name: str) -> dict:
    """The diffusers constructor arguments of model ``name`` ('sd15', 'sdxl', 'ddpm_cifar10')
    and of its scheduler: ``{"unet": {...}, "scheduler": {...} or None}``."""
    if name not in MODELS:
        raise ValueError(f"'name' must be one of {MODELS}, got {name!r}")
    raw = json.loads(resources.files("fastdiff").joinpath("configs/unet_configs.json").read_text())
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    sched = raw.get(f"{name}_scheduler")
    return {"unet": strip(raw[f"{name}_unet"]), "unet_class": raw[f"{name}_unet"]["_class_name"],
            "scheduler": strip(sched) if sched else None,
            "scheduler_class": sched["_class_name"] if sched else None}


def build_unet(name: str, width: float = 1.0, seed: int = 0, dtype=torch.float32, device="cpu",
               **overrides):
    """A diffusers U-Net of architecture ``name`` with random weights, in eval mode.

    width: channel multiplier (heads scale with it, head dims stay); overrides: constructor
    arguments replacing the config's (e.g. sample_size, layers_per_block,
    transformer_layers_per_block)."""
    import diffusers

    if not 0 < width <= 1:
        raise ValueError(f"'width' must be in (0, 1], got {width}")
    c = config(name)
    kw = dict(c["unet"])
    if width != 1.0:
        groups = kw.get("norm_num_groups", 32)
        chans = [max(groups, round(ch * width / groups) * groups)
                 for ch in kw["block_out_channels"]]
        heads = kw.get("attention_head_dim")
        if isinstance(heads, int) and name == "sd15":        # SD1.5: 'attention_head_dim' = heads
            kw["attention_head_dim"] = max(1, round(heads * width))
        elif isinstance(heads, list):
            kw["attention_head_dim"] = [max(1, round(h * width)) for h in heads]
        kw["block_out_channels"] = chans
    kw.update(overrides)
    torch.manual_seed(seed)
    unet = getattr(diffusers, c["unet_class"])(**kw)
    return unet.to(device=device, dtype=dtype).eval()


def build_scheduler(name: str, kind: str | None = None, **overrides):
    """The model's scheduler config under scheduler class ``kind`` (default: the config's own;
    SDXL has none stored and gets SD's)."""
    import diffusers

    c = config(name)
    base = c["scheduler"] or config("sd15")["scheduler"]
    cls = getattr(diffusers, kind or c["scheduler_class"] or "DDIMScheduler")
    return cls.from_config({**base, **overrides})
