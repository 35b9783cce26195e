"""Tensors computed once from a model's parameters (a stacked weight, a summed bias), or from its
parameters and an input that stays the same over many calls (the context's keys and values),
kept equal to them.

A fusion that merges several layers' matmuls into one needs their weights side by side (the
self-attention's q, k and v projections as one (3C, C) matrix; the ResnetBlock2Ds' time
projections stacked per width), and one that folds a bias into another layer's needs their sum.
``Derived`` makes such a tensor from its sources, read through their modules at every ``get``
(a parameter replaced by a new tensor is seen), and makes it again when a source changed: in
place when the sources are the same tensors and the shape stays, so a CUDA graph captured
reading it sees the new values, as it sees an in-place update of an ordinary weight.

``PerInput`` keeps what a cross-attention computes from the prompt's context (its keys and
values: the same in every step of a pipeline call) per context tensor, so an eager loop
projects it once per call and a CUDA graph replays without the projection.

A replay runs no Python, so the graph wrappers call ``refresh_all`` before replaying
(``capture.GraphCache.check_weights``, and after copying new inputs into a graph's static
buffers); the CPU simulation of a replay raises if it meets a stale one (a GPU would silently
use the old values).

Only for inference in eager mode: a derived tensor is made under ``no_grad``, so callers take
their fused path only when autograd is not recording through the sources, and not while
torch.compile traces (it cannot trace the identity and version checks; it fuses by itself):
``usable``. Inference tensors (torch.inference_mode) keep no version counter: what derives from
one is made at every call.
"""
from __future__ import annotations

import weakref

import torch

from fastdiff import capture

ATTR = "_fastdiff_derived"       # the registry: a list on the patched root module's __dict__


def version(t: torch.Tensor) -> int | None:
    """``t``'s in-place update counter; None for an inference tensor."""
    return None if t.is_inference() else t._version


