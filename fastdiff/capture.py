"""The CUDA-graph primitives shared by the engine and the U-Net wrapper, and their simulation.

``capture(body, pool, generator)`` records ``body()`` into a ``torch.cuda.CUDAGraph`` (after
``warm_up`` on a side stream, as CUDA graphs require) and returns an object with ``replay()`` and
the body's outputs, which every replay overwrites in place.

With ``SIMULATE = True`` (tests on machines without a GPU) the same code paths run on CPU
tensors: a "graph" keeps the body and a replay runs it again and copies its outputs into the
first outputs. That checks the bookkeeping around the graphs (static buffers, cache keys, weight
checks, reseeding), not the capture itself, which the CUDA-marked tests cover. While a simulated
graph records or replays its body, what a real capture refuses raises ``CaptureError`` naming
the offending line (``refuse_host_reads``): host reads of tensor values, the operations that
must sync to size their output, and ``torch.cuda.synchronize``. A real replay runs no Python at
all, so a read that happens only during a replay is a wrong answer on a GPU, not just an error.
"""
from __future__ import annotations

import contextlib
import os
import traceback
from collections import OrderedDict

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

SIMULATE = False
_simulated_depth = 0      # > 0 while a simulated graph records or replays its body
_simulated_replay = 0     # > 0 while a simulated graph replays its body (no Python runs on a GPU)


class CaptureError(RuntimeError):
    """What a real CUDA-graph capture would refuse ("operation not permitted when stream is
    capturing"), raised by the simulation on CPU."""


# Reading a tensor's values on the host: a device-to-host copy plus a sync, refused by a capture.
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy,
               torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__bool__,
               torch.Tensor.__index__, torch.Tensor.__complex__, torch.Tensor.__array__,
               torch.Tensor.__format__}
# Operations whose output size depends on tensor values: they sync to learn it.
_SIZE_SYNCS = {torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere,
               torch.masked_select, torch.Tensor.masked_select, torch.unique,
               torch.Tensor.unique, torch.unique_consecutive, torch.Tensor.unique_consecutive}
_TO_HOST = {torch.Tensor.cpu, torch.Tensor.to}
_TORCH_DIR = os.path.dirname(torch.__file__)


def _where() -> str:
    """The innermost line of the caller's code (outside torch and this module)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(_TORCH_DIR) or frame.filename == __file__:
            continue
        return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return "an unknown line"


def _refused(what: str) -> CaptureError:
    return CaptureError(f"{what} inside a CUDA-graph capture, at {_where()}. A real capture "
                        "refuses it (operation not permitted when stream is capturing); do it "
                        "once on the host before capturing, or keep the value on the device")


def _bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _moves_to_host(func, args, kwargs) -> bool:
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if src is None or src.device.type == "cpu":
        return False
    if func is torch.Tensor.cpu:
        return True
    dev = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(dev, (str, torch.device)) and torch.device(dev).type == "cpu"


class _RefuseHostReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
        name = name.replace("TensorBase.", "Tensor.")
        if func in _HOST_READS:
            raise _refused(f"a host read of a tensor value ({name})")
        if func in _SIZE_SYNCS:
            raise _refused(f"an operation whose output size depends on tensor values ({name})")
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1 \
                and _bool_index(args[1]):
            raise _refused("indexing with a boolean mask (its output size depends on values)")
        if func in _TO_HOST and _moves_to_host(func, args, kwargs):
            raise _refused(f"a copy of a {args[0].device.type} tensor to the host ({name})")
        return func(*args, **kwargs)


def _refused_synchronize(*args, **kwargs):
    raise _refused("torch.cuda.synchronize()")


@contextlib.contextmanager
def refuse_host_reads():
    """Within it, what a real CUDA-graph capture refuses raises CaptureError (the simulation
    wraps every record and replay of a body in it)."""
    global _simulated_depth
    sync = torch.cuda.synchronize
    torch.cuda.synchronize = _refused_synchronize
    _simulated_depth += 1
    try:
        with _RefuseHostReads():
            yield
    finally:
        _simulated_depth -= 1
        torch.cuda.synchronize = sync


def replaying() -> bool:
    """A simulated replay is running its body: on a GPU none of this Python would run, so what
    it would compute on the host (a derived weight made again) a real replay never does."""
    return _simulated_replay > 0


def capturable(t: torch.Tensor) -> bool:
    """Whether a graph can be captured for work on ``t``'s device."""
    return t.device.type == "cuda" or (SIMULATE and t.device.type == "cpu")


