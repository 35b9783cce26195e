"""The digits application: a class-conditional DDPM on scikit-learn's bundled 8x8 digits, built
on the library (``fastdiff.unet``, ``fastdiff.diffusion``, the engine and the fused ops).

- ``weights/``: the shipped model (safetensors + JSON config);
- ``data.py``: the data, an independent classifier and the quality metrics (accuracy, FD);
- ``train.py``: training with EMA and atomic, resumable checkpoints (torchrun: DDP);
- ``generate.py``: many samples in atomic shards (torchrun: sharded across ranks);
- ``cli.py``: the ``fastdiff sample | eval | train | generate`` commands;
- ``distributed.py``, ``image.py``: torchrun set-up, PNG grids.

It needs scikit-learn and pillow, which the library does not: ``pip install 'fastdiff[digits]'``
(``make sample`` installs them).
"""
from __future__ import annotations

import importlib

_PACKAGES = {"sklearn": "scikit-learn", "PIL": "pillow"}


def require(module: str):
    """Imports ``module`` (sklearn or PIL), or says which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = _PACKAGES.get(module.split(".")[0], module)
        raise ImportError(f"the digits application needs {package}, which fastdiff itself "
                          "does not: pip install 'fastdiff[digits]'") from None
