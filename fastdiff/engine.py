"""The sampling engine: a denoising loop whose whole step is one CUDA graph, replayed per step.

A step is: the model input ``x * scale[i]`` (Euler's input scaling, 1 elsewhere), the model on
the CFG batch ``[x_in; x_in]`` with the timestep ``timesteps[i]``, the noise draw, and one
``denoise_step`` call (guidance combine + solver update + noise; it updates the solver's state
slots in place), then ``x`` and the step index are updated in place. The step index lives on
the device and every per-step value is gathered from device tables with it, so the captured step
is replayed S times with no host work and no host sync; the progress bar and per-step callbacks
run on the host between replays.

Caching: one graph per signature (sample shape and dtype, conditioning shapes, guidance scale,
solver flags and state slots, number of steps, whether the noise is seeded) in a
``capture.GraphCache``; a new resolution or batch size is a new capture. All graphs share one
memory pool; ``close()`` frees it. Graphs read the model's parameters in place, so in-place
weight updates take effect; a parameter replaced by a new tensor triggers a new capture. Noise
inside a graph comes from the default CUDA generator, or, when the caller passes a generator
(CPU or CUDA), from the engine's own generator registered with the graphs and seeded from the
caller's before the replays: the same seed replays the same noise. On CPU, or with
``cuda_graphs=False``, the same step runs eagerly; the noise is
then drawn only at the steps whose row uses it, in the order diffusers' schedulers draw it.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastdiff import capture, ops, schedules


def _sig(t: torch.Tensor):
    return (tuple(t.shape), t.dtype, t.device)


class _Static:
    """The buffers one captured step reads and writes."""

    def __init__(self, x, table, cond, timestep_dtype):
        dev = x.device
        self.x = x.clone()
        self.idx = torch.zeros(1, dtype=torch.int64, device=dev)
        self.coeffs = table.coeffs.to(dev).clone()
        self.ts = table.timesteps.to(device=dev, dtype=timestep_dtype).clone()
        self.scale = table.model_input_scale.to(device=dev, dtype=torch.float32).clone()
        # The solver's state slots (schedules: "the step row, version 2"), zeros at the start.
        self.state = x.new_zeros((table.slots, *x.shape)) if table.slots else None
        self.cond = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}

    def load(self, x, table, cond, timestep_dtype):
        dev = self.x.device
        self.x.copy_(x)
        self.idx.zero_()
        self.coeffs.copy_(table.coeffs)
        self.ts.copy_(table.timesteps.to(dtype=timestep_dtype))
        self.scale.copy_(table.model_input_scale.to(torch.float32))
        if self.state is not None:
            self.state.zero_()
        for k, v in cond.items():
            if isinstance(v, torch.Tensor):
                self.cond[k].copy_(v.to(dev))


class SamplingEngine:
    """Runs sampling loops of ``model_fn(x, t, **cond) -> model output``.

    model_fn: takes the model-batch input (2N rows when guided: [uncond; cond]), a (2N,) or
    (N,) timestep tensor and the conditioning tensors (their batch is the model batch).
    cuda_graphs: capture each step in a CUDA graph when the sample is on a GPU.
    parameters: the tensors whose addresses are checked before a replay (default: none).
    refresh: called before those checks (makes tensors derived from the weights again).
    """

    def __init__(self, model_fn: Callable, *, cuda_graphs: bool = True,
                 parameters: Callable[[], list] | None = None, max_graphs: int = 8,
                 warmup: int = 2, refresh: Callable[[], None] | None = None):
        self.model_fn = model_fn
        self.cuda_graphs = cuda_graphs
        self.graphs = capture.GraphCache(parameters or (lambda: []), max_graphs, warmup,
                                         "sampling graphs", refresh)
        self._gen = None

    @property
    def captures(self) -> int:
        return self.graphs.captures

    def close(self) -> None:
        """Drops every captured graph, its buffers and the shared memory pool."""
        self.graphs.close()
        self._gen = None

    # ---------------------------------------------------------------- one step
    def _step(self, s: _Static, table, guided, guidance_scale, generator, draw: bool):
        idx = s.idx
        x_in = s.x * s.scale.index_select(0, idx).to(s.x.dtype).view(-1, *[1] * (s.x.dim() - 1))
        n = s.x.shape[0]
        t = s.ts.index_select(0, idx).expand(2 * n if guided else n)
        out = self.model_fn(torch.cat([x_in, x_in]) if guided else x_in, t, **s.cond)
        noise = None
        if draw and isinstance(generator, (list, tuple)):      # one generator per sample
            noise = torch.cat([torch.randn((1, *s.x.shape[1:]), generator=g, device=g.device,
                                           dtype=s.x.dtype).to(s.x.device) for g in generator])
        elif draw:
            dev = generator.device if generator is not None else s.x.device
            noise = torch.randn(s.x.shape, generator=generator, device=dev, dtype=s.x.dtype
                                ).to(s.x.device)
        x, x0 = ops.denoise_step(out.contiguous(), s.x, s.coeffs, idx, noise, s.state,
                                 guidance_scale if guided else 1.0, table.clip_sample,
                                 table.clip_sample_range, write_x0=True, guided=guided)
        if table.threshold is not None:
            x, x0 = schedules.apply_threshold(x, x0, s.coeffs, idx, *table.threshold)
        s.x.copy_(x)
        idx.add_(1)
        return x0

    # ---------------------------------------------------------------- the loop
    @torch.no_grad()
    def sample(self, x: torch.Tensor, table: schedules.StepTable, cond: dict | None = None, *,
               guidance_scale: float = 1.0, guided: bool | None = None,
               generator: torch.Generator | None = None, timestep_dtype=torch.float32,
               callback: Callable | None = None, progress_bar: bool | str = False) -> torch.Tensor:
        """Runs ``len(table)`` steps from ``x`` (the initial sample, already scaled by the
        table's init_noise_sigma) and returns the final sample (a new tensor).

        cond: conditioning tensors for model_fn, batch 2N when guided. generator: one, or a
        list with one per sample (each sample's noise then depends only on its generator, not on
        the batch it is in; such runs are eager). guided: whether the model
        batch is [uncond; cond] (default: guidance_scale != 1). callback(i, t, x, x0): called
        after step i with the engine's own buffers (clone what you keep); a returned tensor
        replaces x. progress_bar: True or a description.
        """
        cond = dict(cond or {})
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"'x' must be a (N, ...) tensor, got {type(x).__name__}")
        if len(table) == 0:
            raise ValueError("'table' has no steps")
        guided = guidance_scale != 1.0 if guided is None else guided
        if isinstance(generator, (list, tuple)) and len(generator) != x.shape[0]:
            raise ValueError(f"'generator' list must hold one generator per sample "
                             f"({x.shape[0]}), got {len(generator)}")
        use_graph = (self.cuda_graphs and capture.capturable(x) and not capture.capturing()
                     and not isinstance(generator, (list, tuple)))
        steps = range(len(table))
        if progress_bar:
            from tqdm import tqdm
            desc = progress_bar if isinstance(progress_bar, str) else f"sampling ({table.solver})"
            steps = tqdm(steps, desc=desc, leave=False)
        if use_graph:
            graph = self._graph_for(x, table, cond, guided, guidance_scale, generator,
                                    timestep_dtype)
            s = graph.state
        else:
            s = _Static(x, table, cond, timestep_dtype)
            draws = (schedules.noise_rows(table.coeffs) if table.draws is None
                     else table.draws).tolist()
        for i in steps:
            if use_graph:
                graph.replay()
                x0 = graph.out
            else:
                x0 = self._step(s, table, guided, guidance_scale, generator,
                                table.needs_noise and draws[i])
            if callback is not None:
                new = callback(i, table.timesteps[i], s.x, x0)
                if isinstance(new, torch.Tensor) and new is not s.x:
                    s.x.copy_(new)
        return s.x.clone()

    def _graph_for(self, x, table, cond, guided, guidance_scale, generator, timestep_dtype):
        # Noise in a graph: the default CUDA generator when none is given; else the engine's own
        # generator, registered with the graphs and seeded from the caller's just before the
        # replays (capture and warm-up draws do not shift the sequence).
        if generator is None:
            gen = capture.default_generator(x.device)
        else:
            if self._gen is None:
                self._gen = torch.Generator(device=x.device)
            gen = self._gen
        # Which generator the graph draws from is part of the key: a graph captured for an
        # unseeded call draws from the default generator and cannot serve a seeded one.
        key = (_sig(x), tuple((k, _sig(v) if isinstance(v, torch.Tensor) else v)
                              for k, v in sorted(cond.items())), generator is not None,
               guided, float(guidance_scale), len(table), table.needs_noise, table.slots,
               table.clip_sample, float(table.clip_sample_range), table.threshold,
               timestep_dtype)
        def build():
            s = _Static(x, table, cond, timestep_dtype)

            def body():
                return self._step(s, table, guided, guidance_scale, gen, table.needs_noise)

            return s, body, lambda: s.load(x, table, cond, timestep_dtype)

        self.graphs.check_weights()                    # once per call: graphs read them in place
        graph = self.graphs.get(key, build, gen if gen is self._gen else None)
        graph.state.load(x, table, cond, timestep_dtype)
        if self.graphs.refresh is not None:
            self.graphs.refresh()                      # what derives from the new inputs
        if generator is not None:
            gen.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator,
                                              device=generator.device)))
        return graph


# ---------------------------------------------------------------- model adapters

def fastdiff_model_fn(model):
    """model_fn for fastdiff's own UNet: cond holds 'labels' and the UNet's keyword inputs."""
    def fn(x, t, labels=None, **cond):
        return model(x, t.float(), labels, **cond)
    return fn
