"""``fastdiff.accelerate`` (this module): the fused ops dropped into diffusers pipelines.

``accelerate(pipe)`` (or ``accelerate(unet)``) patches objects in place and keeps everything
needed to undo it (``restore``):

- every ``ResnetBlock2D`` runs its two GroupNorm+SiLU pairs on ``group_norm_silu`` (the time
  embedding enters as the op's ``pre_bias`` in 'default' mode, as ``scale``/``shift`` in
  'scale_shift' mode), and the U-Net's ``conv_norm_out`` + ``conv_act`` become one call;
- every ``Attention`` whose processor is diffusers' default gets ``FastdiffAttnProcessor``
  (self and cross attention, masks, group_norm, residual_connection, rescale_output_factor);
- the scheduler's ``step`` (DDPM, DDIM, DPM-Solver++ multistep, Euler) becomes one
  ``denoise_step`` call with the same signature, return type, noise draws and state updates;
- on CUDA the U-Net forward is captured in a CUDA graph per input signature (``graphs.py``) and
  replayed, with a logged eager fallback for calls that cannot be captured.

Only forwards and processors are swapped: parameters, buffers and state_dict keys are untouched,
so weights loaded or fused later (LoRA) are used. Anything the fused code does not cover (a
custom processor, gradients enabled, a scheduler configuration without a table) runs diffusers'
own code, and the reason is logged once.
"""
from __future__ import annotations

import functools
import inspect
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff import ops, schedules
from fastdiff.ops import _logged, log_once, logger  # noqa: F401  (one log for all fallbacks)

STATE_ATTR = "_fastdiff_accelerated"
MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _grad_needed(module: nn.Module, *tensors) -> bool:
    """The fused ops have no backward: with autograd recording, diffusers' own code runs."""
    if not torch.is_grad_enabled():
        return False
    if any(t is not None and t.requires_grad for t in tensors):
        return True
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _gn_args(norm: nn.GroupNorm):
    return norm.num_groups, norm.weight, norm.bias, norm.eps


# ---------------------------------------------------------------- ResnetBlock2D

def _resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward with norm1+SiLU and (temb add)+norm2(+scale-shift)+SiLU
    fused; the rest (resampling, convs, dropout, shortcut) is the module's own."""
    orig = type(self).forward
    if (_grad_needed(self, input_tensor, temb) or input_tensor.dtype not in _DTYPES
            or (temb is not None and self.time_emb_proj is None)):
        return orig(self, input_tensor, temb, *args, **kwargs)
    h = ops.group_norm_silu(input_tensor.contiguous(), *_gn_args(self.norm1))
    if self.upsample is not None:
        if h.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.upsample(input_tensor)
        h = self.upsample(h)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        h = self.downsample(h)
    h = self.conv1(h)
    if temb is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError("`temb` should not be None when `time_embedding_norm` is scale_shift")
        scale, shift = torch.chunk(temb, 2, dim=1)
        h = ops.group_norm_silu(h.contiguous(), *_gn_args(self.norm2), scale=scale, shift=shift)
    else:
        h = ops.group_norm_silu(h.contiguous(), *_gn_args(self.norm2), pre_bias=temb)
    h = self.dropout(h)
    h = self.conv2(h)
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + h) / self.output_scale_factor


def _resnet_supported(m) -> str | None:
    if not (isinstance(m.norm1, nn.GroupNorm) and isinstance(m.norm2, nn.GroupNorm)):
        return "ResnetBlock2D without GroupNorm norms"
    if not isinstance(m.nonlinearity, nn.SiLU):
        return f"ResnetBlock2D with activation {type(m.nonlinearity).__name__} (SiLU is fused)"
    if m.time_embedding_norm not in ("default", "scale_shift"):
        return f"ResnetBlock2D with time_embedding_norm={m.time_embedding_norm!r}"
    return None


def _norm_out_forward(self, x):
    """conv_norm_out with the SiLU of conv_act fused (conv_act's forward becomes the identity)."""
    if _grad_needed(self, x) or x.dtype not in _DTYPES:
        return F.silu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))
    return ops.group_norm_silu(x.contiguous(), *_gn_args(self))


def _identity_forward(self, x):
    return x


# ---------------------------------------------------------------- attention

