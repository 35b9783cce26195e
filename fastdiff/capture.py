"""The CUDA-graph primitives shared by the engine and the U-Net wrapper, and their simulation.

``capture(body, pool, generator)`` records ``body()`` into a ``torch.cuda.CUDAGraph`` (after
``warm_up`` on a side stream, as CUDA graphs require) and returns an object with ``replay()`` and
the body's outputs, which every replay overwrites in place.

With ``SIMULATE = True`` (tests on machines without a GPU) the same code paths run on CPU
tensors: a "graph" keeps the body and a replay runs it again and copies its outputs into the
first outputs. That checks the bookkeeping around the graphs (static buffers, cache keys, weight
checks, reseeding), not the capture itself, which the CUDA-marked tests cover.
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

SIMULATE = False


def capturable(t: torch.Tensor) -> bool:
    """Whether a graph can be captured for work on ``t``'s device."""
    return t.device.type == "cuda" or (SIMULATE and t.device.type == "cpu")


def capturing() -> bool:
    """A stream capture is in progress (then callers run eagerly and are captured in it)."""
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
        self.out = body()

    def replay(self):
        for dst, src in zip(pytree.tree_leaves(self.out), pytree.tree_leaves(self.body())):
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
