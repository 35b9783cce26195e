"""Writing image grids as PNG (pillow: the digits extra)."""
from __future__ import annotations

import torch


def save_grid(images: torch.Tensor, path: str, cols: int, scale: int = 4, pad: int = 2) -> None:
    """(N, 1 or 3, H, W) in [-1, 1] -> one PNG, ``cols`` per row, each image upscaled ``scale``x.

    Single-channel images are drawn dark-on-light, as the digits are written.
    """
    from fastdiff.digits import require

    Image = require("PIL.Image")
    n, c, h, w = images.shape
    rows = (n + cols - 1) // cols
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if c == 1:
        x = 255 - x
    H, W = h * scale + pad, w * scale + pad
    canvas = Image.new("L" if c == 1 else "RGB", (cols * W + pad, rows * H + pad), color=255)
    for i in range(n):
        arr = x[i, 0].numpy() if c == 1 else x[i].permute(1, 2, 0).numpy()
        tile = Image.fromarray(arr).resize((w * scale, h * scale), Image.BICUBIC)
        canvas.paste(tile, (pad + (i % cols) * W, pad + (i // cols) * H))
    canvas.save(path)
