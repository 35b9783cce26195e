"""fastdiff in Hugging Face diffusers: everything that knows about diffusers lives here.

- ``pipeline.py``: ``accelerate`` / ``restore`` / ``explain`` (in place, undoable, reported)
  and ``sample_pipeline`` (a pipeline's denoising loop on the sampling engine, whole steps in
  CUDA graphs);
- ``blocks.py``: ResnetBlock2D, conv_norm_out, GEGLU and attention processors on the fused ops;
- ``schedulers.py``: a scheduler's ``step`` as one ``denoise_step`` call, one adapter per
  scheduler family;
- ``graphs.py``: the U-Net forward captured in CUDA graphs per input signature;
- ``zoo.py``: SD1.5 / SDXL / DDPM-CIFAR10 U-Nets from their public configs, random weights.

diffusers itself is imported only when one of these functions runs, so ``import fastdiff``
works without it.
"""
from . import pipeline
from .blocks import FastdiffAttnProcessor, FastdiffFusedAttnProcessor
from .graphs import GraphedUNet
from .pipeline import (STATE_ATTR, Report, accelerate, engine_for, explain, restore,
                       sample_pipeline)
from .schedulers import FusedStep

__all__ = ["STATE_ATTR", "FastdiffAttnProcessor", "FastdiffFusedAttnProcessor", "FusedStep",
           "GraphedUNet", "Report", "accelerate", "engine_for", "explain", "pipeline", "restore",
           "sample_pipeline"]
