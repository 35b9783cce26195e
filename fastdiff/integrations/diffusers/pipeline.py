"""``accelerate`` / ``restore``: fastdiff dropped into a diffusers pipeline in place, and
``sample_pipeline``: a pipeline's denoising loop on the sampling engine.

``accelerate(pipe)`` (or ``accelerate(unet)``) patches objects in place and keeps everything
needed to undo it (``restore``): the U-Net's blocks on the fused ops (``blocks.py``), the
scheduler's step on ``denoise_step`` (``schedulers.py``), and on CUDA the U-Net forward captured
in a CUDA graph per input signature (``graphs.py``). The pipeline's class is swapped for a
same-named subclass whose ``__call__`` re-patches a scheduler swapped in later and checks the
weights of the U-Net graphs once per call. Only forwards and processors are swapped:
parameters, buffers and state_dict keys are untouched, so weights loaded or fused later (LoRA)
are used. Anything the fused code does not cover (a custom processor, gradients enabled, a
scheduler configuration without a table) runs diffusers' own code, and the reason is logged
once on the ``fastdiff`` logger.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from fastdiff import schedules
from fastdiff.engine import SamplingEngine
from fastdiff.ops import logger

from . import blocks, schedulers
from .graphs import GraphedUNet

STATE_ATTR = "_fastdiff_accelerated"


def _is_unet(obj) -> bool:
    return type(obj).__name__ in ("UNet2DModel", "UNet2DConditionModel") or (
        isinstance(obj, nn.Module) and hasattr(obj, "conv_in") and hasattr(obj, "up_blocks"))


class _State:
    """What accelerate changed on one object, and how to undo it."""

    def __init__(self):
        self.undo: list = []
        self.counts: dict = {}
        self.graphs = None


def accelerate(obj, *, cuda_graphs: bool = True):
    """Accelerates a diffusers pipeline or U-Net in place and returns it.

    obj: a pipeline with a ``unet`` (DDPMPipeline, DDIMPipeline, StableDiffusionPipeline,
    StableDiffusionXLPipeline, ...) or a bare UNet2DModel / UNet2DConditionModel. The pipeline's
    call signature and outputs are unchanged; calling it again is harmless; ``restore(obj)``
    undoes it. cuda_graphs: capture the U-Net forward in CUDA graphs when it runs on a GPU.
    """
    if isinstance(obj, nn.Module):
        unet, pipe = obj, None
        if not _is_unet(unet):
            raise ValueError("accelerate: 'obj' must be a diffusers pipeline with a .unet or a "
                             f"UNet2DModel/UNet2DConditionModel, got {type(obj).__name__}")
    else:
        pipe, unet = obj, getattr(obj, "unet", None)
        if not isinstance(unet, nn.Module) or not _is_unet(unet):
            raise ValueError("accelerate: 'obj' must be a diffusers pipeline with a .unet or a "
                             f"UNet2DModel/UNet2DConditionModel, got {type(obj).__name__}")
    state = obj.__dict__.get(STATE_ATTR)
    if state is None:
        state = _State()
    counts = blocks.patch_unet(unet, state.undo)
    for k, v in counts.items():
        state.counts[k] = state.counts.get(k, 0) + v
    if cuda_graphs and not isinstance(unet.__dict__.get("forward"), GraphedUNet):
        state.graphs = GraphedUNet(unet)
        unet.forward = state.graphs
        state.undo.append(state.graphs.close)
        state.undo.append(functools.partial(unet.__dict__.pop, "forward", None))
    if pipe is not None:
        if getattr(pipe, "scheduler", None) is not None:
            state.counts["scheduler"] = int(schedulers.patch(pipe.scheduler))
        cls = type(pipe)
        if not getattr(cls, "_fastdiff_wrapped", False):
            pipe.__class__ = _accelerated_class(cls)
            state.undo.append(functools.partial(setattr, pipe, "__class__", cls))
    object.__setattr__(obj, STATE_ATTR, state)
    logger.info("fastdiff.accelerate(%s): %s", type(obj).__name__, state.counts)
    return obj


def restore(obj):
    """Undoes ``accelerate(obj)`` (a no-op on an object that was not accelerated)."""
    state = obj.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return obj
    for fn in reversed(state.undo):
        fn()
    unet = obj if isinstance(obj, nn.Module) else getattr(obj, "unet", None)
    eng = unet.__dict__.pop("_fastdiff_engine", None) if unet is not None else None
    if eng is not None:
        eng.close()
    sched = getattr(obj, "scheduler", None)
    if sched is not None and not isinstance(obj, nn.Module):
        schedulers.unpatch(sched)
    return obj


@functools.lru_cache(maxsize=None)
def _accelerated_class(cls):
    """A subclass of the pipeline's class whose ``__call__`` first (re)patches the scheduler, so
    a scheduler swapped in after ``accelerate`` gets the fused step too."""
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        state = self.__dict__.get(STATE_ATTR)
        if state is None:
            return original(self, *args, **kwargs)
        sched = getattr(self, "scheduler", None)
        if sched is not None:
            schedulers.patch(sched)
        if state.graphs is None:
            return original(self, *args, **kwargs)
        with state.graphs.hold_weights():          # the weights' addresses: once per call
            return original(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "_fastdiff_wrapped": True,
                                       "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


# ---------------------------------------------------------------- the loop on the engine

def diffusers_unet_fn(unet):
    """model_fn for a diffusers UNet2DModel / UNet2DConditionModel. Calls the class's forward
    (not a CUDA-graph wrapper installed by ``accelerate``): the engine captures the whole step."""
    forward = type(unet).forward
    cond_model = type(unet).__name__ != "UNet2DModel"

    def fn(x, t, encoder_hidden_states=None, text_embeds=None, time_ids=None, class_labels=None):
        if not cond_model:
            return forward(unet, x, t, class_labels=class_labels, return_dict=False)[0]
        added = ({"text_embeds": text_embeds, "time_ids": time_ids}
                 if text_embeds is not None else None)
        return forward(unet, x, t, encoder_hidden_states, class_labels=class_labels,
                       added_cond_kwargs=added, return_dict=False)[0]
    return fn


def engine_for(unet, *, cuda_graphs: bool = True) -> SamplingEngine:
    """A SamplingEngine over a diffusers U-Net (accelerated or not), kept on the U-Net so its
    graphs are reused by later calls."""
    eng = unet.__dict__.get("_fastdiff_engine")
    if eng is None or eng.cuda_graphs != cuda_graphs:
        eng = SamplingEngine(diffusers_unet_fn(unet), cuda_graphs=cuda_graphs,
                             parameters=lambda: list(unet.parameters()))
        object.__setattr__(unet, "_fastdiff_engine", eng)
    return eng


@torch.no_grad()
def sample_pipeline(pipe, *, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                    prompt_embeds: torch.Tensor | None = None,
                    negative_prompt_embeds: torch.Tensor | None = None,
                    added_cond_kwargs: dict | None = None, negative_added_cond_kwargs=None,
                    batch_size: int | None = None, height: int | None = None,
                    width: int | None = None, generator: torch.Generator | None = None,
                    latents: torch.Tensor | None = None, eta: float = 0.0,
                    callback: Callable | None = None, progress_bar: bool = False) -> torch.Tensor:
    """A diffusers pipeline's denoising loop on the engine: returns the final latents.

    For text-conditioned pipelines (StableDiffusion, StableDiffusionXL) pass ``prompt_embeds``
    (and for guidance ``negative_prompt_embeds``; SDXL also ``added_cond_kwargs`` =
    {'text_embeds', 'time_ids'} and their negatives); for unconditional ones (DDPMPipeline,
    DDIMPipeline) pass ``batch_size``. The initial latents are drawn as the pipeline draws them
    (``randn_tensor`` with the same generator), and on CPU the noise of every step too, so the
    result equals ``pipe(..., output_type='latent')`` up to rounding.
    """
    from diffusers.utils.torch_utils import randn_tensor

    unet, sched = pipe.unet, pipe.scheduler
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    c = unet.config
    cond_model = prompt_embeds is not None
    if cond_model:
        n = prompt_embeds.shape[0]
        scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if getattr(
            pipe, "vae", None) is not None else 8
        h = (height or c.sample_size * scale) // scale
        w = (width or c.sample_size * scale) // scale
    else:
        if batch_size is None:
            raise ValueError("pass 'prompt_embeds' (text-conditioned) or 'batch_size'")
        n, h, w = batch_size, c.sample_size, c.sample_size
    guided = cond_model and guidance_scale > 1.0
    if guided and negative_prompt_embeds is None:
        negative_prompt_embeds = torch.zeros_like(prompt_embeds)
    sched.set_timesteps(num_inference_steps, device=device)
    table = schedules.table_from_scheduler(sched, eta=eta)
    shape = (n, c.in_channels, h, w)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    x = latents.to(device=device, dtype=dtype) * sched.init_noise_sigma
    cond = {}
    if cond_model:
        cat = (lambda u, v: torch.cat([u, v])) if guided else (lambda u, v: v)  # noqa: E731
        cond["encoder_hidden_states"] = cat(negative_prompt_embeds, prompt_embeds).to(device, dtype)
        if added_cond_kwargs:
            neg = negative_added_cond_kwargs or {k: torch.zeros_like(v)
                                                 for k, v in added_cond_kwargs.items()}
            for k in ("text_embeds", "time_ids"):
                cond[k] = cat(neg[k], added_cond_kwargs[k]).to(device, dtype)
    eng = engine_for(unet)
    return eng.sample(x, table, cond, guidance_scale=guidance_scale if guided else 1.0,
                      guided=guided, generator=generator, timestep_dtype=sched.timesteps.dtype,
                      callback=callback, progress_bar=progress_bar)
