"""Writing image grids (PNG or any format pillow writes: the digits extra)."""
from __future__ import annotations

import io
import os

import torch


def image_format(path: str) -> str:
    """The pillow format ``save_grid`` writes ``path`` in, from its extension; a ValueError if
    pillow cannot write a grayscale image under that name (checked by encoding a tiny one)."""
    from fastdiff.digits import require

    Image = require("PIL.Image")
    Image.init()
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    try:
        if fmt is None:
            raise ValueError("unknown")
        Image.new("L", (4, 4)).save(io.BytesIO(), format=fmt)
    except (ValueError, OSError, KeyError):
        why = f"extension {ext!r}" if ext else "no extension"
        raise ValueError(f"{path} has {why}: give an image file name such as .png") from None
    return fmt


def save_grid(images: torch.Tensor, path: str, cols: int, scale: int = 4, pad: int = 2) -> None:
    """(N, 1 or 3, H, W) in [-1, 1] -> one image file (format from the extension, written
    atomically, missing folders made), ``cols`` per row, each image upscaled ``scale``x.

    Single-channel images are drawn dark-on-light, as the digits are written.
    """
    from fastdiff.checkpoint import atomic_write
    from fastdiff.digits import require

    Image = require("PIL.Image")
    fmt = image_format(path)
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
    atomic_write(path, lambda f: canvas.save(f, format=fmt))
