"""CUDA-graph capture of a diffusers U-Net forward, one graph per input signature.

``GraphedUNet`` is installed by ``fastdiff.accelerate`` as the U-Net's ``forward``. On CUDA, a
call's tensor arguments are copied into static buffers and the graph captured for their shapes,
dtypes and non-tensor arguments is replayed: a step costs GPU time plus a few copies. A new
resolution or batch size (guidance cut-off halving the batch) is a new signature and a new
capture, never a wrong result. All graphs of one U-Net share one memory pool; ``close`` (called by
``fastdiff.restore``) drops them and the pool.

Graphs read the parameters' storage, so in-place weight updates (``load_state_dict``, LoRA
fusion) take effect at the next replay; a parameter replaced by a new tensor is detected (its
address changed) and the graphs are captured again. Calls that cannot be captured run eagerly
and the reason is logged once: a tensor argument off the GPU, autograd recording, a stream
capture already in progress (the sampling engine capturing a whole step).
"""
from __future__ import annotations

import inspect
import itertools
import weakref
from collections import OrderedDict

import torch
from torch.utils import _pytree as pytree

from fastdiff import capture
from fastdiff.pipelines import log_once


def _leaf_key(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.stride(), x.dtype, x.device)
    hash(x)                                      # unhashable -> TypeError -> not capturable
    return ("V", type(x).__name__, x)


class _Entry:
    __slots__ = ("graph", "static", "out", "out_type", "ptrs")


class GraphedUNet:
    """Callable replacing ``unet.forward``: replays CUDA graphs on CUDA, runs eagerly elsewhere."""

    def __init__(self, unet: torch.nn.Module, max_graphs: int = 8, warmup: int = 2):
        self._unet = weakref.ref(unet)
        self._forward = type(unet).forward
        self._signature = inspect.signature(self._forward)
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: OrderedDict = OrderedDict()
        self.pool = None
        self.captures = 0
        self.replays = 0
        # a timestep given as a Python number becomes the tensor the model itself would make
        self._int_timesteps = type(unet).__name__ == "UNet2DModel"

    def close(self) -> None:
        """Drops every graph, static buffer and the shared memory pool."""
        self.graphs.clear()
        self.pool = None

    def __call__(self, *args, **kwargs):
        unet = self._unet()
        bound = self._signature.bind(unet, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.pop(next(iter(self._signature.parameters)))          # self
        extra = call.pop("kwargs", None) if "kwargs" in self._signature.parameters else None
        sample = call.get("sample")
        if (not isinstance(sample, torch.Tensor) or not capture.capturable(sample)
                or capture.capturing()):
            return self._forward(unet, *args, **kwargs)
        reason = self._why_not(unet, call, extra)
        if reason is None:
            try:
                return self._replay(unet, call)
            except _NotCapturable as err:
                reason = str(err)
        log_once(f"U-Net forward not captured in a CUDA graph ({reason}); run eagerly")
        return self._forward(unet, *args, **kwargs)

    def _why_not(self, unet, call, extra):
        if extra:
            return f"extra keyword arguments {sorted(extra)}"
        if torch.is_grad_enabled() and any(p.requires_grad for p in unet.parameters()):
            return "autograd is recording"
        return None

    def _replay(self, unet, call):
        return_dict = call.pop("return_dict", True)
        t = call.get("timestep")
        dev = call["sample"].device
        if not isinstance(t, torch.Tensor):
            as_int = self._int_timesteps or not isinstance(t, float)
            dtype = torch.int64 if as_int else torch.float64
            call["timestep"] = torch.tensor(t, dtype=dtype, device=dev)
        elif t.device != dev:
            call["timestep"] = t.to(dev)
        leaves, spec = pytree.tree_flatten(call)
        for x in leaves:
            if isinstance(x, torch.Tensor) and x.device != dev:
                raise _NotCapturable(f"a tensor argument on {x.device}")
        try:
            key = (str(spec), tuple(_leaf_key(x) for x in leaves))
        except TypeError:
            raise _NotCapturable("an unhashable non-tensor argument") from None
        ptrs = capture.addresses(itertools.chain(unet.parameters(), unet.buffers()))
        entry = self.graphs.get(key)
        if entry is not None and entry.ptrs != ptrs:
            log_once("U-Net weights were replaced by new tensors: CUDA graphs captured again")
            self.close()
            entry = None
        if entry is None:
            entry = self._capture(unet, spec, leaves, ptrs)
            self.graphs[key] = entry
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        for buf, x in zip(entry.static, leaves):
            if isinstance(x, torch.Tensor):
                buf.copy_(x)
        entry.graph.replay()
        self.replays += 1
        out = entry.out.clone()
        return entry.out_type(sample=out) if return_dict else (out,)

    def _capture(self, unet, spec, leaves, ptrs):
        if self.pool is None:
            self.pool = capture.new_pool()
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        call = pytree.tree_unflatten(static, spec)
        e = _Entry()
        e.out_type = type(self._forward(unet, **call, return_dict=True))

        def body():
            return self._forward(unet, **call, return_dict=False)[0]

        capture.warm_up(body, self.warmup)
        e.graph, e.out = capture.capture(body, self.pool)
        e.static, e.ptrs = static, ptrs
        self.captures += 1
        return e


class _NotCapturable(Exception):
    pass