class FastdiffAttnProcessor:
    """diffusers' AttnProcessor2_0 with the attention product on ``fastdiff.attention``.

    Supports spatial_norm, group_norm, norm_cross, norm_q/norm_k, residual_connection,
    rescale_output_factor and additive or boolean attention masks. Head dims above 256 and
    autograd fall back to ``F.scaled_dot_product_attention``.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        fused_gn = (attn.group_norm is not None and input_ndim == 4
                    and not _grad_needed(attn.group_norm, hidden_states)
                    and hidden_states.dtype in _DTYPES)
        if fused_gn:
            hidden_states = ops.group_norm_silu(hidden_states.contiguous(),
                                                *_gn_args(attn.group_norm), silu=False)
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length,
                                                         batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1,
                                                 attention_mask.shape[-1])
        if attn.group_norm is not None and not fused_gn:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if (head_dim > MAX_HEAD_DIM or query.dtype not in _DTYPES
                or _grad_needed(attn, query, key, value)):
            if head_dim > MAX_HEAD_DIM:
                log_once(f"attention head dim {head_dim} > {MAX_HEAD_DIM}: SDPA used")
            hidden_states = F.scaled_dot_product_attention(query, key, value,
                                                           attn_mask=attention_mask)
        else:
            hidden_states = ops.attention(query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attention_supported(m) -> str | None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    proc = m.processor
    if isinstance(proc, FastdiffAttnProcessor):
        return None
    if type(proc) not in (AttnProcessor, AttnProcessor2_0):
        return (f"attention processor {type(proc).__name__} kept (only diffusers' default is "
                "replaced)")
    if not getattr(m, "scale_qk", True):
        return "Attention with scale_qk=False kept"
    return None


# ---------------------------------------------------------------- scheduler step

_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
               "EulerDiscreteScheduler")


class FusedStep:
    """A scheduler's ``step`` as one ``denoise_step`` call (installed as ``scheduler.step``).

    Same signature and return type as the scheduler's own step, the same noise draws (same
    generator, shape, dtype and order, via diffusers' ``randn_tensor``) and the same state
    updates (``_step_index``, DPM-Solver's ``model_outputs`` and ``lower_order_nums``). Calls the
    fused path cannot serve (thresholding, learned variance, solver order 3, a timestep not in
    the schedule) run the scheduler's own step.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.name = type(scheduler).__name__
        self.original = type(scheduler).step.__get__(scheduler)
        functools.update_wrapper(self, self.original)
        self._signature = inspect.signature(self.original)
        self._cache: dict = {}

    def _table(self, kind, **opts):
        s = self.scheduler
        key = (kind, id(s.timesteps), s.num_inference_steps, tuple(sorted(opts.items())))
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > 8:
                self._cache.clear()
            if kind == "first_order":
                from diffusers import DPMSolverMultistepScheduler
                tmp = DPMSolverMultistepScheduler.from_config(s.config, solver_order=1)
                tmp.timesteps, tmp.sigmas, tmp.num_inference_steps = (s.timesteps, s.sigmas,
                                                                      s.num_inference_steps)
                table = schedules.table_from_scheduler(tmp)
            else:
                table = schedules.table_from_scheduler(s, **opts)
            ts = table.timesteps.tolist()
            hit = (table, {t: i for i, t in enumerate(ts)}, {})
            self._cache[key] = hit
        return hit

    def _index_of(self, timestep, index_of):
        """Row of ``timestep`` in the schedule. A pipeline's ``t`` is usually an element of
        ``scheduler.timesteps`` itself (a 0-d view): its row is its offset in that storage, found
        without reading the device (no host sync per step)."""
        ts = self.scheduler.timesteps
        if torch.is_tensor(timestep):
            if (timestep.dim() == 0 and timestep.dtype == ts.dtype and ts.dim() == 1
                    and ts.stride(0) == 1 and timestep.device == ts.device
                    and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()):
                i = timestep.storage_offset() - ts.storage_offset()
                if 0 <= i < ts.shape[0]:
                    return i
            timestep = timestep.item()
        return index_of.get(timestep)

    def _fallback(self, reason, *args, **kwargs):
        log_once(f"{self.name}.step: {reason}; diffusers' step used")
        return self.original(*args, **kwargs)

    def __call__(self, model_output, timestep, sample, *args, **kwargs):
        from diffusers.utils.torch_utils import randn_tensor

        s = self.scheduler
        call = (model_output, timestep, sample, *args)
        bound = self._signature.bind(model_output, timestep, sample, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        cfg = s.config
        if s.num_inference_steps is None:
            return self.original(*call, **kwargs)        # raises diffusers' own error
        if model_output.shape != sample.shape or model_output.dtype not in _DTYPES:
            return self._fallback("model output shaped or typed unlike the sample", *call, **kwargs)
        if cfg.get("thresholding", False):
            return self._fallback("thresholding", *call, **kwargs)
        if (model_output.requires_grad or sample.requires_grad) and torch.is_grad_enabled():
            return self._fallback("autograd", *call, **kwargs)
        if model_output.device != sample.device:
            return self._fallback("model output and sample on different devices", *call, **kwargs)

        opts, draw, noise_dtype = {}, False, model_output.dtype
        if self.name == "DDPMScheduler":
            if cfg.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
                return self._fallback(f"variance_type={cfg.variance_type!r}", *call, **kwargs)
        elif self.name == "DDIMScheduler":
            if a["variance_noise"] is not None and a["generator"] is not None:
                return self.original(*call, **kwargs)    # raises diffusers' own error
            opts = {"eta": float(a["eta"]),
                    "use_clipped_model_output": bool(a["use_clipped_model_output"])}
            draw = a["eta"] > 0
        elif self.name == "DPMSolverMultistepScheduler":
            if cfg.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") or cfg.solver_order > 2:
                return self._fallback(f"algorithm_type={cfg.algorithm_type!r}, solver_order="
                                      f"{cfg.solver_order}", *call, **kwargs)
            draw, noise_dtype = cfg.algorithm_type == "sde-dpmsolver++", torch.float32
        elif self.name == "EulerDiscreteScheduler":
            if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
                return self.original(*call, **kwargs)    # raises diffusers' own error
            opts = {k: float(a[k]) for k in ("s_churn", "s_tmin", "s_tmax", "s_noise")}
        else:
            return self._fallback("unsupported scheduler", *call, **kwargs)
        try:
            table, index_of, dev_cache = self._table("table", **opts)
        except ValueError as err:
            return self._fallback(str(err), *call, **kwargs)

        # ---- the row: by timestep (DDPM/DDIM), by the scheduler's step index (DPM, Euler)
        if self.name in ("DDPMScheduler", "DDIMScheduler"):
            i = self._index_of(timestep, index_of)
            if i is None:
                return self._fallback(f"timestep {timestep} not in the schedule", *call, **kwargs)
            if self.name == "DDPMScheduler":
                draw = table.timesteps[i] > 0
        else:
            if s.step_index is None:
                s._init_step_index(timestep)
            i = s.step_index
            if self.name == "EulerDiscreteScheduler":
                if not s.is_scale_input_called:
                    logging.getLogger("diffusers").warning(
                        "The `scale_model_input` function should be called before `step` to "
                        "ensure correct denoising. See `StableDiffusionPipeline` for a usage "
                        "example.")
                draw = (opts["s_churn"] > 0
                        and opts["s_tmin"] <= float(s.sigmas[i]) <= opts["s_tmax"])
        prev_x0 = None
        if self.name == "DPMSolverMultistepScheduler" and cfg.solver_order == 2:
            prev_x0 = s.model_outputs[-1]
            second_order = table.coeffs[i, schedules.COEF_KP] != 0
            if second_order and (s.lower_order_nums < 1 or prev_x0 is None):
                table, _, dev_cache = self._table("first_order")   # diffusers' state says 1st order

        noise = None
        if draw:
            noise = a.get("variance_noise")
            if noise is None:
                noise = randn_tensor(model_output.shape, generator=a["generator"],
                                     device=model_output.device, dtype=noise_dtype)
            noise = noise.to(device=sample.device, dtype=sample.dtype).contiguous()
        dev = sample.device
        if dev not in dev_cache:
            dev_cache[dev] = (table.coeffs.to(dev), torch.arange(len(table), device=dev))
        coeffs, idx = dev_cache[dev]
        out_dtype = model_output.dtype
        x = sample.to(out_dtype).contiguous()
        prev, x0 = ops.denoise_step(model_output.contiguous(), x, coeffs, idx[i], noise,
                                    None if prev_x0 is None else prev_x0.to(out_dtype).contiguous(),
                                    1.0, table.clip_sample, table.clip_sample_range, write_x0=True)

        # ---- state, as the scheduler's own step leaves it
        if self.name == "DPMSolverMultistepScheduler":
            for j in range(cfg.solver_order - 1):
                s.model_outputs[j] = s.model_outputs[j + 1]
            s.model_outputs[-1] = x0
            if s.lower_order_nums < cfg.solver_order:
                s.lower_order_nums += 1
        if self.name in ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler"):
            s._step_index += 1
        return self._output(prev, x0, a["return_dict"])

    def _output(self, prev, x0, return_dict):
        if self.name == "DPMSolverMultistepScheduler":
            from diffusers.schedulers.scheduling_utils import SchedulerOutput
            return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
        if not return_dict:
            return prev, x0
        module = __import__(type(self.scheduler).__module__, fromlist=["_"])
        out_cls = {"DDPMScheduler": "DDPMSchedulerOutput", "DDIMScheduler": "DDIMSchedulerOutput",
                   "EulerDiscreteScheduler": "EulerDiscreteSchedulerOutput"}[self.name]
        return getattr(module, out_cls)(prev_sample=prev, pred_original_sample=x0)


def _patch_scheduler(scheduler) -> bool:
    if isinstance(scheduler.__dict__.get("step"), FusedStep):
        return True
    if type(scheduler).__name__ not in _SCHEDULERS:
        log_once(f"scheduler {type(scheduler).__name__} not supported (expected one of "
                 f"{', '.join(_SCHEDULERS)}); its own step is used")
        return False
    scheduler.step = FusedStep(scheduler)
    return True


def _unpatch_scheduler(scheduler) -> None:
    if isinstance(scheduler.__dict__.get("step"), FusedStep):
        del scheduler.step


# ---------------------------------------------------------------- the U-Net

def _patch_unet(unet: nn.Module, undo: list) -> dict:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    counts = {"resnets": 0, "attention": 0, "norm_out": 0}
    for m in unet.modules():
        if isinstance(m, ResnetBlock2D) and "forward" not in m.__dict__:
            reason = _resnet_supported(m)
            if reason:
                log_once(reason + ": diffusers' forward kept")
                continue
            m.forward = types.MethodType(_resnet_forward, m)
            undo.append(functools.partial(m.__dict__.pop, "forward", None))
            counts["resnets"] += 1
        elif isinstance(m, Attention) and not isinstance(m.processor, FastdiffAttnProcessor):
            reason = _attention_supported(m)
            if reason:
                log_once(reason)
                continue
            orig = m.processor
            m.set_processor(FastdiffAttnProcessor())
            undo.append(functools.partial(m.set_processor, orig))
            counts["attention"] += 1
    norm, act = getattr(unet, "conv_norm_out", None), getattr(unet, "conv_act", None)
    if (isinstance(norm, nn.GroupNorm) and isinstance(act, nn.SiLU)
            and "forward" not in norm.__dict__):
        norm.forward = types.MethodType(_norm_out_forward, norm)
        act.forward = types.MethodType(_identity_forward, act)
        undo.append(functools.partial(norm.__dict__.pop, "forward", None))
        undo.append(functools.partial(act.__dict__.pop, "forward", None))
        counts["norm_out"] += 1
    return counts


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
    counts = _patch_unet(unet, state.undo)
    for k, v in counts.items():
        state.counts[k] = state.counts.get(k, 0) + v
    from fastdiff.graphs import GraphedUNet

    if cuda_graphs and not isinstance(unet.__dict__.get("forward"), GraphedUNet):
        state.graphs = GraphedUNet(unet)
        unet.forward = state.graphs
        state.undo.append(state.graphs.close)
        state.undo.append(functools.partial(unet.__dict__.pop, "forward", None))
    if pipe is not None:
        if getattr(pipe, "scheduler", None) is not None:
            state.counts["scheduler"] = int(_patch_scheduler(pipe.scheduler))
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
        _unpatch_scheduler(sched)
    return obj


@functools.lru_cache(maxsize=None)
def _accelerated_class(cls):
    """A subclass of the pipeline's class whose ``__call__`` first (re)patches the scheduler, so
    a scheduler swapped in after ``accelerate`` gets the fused step too."""
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        sched = getattr(self, "scheduler", None)
        if sched is not None and STATE_ATTR in self.__dict__:
            _patch_scheduler(sched)
        return original(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "_fastdiff_wrapped": True,
                                       "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})