def capturing() -> bool:
    """A stream capture is in progress, real or simulated (then callers run eagerly and are
    captured in it, and must not read tensor values on the host)."""
    if _simulated_depth:
        return True
    return not SIMULATE and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def addresses(tensors) -> tuple:
    """The storage addresses of the tensors a graph reads in place (weights): when one changes,
    the tensor was replaced and the graph must be captured again."""
    return tuple(t.data_ptr() for t in tensors)


def new_pool():
    return None if SIMULATE else torch.cuda.graph_pool_handle()


def default_generator(device: torch.device) -> torch.Generator:
    if SIMULATE:
        return torch.default_generator
    return torch.cuda.default_generators[device.index if device.index is not None
                                         else torch.cuda.current_device()]


def warm_up(fn, n: int) -> None:
    """Runs ``fn`` n times on a side stream (Triton JIT, cuDNN autotuning, lazy allocations)."""
    if SIMULATE:
        for _ in range(n):
            fn()
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(side)


class _Simulated:
    def __init__(self, body):
        self.body = body
        with refuse_host_reads():
            self.out = body()

    def replay(self):
        global _simulated_replay
        _simulated_replay += 1
        try:
            with refuse_host_reads():
                outs = self.body()
        finally:
            _simulated_replay -= 1
        for dst, src in zip(pytree.tree_leaves(self.out), pytree.tree_leaves(outs)):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)


def capture(body, pool, generator: torch.Generator | None = None):
    """Records ``body()``; returns (graph, outputs). generator: a non-default generator the body
    draws from, registered with the graph so each replay advances it."""
    if SIMULATE:
        g = _Simulated(body)
        return g, g.out
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        if not hasattr(graph, "register_generator_state"):
            raise RuntimeError("this torch cannot register a generator with a CUDA graph "
                               "(torch >= 2.5 can); pass generator=None or cuda_graphs=False")
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool):
        out = body()
    return graph, out


class Captured:
    """One cached graph: ``replay()`` reruns it; ``out`` its outputs (overwritten in place by
    every replay); ``state`` what its builder keeps with it (static input buffers)."""
    __slots__ = ("graph", "out", "state")

    def __init__(self, graph, out, state):
        self.graph, self.out, self.state = graph, out, state

    def replay(self) -> None:
        self.graph.replay()


class GraphCache:
    """Graphs captured per key, the one cache of the engine and the U-Net graph wrapper.

    An LRU of at most ``max_graphs`` graphs sharing one memory pool (``close`` frees it). The
    graphs read the tensors of ``weights()`` in place, so in-place updates (``load_state_dict``,
    LoRA fusion) are seen at the next replay; ``check_weights`` compares their addresses with
    those the graphs were captured with and, when one was replaced by a new tensor, drops every
    graph so the next ``get`` captures again; before that it calls ``refresh()``, which makes
    tensors derived from the weights again in place (``derived.refresh_all``). Callers check
    once per sampling call, not per step."""

    def __init__(self, weights=lambda: (), max_graphs: int = 8, warmup: int = 2, what="graphs",
                 refresh=None):
        self.weights = weights
        self.refresh = refresh
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.what = what
        self.entries: OrderedDict = OrderedDict()
        self.pool = None
        self.captures = 0
        self.replays = 0
        self._addresses = None

    def __len__(self) -> int:
        return len(self.entries)

    def close(self) -> None:
        """Drops every graph, its buffers and the shared memory pool."""
        self.entries.clear()
        self.pool = None
        self._addresses = None

    def check_weights(self) -> None:
        if self.refresh is not None:
            self.refresh()
        now = addresses(self.weights())
        if self._addresses is not None and now != self._addresses and self.entries:
            from fastdiff.ops import log_once

            log_once(f"weights were replaced by new tensors: {self.what} captured again")
            self.entries.clear()
        self._addresses = now

    def get(self, key, build, generator: torch.Generator | None = None) -> Captured:
        """The graph of ``key``; on a miss ``build()`` returns ``(state, body, reset)``: the
        buffers body reads and writes, the body to capture (warmed up first), and a function
        that restores the buffers after the warm-up runs (or None). generator: one the body
        draws from besides the default (see ``capture``)."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry
        if self._addresses is None:
            self._addresses = addresses(self.weights())
        if self.pool is None:
            self.pool = new_pool()
        state, body, reset = build()
        warm_up(body, self.warmup)
        if reset is not None:
            reset()
        if self.refresh is not None:   # (what derives from the reset buffers: not in the graph)
            self.refresh()
        graph, out = capture(body, self.pool, generator)
        entry = self.entries[key] = Captured(graph, out, state)
        self.captures += 1
        if len(self.entries) > self.max_graphs:
            self.entries.popitem(last=False)
        return entry
