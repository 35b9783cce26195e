"""Tensors computed once from a model's parameters (a stacked weight, a summed bias), kept
equal to them.

A fusion that merges several layers' matmuls into one needs their weights side by side (the
self-attention's q, k and v projections as one (3C, C) matrix; the ResnetBlock2Ds' time
projections stacked per width), and one that folds a bias into another layer's needs their sum.
``Derived`` makes such a tensor from its sources, read through their modules at every ``get``
(a parameter replaced by a new tensor is seen), and makes it again when a source changed: in
place when its shape, dtype and device stay, so a CUDA graph captured reading it sees the new
values, as it sees an in-place update of an ordinary weight. A replay runs no Python, so the
graph wrappers call ``refresh_all`` before replaying (``capture.GraphCache.check_weights``);
the CPU simulation of a replay raises if it meets a stale one (a GPU would silently use the old
values).

Only for inference in eager mode: a derived tensor is made under ``no_grad``, so callers take
their fused path only when autograd is not recording through the sources, and not while
torch.compile traces (it cannot trace the identity and version checks; it fuses by itself):
``usable``.
"""
from __future__ import annotations

import torch

from fastdiff import capture

ATTR = "_fastdiff_derived"       # the registry: a list on the patched root module's __dict__


class Derived:
    """``make(*sources)`` for the tensors named by ``refs`` ((module, attribute) pairs; None
    attributes, an absent bias, are left out), made again when one of them is a different tensor
    or was updated in place (its ``_version``). ``make`` is a module-level function and the
    sources are read through their modules, so a deep copy or pickle of the model gets a Derived
    over its own copies."""
    __slots__ = ("make", "refs", "_seen", "_versions", "value")

    def __init__(self, make, refs):
        self.make, self.refs = make, tuple(refs)
        self._seen: tuple = ()
        self._versions: tuple = ()
        self.value: torch.Tensor | None = None

    def __getstate__(self):          # (copies make theirs again)
        return {"make": self.make, "refs": self.refs}

    def __setstate__(self, state):
        self.__init__(state["make"], state["refs"])

    def sources(self) -> tuple:
        return tuple(t for t in (getattr(m, a) for m, a in self.refs) if t is not None)

    def _stale(self, src) -> bool:
        return (len(src) != len(self._seen) or any(a is not b for a, b in zip(src, self._seen))
                or tuple(t._version for t in src) != self._versions)

    def get(self) -> torch.Tensor:
        src = tuple(self.sources())
        if self.value is not None and not self._stale(src):
            return self.value
        if capture.replaying():
            raise capture.CaptureError(
                "a derived weight (fastdiff.integrations.diffusers.derived) is stale during a "
                "graph replay: a GPU replay would read the old values. refresh_all() must run "
                "before replaying")
        with torch.no_grad():
            new = self.make(*src)
        old = self.value
        if (old is not None and old.shape == new.shape and old.dtype == new.dtype
                and old.device == new.device):
            old.copy_(new)           # same address: captured graphs see the new values
        else:
            self.value = new
        self._seen, self._versions = src, tuple(t._version for t in src)
        return self.value


def register(root: torch.nn.Module, d: Derived) -> Derived:
    root.__dict__.setdefault(ATTR, []).append(d)
    return d


def refresh_all(root: torch.nn.Module) -> None:
    """Makes every stale derived tensor of ``root`` again (in place), before a graph replay."""
    for d in root.__dict__.get(ATTR, ()):
        if d.value is not None:
            d.get()


def stack_t(*ws: torch.Tensor) -> torch.Tensor:
    """(G, K, N) from G (N, K) Linear weights: a batched ``x @ W.T`` for each."""
    return torch.stack([w.t() for w in ws])


def cat(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat(ts)


def total(*ts: torch.Tensor) -> torch.Tensor:
    """The sum of biases (in their dtype, summed in fp32)."""
    out = ts[0].float()
    for t in ts[1:]:
        out = out + t.float()
    return out.to(ts[0].dtype)


def usable(*tensors) -> bool:
    """Whether a call may use derived tensors: not under torch.compile, and autograd is off or
    records through none of ``tensors``."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad
                                                  for t in tensors)
