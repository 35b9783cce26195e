"""CUDA-graph capture of a diffusers U-Net forward, one graph per input signature.

``GraphedUNet`` is installed by ``accelerate`` as the U-Net's ``forward``. On CUDA, a call's
tensor arguments are copied into static buffers and the graph captured for their shapes, dtypes
and non-tensor arguments is replayed: a step costs GPU time plus a few copies. A new resolution
or batch size (guidance cut-off halving the batch) is a new signature and a new capture, never a
wrong result. The graphs live in a ``capture.GraphCache`` (LRU, one memory pool, the weights'
addresses: a parameter replaced by a new tensor means new captures; in-place updates are seen).
The addresses are checked at every call of a bare U-Net, and once per call of an accelerated
pipeline (``hold_weights``), not per step. Calls that cannot be captured run eagerly and the
reason is logged once: a tensor argument off the GPU, autograd recording, a stream capture
already in progress (the sampling engine capturing a whole step); under ``torch.compile`` the
plain forward is traced. A deep copy or pickle of the U-Net gets a wrapper of its own over the
copy, with no graphs (graphs belong to the buffers they were captured with).
"""
from __future__ import annotations

import contextlib
import inspect
import itertools

import torch
from torch.utils import _pytree as pytree

from fastdiff import capture
from fastdiff.integrations.diffusers import derived
from fastdiff.ops import log_once


def _leaf_key(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.stride(), x.dtype, x.device)
    hash(x)                                      # unhashable -> TypeError -> not capturable
    return ("V", type(x).__name__, x)


class _NotCapturable(Exception):
    pass


class GraphedUNet:
    """Callable replacing ``unet.forward``: replays CUDA graphs on CUDA, runs eagerly elsewhere."""

    def __init__(self, unet: torch.nn.Module, max_graphs: int = 8, warmup: int = 2):
        self.unet = unet
        self._forward = type(unet).forward
        self._signature = inspect.signature(self._forward)
        params = list(self._signature.parameters.values())[1:]           # without self
        self._names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY,
                                                              p.POSITIONAL_OR_KEYWORD)]
        self._defaults = {p.name: p.default for p in params
                          if p.default is not p.empty and p.kind != p.VAR_KEYWORD}
        self._bindings: dict = {}
        self.graphs = capture.GraphCache(self._weights, max_graphs, warmup, "U-Net CUDA graphs",
                                         refresh=self._refresh)
        self._weights_held = False
        # a timestep given as a Python number becomes the tensor the model itself would make
        self._int_timesteps = type(unet).__name__ == "UNet2DModel"

    def _weights(self):
        return itertools.chain(self.unet.parameters(), self.unet.buffers())

    def _refresh(self):
        derived.refresh_all(self.unet)

    def __reduce__(self):
        return type(self), (self.unet, self.graphs.max_graphs, self.graphs.warmup)

    @property
    def captures(self) -> int:
        return self.graphs.captures

    @property
    def replays(self) -> int:
        return self.graphs.replays

    def close(self) -> None:
        """Drops every graph, static buffer and the shared memory pool."""
        self.graphs.close()

    @contextlib.contextmanager
    def hold_weights(self):
        """Checks the weights' addresses once for the calls inside (a pipeline's denoising
        loop) instead of at each call."""
        if self._weights_held:
            yield
            return
        self.graphs.check_weights()
        self._weights_held = True
        try:
            yield
        finally:
            self._weights_held = False

    def _bind(self, args, kwargs):
        """The call's arguments by name with defaults filled in (the binding of each calling
        convention is worked out once); None when ``forward``'s signature does not take them."""
        conv = (len(args), tuple(kwargs))
        plan = self._bindings.get(conv)
        if plan is None:
            try:
                self._signature.bind(None, *args, **kwargs)     # raises as forward would
            except TypeError:
                return None
            names = self._names[:len(args)]
            plan = self._bindings[conv] = (names, {k: v for k, v in self._defaults.items()
                                                   if k not in names and k not in kwargs})
        names, defaults = plan
        call = dict(defaults)
        call.update(zip(names, args))
        call.update(kwargs)
        return call

    def __call__(self, *args, **kwargs):
        unet = self.unet
        if torch.compiler.is_compiling():           # torch.compile traces the plain forward
            return self._forward(unet, *args, **kwargs)
        call = self._bind(args, kwargs)
        sample = call.get("sample") if call is not None else None
        if (not isinstance(sample, torch.Tensor) or not capture.capturable(sample)
                or capture.capturing()):
            return self._forward(unet, *args, **kwargs)
        reason = self._why_not(unet, call)
        if reason is None:
            try:
                return self._replay(unet, call)
            except _NotCapturable as err:
                reason = str(err)
        log_once(f"U-Net forward not captured in a CUDA graph ({reason}); run eagerly")
        return self._forward(unet, *args, **kwargs)

    def _why_not(self, unet, call):
        extra = sorted(k for k in call if k not in self._signature.parameters)
        if extra:                                   # taken by forward's **kwargs
            return f"extra keyword arguments {extra}"
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
        if not self._weights_held:
            self.graphs.check_weights()

        def build():
            static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
            inputs = pytree.tree_unflatten(static, spec)
            out_type = type(self._forward(unet, **inputs, return_dict=True))

            def body():
                return self._forward(unet, **inputs, return_dict=False)[0]

            return (static, out_type, [None] * len(static)), body, None

        entry = self.graphs.get(key, build)
        static, out_type, seen = entry.state
        for i, (buf, x) in enumerate(zip(static, leaves)):
            if isinstance(x, torch.Tensor):
                # an argument that is the tensor copied in last time, unchanged since (the
                # prompt's context, in every step of a pipeline call), is not copied again
                v = derived.version(x)
                if v is None or seen[i] is None or seen[i][0] is not x or seen[i][1] != v:
                    buf.copy_(x)
                    seen[i] = (x, v) if v is not None else None
        derived.refresh_all(unet, inputs_only=True)     # what derives from the new inputs
        entry.replay()
        self.graphs.replays += 1
        out = entry.out.clone()
        return out_type(sample=out) if return_dict else (out,)