class Derived:
    """``make(*sources, *inputs)`` for the tensors named by ``refs`` ((module, attribute)
    pairs; None attributes, an absent bias, are left out) and the tensors ``get`` is given,
    made again when one of them is a different tensor or was updated in place (its
    ``_version``). ``make`` is a module-level function and the sources are read through their
    modules, so a deep copy or pickle of the model gets a Derived over its own copies."""
    __slots__ = ("make", "refs", "_seen", "_versions", "_inputs", "value")

    def __init__(self, make, refs):
        self.make, self.refs = make, tuple(refs)
        self._seen: tuple = ()
        self._versions: tuple = ()
        self._inputs: tuple = ()
        self.value: torch.Tensor | None = None

    def __getstate__(self):          # (copies make theirs again)
        return {"make": self.make, "refs": self.refs}

    def __setstate__(self, state):
        self.__init__(state["make"], state["refs"])

    def sources(self) -> tuple:
        return tuple(t for t in (getattr(m, a) for m, a in self.refs) if t is not None)

    def _fresh(self, inputs) -> bool:
        """The value is up to date (the common case, checked without building tuples)."""
        seen, versions, i = self._seen, self._versions, 0
        n = len(seen)
        for m, a in self.refs:
            # a module's parameter straight from its dict (getattr goes through nn.Module's
            # __getattr__, ~0.7 us: a block call checks ~10 Deriveds of 2-6 sources)
            params = getattr(m, "_parameters", None)
            t = params[a] if params is not None and a in params else getattr(m, a)
            if t is None:
                continue
            if i >= n or seen[i] is not t or t._version != versions[i]:
                return False
            i += 1
        for t in inputs:
            if i >= n or seen[i] is not t or t._version != versions[i]:
                return False
            i += 1
        return i == n

    def get(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.value is not None and self._fresh(inputs):
            return self.value
        src = self.sources() + inputs
        versions = tuple(version(t) for t in src)
        if None in versions:         # an inference tensor: made at every call, nothing kept
            with torch.no_grad():
                return self.make(*src)
        same = len(src) == len(self._seen) and all(a is b for a, b in zip(src, self._seen))
        if self.value is not None and same and versions == self._versions:
            return self.value
        if capture.replaying():
            raise capture.CaptureError(
                "a derived tensor (fastdiff.integrations.diffusers.derived) is stale during a "
                "graph replay: a GPU replay would read the old values. refresh_all() must run "
                "before replaying")
        with torch.no_grad():
            new = self.make(*src)
        old = self.value
        if (old is not None and same and old.shape == new.shape and old.dtype == new.dtype
                and old.device == new.device):
            old.copy_(new)           # same address: captured graphs see the new values
        else:
            self.value = new
        self._seen, self._versions, self._inputs = src, versions, inputs
        return self.value

    def refresh(self) -> None:
        if self.value is not None:
            self.get(*self._inputs)


class PerInput:
    """A Derived of the weights and one input tensor, kept per input: one for eager calls (the
    latest input), and one for each input a CUDA graph was captured reading (its static buffer,
    which the graph wrapper overwrites between replays; ``refresh`` then makes the value again
    in place). The warm-up before a capture runs eagerly on the static buffer: the capture
    takes that value over, so the projection itself is not in the graph. ``refs`` may name
    other Deriveds' ``value`` (the stacked weights): those in ``first`` are made up to date
    before each use."""
    __slots__ = ("make", "refs", "first", "_eager", "_pinned")

    def __init__(self, make, refs, first=()):
        self.make, self.refs, self.first = make, tuple(refs), tuple(first)
        self._eager: Derived | None = None
        self._pinned: dict = {}      # id(input) -> (weak reference to it, its Derived)

    def __getstate__(self):
        return {"make": self.make, "refs": self.refs, "first": self.first}

    def __setstate__(self, state):
        self.__init__(state["make"], state["refs"], state["first"])

    def get(self, x: torch.Tensor) -> torch.Tensor:
        for d in self.first:
            d.get()
        d = self._eager
        if capture.capturing():
            entry = self._pinned.get(id(x))
            if entry is not None and entry[0]() is x:
                return entry[1].get(x)
            if d is not None and d._inputs and d._inputs[0] is x:
                self._eager = None                 # the warm-up's value, taken over
            else:
                d = Derived(self.make, self.refs)
            self._pinned = {k: v for k, v in self._pinned.items() if v[0]() is not None}
            self._pinned[id(x)] = (weakref.ref(x), d)
            return d.get(x)
        if d is None or not d._inputs or d._inputs[0] is not x:
            d = self._eager = Derived(self.make, self.refs)
        return d.get(x)

    def refresh(self, inputs_only: bool = False) -> None:
        if not inputs_only:          # (the weights: checked once per call, not per replay)
            for d in self.first:
                d.refresh()
        for ref, d in list(self._pinned.values()):
            x = ref()
            if x is not None:
                d.get(x)
        if self._eager is not None:
            self._eager.refresh()


def register(root: torch.nn.Module, d):
    root.__dict__.setdefault(ATTR, []).append(d)
    return d


def refresh_all(root: torch.nn.Module, inputs_only: bool = False) -> None:
    """Makes every stale derived tensor of ``root`` again (in place), before a graph replay;
    inputs_only: only those derived from inputs (after new inputs were copied in)."""
    for d in root.__dict__.get(ATTR, ()):
        if isinstance(d, PerInput):
            d.refresh(inputs_only)
        elif not inputs_only:
            d.refresh()


def stack_t(*ws: torch.Tensor) -> torch.Tensor:
    """(G, K, N) from G (N, K) Linear weights: a batched ``x @ W.T`` for each."""
    return torch.stack([w.t() for w in ws])


def cat(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat(ts)


def total(*ts: torch.Tensor) -> torch.Tensor:
    """The sum of biases (in their dtype, summed in fp32): a new tensor, also of one float32
    bias (see blocks.shift_f32)."""
    out = ts[0].to(torch.float32, copy=True)
    for t in ts[1:]:
        out = out + t.float()
    return out.to(ts[0].dtype)


def linear(*ts: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w[, b])`` from (w, [b,] x)."""
    return torch.nn.functional.linear(ts[-1], ts[0], ts[1] if len(ts) == 3 else None)


def usable(*tensors) -> bool:
    """Whether a call may use derived tensors: not under torch.compile, and autograd is off or
    records through none of ``tensors``."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad
                                                  for t in tensors)
