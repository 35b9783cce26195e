"""``accelerate`` / ``restore`` / ``explain``: fastdiff dropped into a diffusers pipeline in
place, and ``sample_pipeline``: a pipeline's denoising loop on the sampling engine.

``accelerate(pipe)`` (or ``accelerate(unet)``) patches every component made of diffusers' blocks
(the U-Net, ControlNets, T2I adapters, the VAE's encoder and decoder) onto the fused ops
(``blocks.py``), the scheduler's step onto ``denoise_step`` (``schedulers.py``), and on CUDA the
U-Net forward into CUDA graphs per input signature (``graphs.py``). What it changed is recorded
as data in the object's state (modules and the attributes set on them, the processors replaced,
the schedulers patched), never as closures, so a deep copy or a pickle of an accelerated object
is an accelerated object of its own, and ``restore`` on one never touches another. ``restore``
puts back exactly what was there and keeps what the user set since (attention processors). The
pipeline's class is swapped for a same-named subclass (pickled as the original class) whose
``__call__`` patches a scheduler swapped in later and checks the U-Net graphs' weights once per
call; a pipeline made with ``from_pipe`` from an accelerated one is accelerated too. What is not
accelerated is said once per object and reason at WARNING on the ``fastdiff`` logger
(``strict=True`` raises instead); ``explain(obj)`` prints the whole report.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from fastdiff import schedules
from fastdiff.engine import SamplingEngine
from fastdiff.ops import logger

from . import blocks, derived, schedulers
from .graphs import GraphedUNet

STATE_ATTR = "_fastdiff_accelerated"


def _is_unet(obj) -> bool:
    return type(obj).__name__ in ("UNet2DModel", "UNet2DConditionModel") or (
        isinstance(obj, nn.Module) and hasattr(obj, "conv_in") and hasattr(obj, "up_blocks"))


def _compiled(m) -> bool:
    return isinstance(m, torch._dynamo.eval_frame.OptimizedModule)


@dataclass
class Report:
    """What ``accelerate`` did: per component the blocks fused, the scheduler, CUDA graphs, and
    everything left as it was, with the reason."""
    components: dict = field(default_factory=dict)   # name -> {"resnets": n, ...}
    scheduler: str = "none"
    graphs: str = "off"
    unfused: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = ["fastdiff.accelerate:"]
        for name, c in self.components.items():
            if not any(c.values()):
                continue                      # a component with none of these blocks
            lines.append(f"  {name}: {c['resnets']} ResnetBlock2D, {c['attention']} attention "
                         f"processors, {c['norm_out']} norm-out pairs, {c['geglu']} GEGLU, "
                         f"{c['transformer_blocks']} transformer blocks, "
                         f"{c['transformers']} Transformer2DModel outputs, "
                         f"{c['timesteps']} timestep embeddings on the fused ops")
        if any(c.get("attention") for c in self.components.values()):
            lines.append(f"  attention product: {blocks.attention_policy()}")
        lines.append(f"  scheduler: {self.scheduler}")
        lines.append(f"  CUDA graphs: {self.graphs}")
        lines += [f"  not accelerated: {r}" for r in self.unfused]
        return "\n".join(lines)


class _State:
    """What accelerate changed on one object, as data: deep copies and pickles of the object
    carry a state that refers to their own modules."""

    def __init__(self):
        self.patched: list = []      # (module, attribute): instance attributes set by accelerate
        self.processors: list = []   # (Attention, the processor it had)
        self.schedulers: list = []   # schedulers whose step was replaced
        self.graphs: GraphedUNet | None = None
        self.report = Report()
        self.warned: set = set()

    @property
    def counts(self) -> dict:
        """Totals over the components (and 1 when the scheduler's step is fused)."""
        total = dict.fromkeys(blocks.COUNTS, 0)
        for c in self.report.components.values():
            for k in total:
                total[k] += c[k]
        total["scheduler"] = int(bool(self.schedulers))
        return total

    def unfused(self, reason: str, strict: bool) -> None:
        if strict:
            raise ValueError(f"accelerate(strict=True): {reason}")
        if reason not in self.report.unfused:
            self.report.unfused.append(reason)
        if reason not in self.warned:
            self.warned.add(reason)
            logger.warning("fastdiff.accelerate: %s", reason)


def _components(obj, pipe) -> dict:
    """The modules to patch, by name: a bare model, or every module component of a pipeline."""
    if pipe is None:
        return {"unet": obj}
    return {n: m for n, m in pipe.components.items() if isinstance(m, nn.Module)}


def _patch_scheduler(pipe, state: _State, strict: bool) -> None:
    sched = getattr(pipe, "scheduler", None)
    if sched is None:
        return
    reason = schedulers.patch(sched)
    if reason is not None:
        state.report.scheduler = f"{type(sched).__name__}: diffusers' step (not fused)"
        state.unfused(reason + "; the scheduler's own step runs", strict)
        return
    if sched not in state.schedulers:
        state.schedulers.append(sched)
    state.report.scheduler = (f"{type(sched).__name__}: fused (one denoise_step per model "
                              "evaluation)")


def _fuse_qkv(unet, state, *args, **kwargs):
    """``unet.fuse_qkv_projections`` after accelerate: diffusers' own, then its fused
    processors on the fused ops too."""
    type(unet).fuse_qkv_projections(unet, *args, **kwargs)
    blocks.patch_attention(unet, state)


def accelerate(obj, *, cuda_graphs: bool = True, strict: bool = False):
    """Accelerates a diffusers pipeline or model in place and returns it.

    obj: a pipeline (DDPMPipeline, DDIMPipeline, StableDiffusion[XL][Img2Img|Inpaint|ControlNet]
    Pipeline, ...) or a bare UNet2DModel / UNet2DConditionModel (also under torch.compile). The
    call signature and outputs are unchanged; calling it again is harmless; ``restore(obj)``
    undoes it; ``explain(obj)`` reports what it did. cuda_graphs: capture the U-Net forward in
    CUDA graphs when it runs on a GPU. strict: raise ValueError for anything that cannot be
    accelerated instead of a WARNING.
    """
    if isinstance(obj, nn.Module):
        pipe = None
        target = obj._orig_mod if _compiled(obj) else obj
        if not _is_unet(target):
            raise ValueError("accelerate: 'obj' must be a diffusers pipeline with a .unet or a "
                             f"UNet2DModel/UNet2DConditionModel, got {type(obj).__name__}")
    else:
        pipe, target = obj, getattr(obj, "unet", None)
        if _compiled(target):
            target = target._orig_mod
        if not isinstance(target, nn.Module) or not _is_unet(target):
            raise ValueError("accelerate: 'obj' must be a diffusers pipeline with a .unet or a "
                             f"UNet2DModel/UNet2DConditionModel, got {type(obj).__name__}")
    state = obj.__dict__.get(STATE_ATTR) or _State()
    for name, module in _components(obj, pipe).items():
        counts, kept = blocks.patch_modules(module, state)
        old = state.report.components.get(name, dict.fromkeys(blocks.COUNTS, 0))
        state.report.components[name] = {k: old[k] + counts[k] for k in counts}
        for reason in kept:
            state.unfused(f"{name}: {reason}", strict)
        inner = module._orig_mod if _compiled(module) else module
        if ("fuse_qkv_projections" not in inner.__dict__
                and hasattr(type(inner), "fuse_qkv_projections")):
            inner.fuse_qkv_projections = blocks.Patched(inner, _fuse_qkv, state)
            state.patched.append((inner, "fuse_qkv_projections"))
    unet = obj if pipe is None else pipe.unet
    if not cuda_graphs:
        state.report.graphs = "off (cuda_graphs=False)"
    elif _compiled(unet):
        state.report.graphs = ("off: the U-Net is compiled (torch.compile's "
                               "mode='reduce-overhead' captures graphs itself)")
    elif isinstance(target.__dict__.get("forward"), GraphedUNet):
        state.report.graphs = ("on for the U-Net (installed by the accelerate of another "
                               "object sharing it)" if state.graphs is None else
                               state.report.graphs)
    else:
        state.graphs = GraphedUNet(target)
        target.forward = state.graphs
        state.patched.append((target, "forward"))
        state.report.graphs = "on for the U-Net, when its inputs are on a GPU"
    if pipe is not None:
        _patch_scheduler(pipe, state, strict)
        cls = type(pipe)
        if not getattr(cls, "_fastdiff_wrapped", False):
            pipe.__class__ = _accelerated_class(cls)
        _hook_from_pipe()
    object.__setattr__(obj, STATE_ATTR, state)
    logger.info("fastdiff.accelerate(%s): %s", type(obj).__name__, state.counts)
    return obj


def explain(obj) -> Report:
    """Prints and returns the report of what ``accelerate(obj)`` did."""
    state = obj.__dict__.get(STATE_ATTR)
    if state is None:
        raise ValueError(f"explain: {type(obj).__name__} is not accelerated "
                         "(fastdiff.accelerate(obj) first)")
    print(state.report)
    return state.report


def restore(obj):
    """Undoes ``accelerate(obj)``: puts back exactly what it replaced, keeps what the user set
    since (a no-op on an object that was not accelerated)."""
    state = obj.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return obj
    for module, attr in reversed(state.patched):
        module.__dict__.pop(attr, None)
    for attn, original in reversed(state.processors):
        if isinstance(attn.processor, blocks.FastdiffAttnProcessor):   # else: the user's choice
            attn.set_processor(original)
    for sched in state.schedulers:
        schedulers.unpatch(sched)
    if state.graphs is not None:
        state.graphs.close()
    cls = type(obj)
    if getattr(cls, "_fastdiff_wrapped", False):
        obj.__class__ = cls.__bases__[0]
    unet = obj if isinstance(obj, nn.Module) else getattr(obj, "unet", None)
    eng = _ENGINES.pop(unet, None) if unet is not None else None
    if eng is not None:
        eng.close()
    return obj


def _new_accelerated(base):
    """Unpickling an accelerated pipeline: an instance of the accelerated subclass of ``base``."""
    obj = base.__new__(base)
    obj.__class__ = _accelerated_class(base)
    return obj


@functools.lru_cache(maxsize=None)
def _accelerated_class(cls):
    """A subclass of the pipeline's class whose ``__call__`` first (re)patches the scheduler, so
    a scheduler swapped in after ``accelerate`` gets the fused step too, and checks the U-Net
    graphs' weights once for the whole call. Pickled as ``cls`` plus the rebuild above."""
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        state = self.__dict__.get(STATE_ATTR)
        if state is None:
            return original(self, *args, **kwargs)
        _patch_scheduler(self, state, strict=False)
        if state.graphs is None:
            return original(self, *args, **kwargs)
        with state.graphs.hold_weights():
            return original(self, *args, **kwargs)

    def __reduce_ex__(self, protocol):
        return _new_accelerated, (cls,), self.__dict__

    return type(cls.__name__, (cls,), {"__call__": __call__, "__reduce_ex__": __reduce_ex__,
                                       "_fastdiff_wrapped": True, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _hook_from_pipe() -> None:
    """``Pipeline.from_pipe(accelerated, ...)``: the new pipeline is accelerated too (its new
    scheduler included). Installed on diffusers' DiffusionPipeline once."""
    from diffusers import DiffusionPipeline

    func = DiffusionPipeline.__dict__["from_pipe"].__func__
    if getattr(func, "_fastdiff", False):
        return

    @functools.wraps(func)
    def from_pipe(cls, pipeline, **kwargs):
        new = func(cls, pipeline, **kwargs)
        state = pipeline.__dict__.get(STATE_ATTR)
        if state is not None and STATE_ATTR not in new.__dict__:
            accelerate(new, cuda_graphs=state.graphs is not None)
        return new

    from_pipe._fastdiff = True
    DiffusionPipeline.from_pipe = classmethod(from_pipe)


# ---------------------------------------------------------------- the loop on the engine

class _UNetFn:
    """The engine's model_fn over a diffusers U-Net: calls the class's forward (not a CUDA-graph
    wrapper: the engine captures the whole step). Holds the U-Net weakly (the engines live in
    a weak table keyed by it). cond keys are forward's keyword arguments, with those of
    ``added_cond_kwargs`` as ``added_cond_kwargs.<name>``."""

    def __init__(self, unet):
        self.unet = weakref.ref(unet)
        self.forward = type(unet).forward

    def __call__(self, x, t, **cond):
        added = {k.split(".", 1)[1]: cond.pop(k) for k in list(cond)
                 if k.startswith("added_cond_kwargs.")}
        if added:
            cond["added_cond_kwargs"] = added
        return self.forward(self.unet(), x, t, **cond, return_dict=False)[0]


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_for(unet, *, cuda_graphs: bool = True) -> SamplingEngine:
    """A SamplingEngine over a diffusers U-Net (accelerated or not), reused by later calls with
    the same U-Net (not carried by copies of it)."""
    eng = _ENGINES.get(unet)
    if eng is None or eng.cuda_graphs != cuda_graphs:
        ref = weakref.ref(unet)
        eng = SamplingEngine(_UNetFn(unet), cuda_graphs=cuda_graphs,
                             parameters=lambda: list(ref().parameters()),
                             refresh=lambda: derived.refresh_all(getattr(ref(), "_orig_mod",
                                                                         ref())))
        _ENGINES[unet] = eng
    return eng


class _Probed(Exception):
    pass


class _Probe:
    """Stands in for the U-Net's forward (and records the scheduler's first model-input) while
    the pipeline prepares its inputs: the first U-Net call's arguments are what the pipeline
    made (encoded prompts with their negatives, latents and noise, added conditioning), and the
    pipeline stops there."""

    def __init__(self, unet):
        self.signature = inspect.signature(type(unet).forward)
        self.call = None
        self.latents = None

    def forward(self, *args, **kwargs):
        bound = self.signature.bind(None, *args, **kwargs)
        bound.apply_defaults()
        self.call = dict(list(bound.arguments.items())[1:])
        raise _Probed

    def scale_model_input(self, original, sample, *args, **kwargs):
        if self.latents is None:
            self.latents = sample
        return original(sample, *args, **kwargs)


_UNSUPPORTED_CALL = ("down_block_additional_residuals", "mid_block_additional_residual",
                     "down_intrablock_additional_residuals", "cross_attention_kwargs",
                     "attention_mask", "encoder_attention_mask")


def _probe(pipe, call_kwargs):
    unet, sched = pipe.unet, pipe.scheduler
    probe = _Probe(unet)
    saved = {o: o.__dict__.get(a) for o, a in ((unet, "forward"),
                                                (sched, "scale_model_input"))}
    unet.forward = probe.forward
    original_scale = type(sched).scale_model_input.__get__(sched)
    sched.scale_model_input = functools.partial(probe.scale_model_input, original_scale)
    try:
        pipe(**{**call_kwargs, "output_type": "latent"})
    except _Probed:
        pass
    finally:
        for (o, a), old in zip(((unet, "forward"), (sched, "scale_model_input")),
                               saved.values()):
            if old is None:
                o.__dict__.pop(a, None)
            else:
                o.__dict__[a] = old
    if probe.call is None:
        raise ValueError("sample_pipeline: the pipeline never called its U-Net with these "
                         "arguments (no denoising steps?)")
    return probe


def _rows_table(sched, start: int) -> schedules.StepTable:
    """The engine's table for a scheduler fused as version-2 rows (tables.table_for, cached by
    content as RowStep's: every call of the loop from ``start``, its timestep, input scaling and
    noise draws as the scheduler's own step and scale_model_input make them)."""
    try:
        coeffs, info = schedulers.content_table(sched, start, {})
    except ValueError as err:
        raise ValueError(f"sample_pipeline: {err}") from None
    calls = len(sched.timesteps) - start
    if info.calls != calls:     # (every family's table covers its loop: a check, not a case)
        raise ValueError(f"sample_pipeline: {info.scheduler}'s table covers {info.calls} of the "
                         f"loop's {calls} calls; call the pipeline")
    scales = info.input_scales or [1.0] * calls
    return schedules.StepTable(
        solver=info.scheduler, coeffs=coeffs,
        timesteps=torch.tensor(info.timesteps, dtype=torch.float64),
        model_input_scale=torch.tensor(scales, dtype=torch.float32),
        init_noise_sigma=float(getattr(sched, "init_noise_sigma", 1.0)),
        needs_noise=any(info.draws), slots=info.slots,
        draws=torch.tensor(info.draws, dtype=torch.bool))


@torch.no_grad()
def sample_pipeline(pipe, *, callback: Callable | None = None, progress_bar: bool = False,
                    **call_kwargs) -> torch.Tensor:
    """A diffusers pipeline's denoising loop on the engine: returns the final latents.

    call_kwargs: the pipeline's own call arguments (prompt or prompt_embeds, negative_prompt,
    image and strength for img2img, num_inference_steps, guidance_scale, generator, latents,
    eta, ...). The pipeline itself prepares everything up to its first U-Net call (prompt
    encoding, the empty negative prompt, initial latents and their noise, SDXL's added
    conditioning, img2img's start step); the loop then runs on the engine, each step one CUDA
    graph on a GPU. On CPU the noise of every step is drawn as the scheduler draws it, so the
    result equals ``pipe(..., output_type='latent')`` up to rounding. callback(i, t, x, x0):
    after each step (see SamplingEngine.sample). Supports every scheduler ``accelerate``
    fuses (FusedStep's tables, or version-2 rows read from the scheduler); ControlNet
    residuals, cross-attention kwargs and guidance_rescale are refused.
    """
    unet, sched = pipe.unet, pipe.scheduler
    if _compiled(unet):
        raise ValueError("sample_pipeline captures the U-Net in CUDA graphs itself: pass the "
                         "pipeline with its uncompiled U-Net")
    rows = schedulers.unsupported(sched) is not None  # not FusedStep's: version-2 rows
    reason = schedulers.unsupported_rows(sched) if rows else None
    if reason:
        raise ValueError(f"sample_pipeline: {reason}")
    probe = _probe(pipe, call_kwargs)
    call = probe.call
    if getattr(pipe, "guidance_rescale", 0.0):
        raise ValueError("sample_pipeline: guidance_rescale is not supported; call the pipeline")
    bad = [k for k in _UNSUPPORTED_CALL
           if call.get(k) is not None and not (isinstance(call[k], (dict, list)) and not call[k])]
    if bad:
        raise ValueError(f"sample_pipeline: U-Net inputs {bad} are not supported; call the "
                         "pipeline")
    guided = bool(getattr(pipe, "do_classifier_free_guidance", False))
    guidance = float(pipe.guidance_scale) if guided else 1.0
    sample = call.pop("sample")
    t0 = call.pop("timestep")
    x = probe.latents if probe.latents is not None else sample
    n = x.shape[0] // 2 if guided else x.shape[0]
    x = x[:n].clone()
    ts = sched.timesteps
    start = sched.begin_index if getattr(sched, "begin_index", None) is not None else int(
        (ts == torch.as_tensor(t0, device=ts.device)).nonzero()[0, 0])
    if rows:
        table = _rows_table(sched, start)
    else:
        table = schedules.table_from_scheduler(sched, eta=float(call_kwargs.get("eta", 0.0)),
                                               start=start)
    cond = {}
    for k, v in call.items():
        if k == "added_cond_kwargs" and v:
            cond.update({f"added_cond_kwargs.{a}": b for a, b in v.items()})
        elif isinstance(v, torch.Tensor):
            cond[k] = v
    return engine_for(unet).sample(
        x, table, cond, guidance_scale=guidance, guided=guided,
        generator=call_kwargs.get("generator"), timestep_dtype=ts.dtype, callback=callback,
        progress_bar=progress_bar)
