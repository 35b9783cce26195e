"""A conditional U-Net for DDPM (Ho et al. 2020, Sec. 4 and Appendix B), in one file.

Encoder-decoder with skip connections; residual blocks conditioned on the time embedding (plus a
class embedding) through AdaGN scale/shift (Dhariwal & Nichol 2021); self-attention at chosen
resolutions; cross-attention to a context sequence with a padding mask; a low-resolution image
concatenated to the input. GroupNorm+SiLU and attention run on fastdiff's fused ops, in
sampling and in training (their autograd formulas are in fastdiff/ops.py); with ``fused=False``
the same weights run on plain torch ops (the tests hold the two paths to each other).

Shapes: x (B, C_in, S, S), t (B,) float timesteps, labels (B,) int64 in [0, num_classes]
(num_classes is the null label used for classifier-free guidance), context (B, L, context_dim)
with context_mask (B, L) bool (True = real token), low_res (B, cond_channels, s, s).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff import capture, ops


@dataclass
class UNetConfig:
    image_size: int = 16
    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 32
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple = (8,)     # feature-map sizes with self-attention
    head_dim: int = 32
    groups: int = 8
    num_classes: int = 10              # 0: unconditional
    context_dim: int = 0               # > 0: cross-attention to a context sequence
    cond_channels: int = 0             # > 0: a low-resolution image concatenated to the input
    dropout: float = 0.1

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        for m in self.channel_mult:
            if (self.base_channels * m) % self.groups:
                raise ValueError(f"base_channels * channel_mult ({self.base_channels * m}) must "
                                 f"be divisible by groups ({self.groups})")
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by "
                             f"{2 ** (len(self.channel_mult) - 1)} (one halving per level)")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) float timesteps -> (B, dim) (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm_act(norm: nn.GroupNorm, x, fused, scale=None, shift=None, silu=True):
    """GroupNorm (+ AdaGN scale/shift) (+ SiLU), fused or in plain torch."""
    if fused:
        return ops.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                   scale=scale, shift=shift, silu=silu)
    y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    if scale is not None:
        y = y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(y) if silu else y


def _attend(q, k, v, mask, fused):
    """q (B, H, Lq, D), k/v (B, H, Lk, D), mask (B, 1, 1, Lk) bool or None."""
    if fused:
        return ops.attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, then AdaGN(emb) -SiLU-dropout-conv (zero-initialised), plus a skip."""

    def __init__(self, cin, cout, emb_dim, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb, fused):
        h = self.conv1(_norm_act(self.norm1, x, fused))
        scale, shift = self.emb(F.silu(emb)).chunk(2, dim=1)
        h = _norm_act(self.norm2, h, fused, scale.contiguous(), shift.contiguous())
        return self.skip(x) + self.conv2(self.dropout(h))


class AttnBlock(nn.Module):
    """Self-attention over the feature map, then (with a context) cross-attention to it."""

    def __init__(self, ch, head_dim, groups, context_dim):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))
        self.cross = None
        if context_dim:
            self.cross_norm = nn.GroupNorm(groups, ch)
            self.to_q = nn.Conv2d(ch, ch, 1)
            self.to_kv = nn.Linear(context_dim, 2 * ch)
            self.cross = _zero(nn.Conv2d(ch, ch, 1))

    def _heads(self, t):  # (B, C, L) -> (B, H, L, C / H)
        B, C, L = t.shape
        return t.reshape(B, self.heads, C // self.heads, L).transpose(2, 3)

    def _merge(self, o, shape):  # (B, H, L, D) -> (B, C, S, S)
        return o.transpose(2, 3).reshape(shape)

    def forward(self, x, context, context_mask, fused):
        B, C, H, W = x.shape
        q, k, v = self.qkv(_norm_act(self.norm, x, fused, silu=False)).flatten(2).chunk(3, dim=1)
        x = x + self.proj(self._merge(_attend(self._heads(q), self._heads(k), self._heads(v),
                                              None, fused), x.shape))
        if self.cross is not None:
            q = self._heads(self.to_q(_norm_act(self.cross_norm, x, fused, silu=False)).flatten(2))
            k, v = self.to_kv(context).transpose(1, 2).chunk(2, dim=1)
            mask = None if context_mask is None else context_mask[:, None, None, :]
            x = x + self.cross(self._merge(_attend(q, self._heads(k), self._heads(v), mask, fused),
                                           x.shape))
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig, fused: bool = True):
        super().__init__()
        self.config = c = config
        self.fused = fused
        ch = c.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes else None
        self.conv_in = nn.Conv2d(c.in_channels + c.cond_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, res = [ch], c.image_size
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                block = nn.ModuleList([ResBlock(ch, c.base_channels * mult, emb_dim, c.groups,
                                                c.dropout)])
                ch = c.base_channels * mult
                if res in c.attn_resolutions:
                    block.append(AttnBlock(ch, c.head_dim, c.groups, c.context_dim))
                self.down.append(block)
                skips.append(ch)
            if level < len(c.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, c.groups, c.dropout),
                                  AttnBlock(ch, c.head_dim, c.groups, c.context_dim),
                                  ResBlock(ch, ch, emb_dim, c.groups, c.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(ch + skips.pop(), c.base_channels * mult, emb_dim,
                                                c.groups, c.dropout)])
                ch = c.base_channels * mult
                if res in c.attn_resolutions:
                    block.append(AttnBlock(ch, c.head_dim, c.groups, c.context_dim))
                if level > 0 and i == c.num_res_blocks:
                    block.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    block.append(nn.Conv2d(ch, ch, 3, padding=1))
                    res *= 2
                self.up.append(block)
        self.norm_out = nn.GroupNorm(c.groups, ch)
        self.conv_out = _zero(nn.Conv2d(ch, c.out_channels, 3, padding=1))

    def _check(self, x, labels, context, low_res):
        c = self.config
        want = (c.in_channels, c.image_size, c.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"UNet: input 'x' must have shape (B, {want[0]}, {want[1]}, "
                             f"{want[2]}), got {tuple(x.shape)}")
        if c.num_classes:
            if labels is None:
                raise ValueError("UNet: 'labels' is required (use the null label "
                                 f"{c.num_classes} for unconditional)")
            if labels.shape != (x.shape[0],) or labels.dtype != torch.long:
                raise ValueError(f"UNet: 'labels' must be int64 of shape ({x.shape[0]},), got "
                                 f"{labels.dtype} {tuple(labels.shape)}")
            if not capture.capturing():     # a host read: refused inside a CUDA graph
                self.check_labels(labels)
        if c.context_dim:
            if context is None or context.dim() != 3 or context.shape[0] != x.shape[0] \
                    or context.shape[2] != c.context_dim:
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"UNet: 'context' must have shape (B={x.shape[0]}, L, "
                                 f"{c.context_dim}), got {got}")
        if c.cond_channels:
            if low_res is None or low_res.dim() != 4 or low_res.shape[:2] != (x.shape[0], c.cond_channels) \
                    or c.image_size % low_res.shape[-1] or low_res.shape[-1] != low_res.shape[-2]:
                got = None if low_res is None else tuple(low_res.shape)
                raise ValueError(f"UNet: 'low_res' must have shape (B={x.shape[0]}, "
                                 f"{c.cond_channels}, s, s) with s dividing {c.image_size}, got {got}")

    def check_labels(self, labels: torch.Tensor) -> None:
        """Raises ValueError unless every label is in [0, num_classes]. Reads the values on the
        host: samplers call it once before capturing a step in a CUDA graph (the forward's own
        check is skipped inside a capture, which refuses host reads)."""
        n = self.config.num_classes
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) <= n):
            raise ValueError(f"UNet: 'labels' must be in [0, {n}] ({n} = unconditional), got "
                             f"values {int(labels.min())}..{int(labels.max())}")

    def forward(self, x, t, labels=None, context=None, context_mask=None, low_res=None):
        self._check(x, labels, context, low_res)
        fused = self.fused
        emb = self.time_mlp(timestep_embedding(t.expand(x.shape[0]) if t.dim() == 0 else t,
                                               self.config.base_channels).to(x.dtype))
        if self.class_emb is not None:
            emb = emb + self.class_emb(labels)
        if low_res is not None:
            x = torch.cat([x, F.interpolate(low_res, size=x.shape[-2:], mode="bilinear",
                                            align_corners=False)], dim=1)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            for layer in block:
                h = self._run_layer(layer, h, emb, context, context_mask, fused)
            hs.append(h)
        for layer in self.mid:
            h = self._run_layer(layer, h, emb, context, context_mask, fused)
        for block in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            for layer in block:
                h = self._run_layer(layer, h, emb, context, context_mask, fused)
        return self.conv_out(_norm_act(self.norm_out, h, fused))

    @staticmethod
    def _run_layer(layer, h, emb, context, context_mask, fused):
        if isinstance(layer, ResBlock):
            return layer(h, emb, fused)
        if isinstance(layer, AttnBlock):
            return layer(h, context, context_mask, fused)
        return layer(h)

    # ---- weights: safetensors + a JSON config, never pickle ----

    def save(self, path: str) -> None:
        """Writes ``path`` (.safetensors) and ``path`` with .json, each atomically."""
        from fastdiff.checkpoint import atomic_write_json, atomic_save_safetensors

        atomic_save_safetensors({k: v.contiguous() for k, v in self.state_dict().items()}, path)
        atomic_write_json(asdict(self.config), _config_path(path))

    @classmethod
    def load(cls, path: str, fused: bool = True) -> "UNet":
        """Weights + config saved by ``save``; returned in eval mode, ready to sample."""
        from fastdiff.checkpoint import load_safetensors

        cfg_path = _config_path(path)
        try:
            with open(cfg_path) as f:
                cfg = UNetConfig(**json.load(f))
        except FileNotFoundError:
            raise FileNotFoundError(f"UNet.load: config {cfg_path} not found next to {path}") from None
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"UNet.load: config {cfg_path} is not a valid UNetConfig: {err}") from None
        model = cls(cfg, fused=fused)
        state = load_safetensors(path)
        missing = set(model.state_dict()) - set(state)
        unexpected = set(state) - set(model.state_dict())
        if missing or unexpected:
            raise ValueError(f"UNet.load: weights {path} do not match config {cfg_path}: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        for k, v in model.state_dict().items():
            if state[k].shape != v.shape:
                raise ValueError(f"UNet.load: weight '{k}' has shape {tuple(state[k].shape)} in "
                                 f"{path}, the config needs {tuple(v.shape)}")
        model.load_state_dict(state)
        return model.eval()


def _config_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"
