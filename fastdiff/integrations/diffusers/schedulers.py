"""A diffusers scheduler's ``step`` as one ``denoise_step`` call (installed by ``accelerate``).

``FusedStep`` keeps the scheduler's own signature, return type, noise draws (same generator,
shape, dtype and order, via diffusers' ``randn_tensor``) and state updates. What differs between
schedulers lives in one small adapter per family (``FAMILIES``): the coefficient table a call
uses (``schedules.table_from_scheduler`` with the call's options), which row of it the call is,
whether it draws noise, what it reads from the scheduler's history, and how it leaves the
scheduler's state. Adding a scheduler is adding an adapter whose table
``schedules.table_from_scheduler`` can build. Calls the fused path cannot serve (thresholding,
learned variance, solver order 3, a timestep not in the schedule) run the scheduler's own step,
and the reason is logged once.
"""
from __future__ import annotations

import inspect
import logging
import sys

import torch

from fastdiff import ops, schedules
from fastdiff.ops import log_once

from .blocks import DTYPES


class _Unfused(Exception):
    """The call runs the scheduler's own step; ``reason`` is logged (None: silently, e.g. to
    let the scheduler raise its own error)."""

    def __init__(self, reason: str | None = None):
        super().__init__(reason)
        self.reason = reason


class Family:
    """How the step of one scheduler family maps onto ``denoise_step`` (defaults: a schedule
    indexed by timestep, no noise, no history, no state)."""
    output_class = ""            # the step's output class in the scheduler's module
    noise_dtype = None           # dtype of the drawn noise (None: the model output's)

    def unsupported(self, cfg) -> str | None:
        """Why a scheduler with config ``cfg`` cannot be fused (None: it can)."""
        if cfg.get("thresholding", False):
            return "thresholding=True"
        return None

    def options(self, s, a: dict, timestep) -> dict:
        """The table options of this call (its step arguments); raises _Unfused."""
        return {}

    def row(self, step: "FusedStep", s, timestep, index_of) -> int | None:
        """The table row of this call (None: the timestep is not in the schedule)."""
        return step.index_of(timestep, index_of)

    def draws(self, s, table, i: int, opts: dict) -> bool:
        return False

    def history(self, step: "FusedStep", s, hit, i: int):
        """(hit, prev_x0): the table (``FusedStep.table``'s triple) to use given the scheduler's
        history, and the previous data prediction its row reads (None when it reads none)."""
        return hit, None

    def advance(self, s, x0) -> None:
        """Leaves the scheduler's state as its own step would."""

    def output(self, s, prev, x0, return_dict: bool):
        if not return_dict:
            return prev, x0
        cls = getattr(sys.modules[type(s).__module__], self.output_class)
        return cls(prev_sample=prev, pred_original_sample=x0)


class DDPM(Family):
    output_class = "DDPMSchedulerOutput"

    def unsupported(self, cfg):
        if cfg.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
            return f"variance_type={cfg.variance_type!r}"
        return super().unsupported(cfg)

    def draws(self, s, table, i, opts):
        return bool(table.timesteps[i] > 0)


class DDIM(Family):
    output_class = "DDIMSchedulerOutput"

    def options(self, s, a, timestep):
        if a["variance_noise"] is not None and a["generator"] is not None:
            raise _Unfused()                                   # diffusers' own error
        return {"eta": float(a["eta"]),
                "use_clipped_model_output": bool(a["use_clipped_model_output"])}

    def draws(self, s, table, i, opts):
        return opts["eta"] > 0


class _StepIndexed(Family):
    """Schedulers that keep their own step index (DPM-Solver, Euler)."""

    def row(self, step, s, timestep, index_of):
        if s.step_index is None:
            s._init_step_index(timestep)
        return s.step_index

    def advance(self, s, x0):
        s._step_index += 1


class DPMSolverMultistep(_StepIndexed):
    noise_dtype = torch.float32

    def unsupported(self, cfg):
        if cfg.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") or cfg.solver_order > 2:
            return f"algorithm_type={cfg.algorithm_type!r}, solver_order={cfg.solver_order}"
        return super().unsupported(cfg)

    def draws(self, s, table, i, opts):
        return s.config.algorithm_type == "sde-dpmsolver++"

    def history(self, step, s, hit, i):
        if s.config.solver_order != 2:
            return hit, None
        prev_x0 = s.model_outputs[-1]
        # A second-order row reads the previous x0 from slot 0 (out's coefficient of s_0).
        second_order = hit[0].coeffs[i, schedules.ROW_O + schedules.V_S] != 0
        if second_order and (s.lower_order_nums < 1 or prev_x0 is None):
            return step.table("first_order"), prev_x0      # diffusers' state says 1st order
        return hit, prev_x0

    def advance(self, s, x0):
        order = s.config.solver_order
        for j in range(order - 1):
            s.model_outputs[j] = s.model_outputs[j + 1]
        s.model_outputs[-1] = x0
        if s.lower_order_nums < order:
            s.lower_order_nums += 1
        super().advance(s, x0)

    def output(self, s, prev, x0, return_dict):
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class EulerDiscrete(_StepIndexed):
    output_class = "EulerDiscreteSchedulerOutput"

    def options(self, s, a, timestep):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise _Unfused()                                   # diffusers' own error
        return {k: float(a[k]) for k in ("s_churn", "s_tmin", "s_tmax", "s_noise")}

    def row(self, step, s, timestep, index_of):
        i = super().row(step, s, timestep, index_of)
        if not s.is_scale_input_called:
            logging.getLogger("diffusers").warning(
                "The `scale_model_input` function should be called before `step` to ensure "
                "correct denoising. See `StableDiffusionPipeline` for a usage example.")
        return i

    def draws(self, s, table, i, opts):
        return (opts["s_churn"] > 0
                and opts["s_tmin"] <= float(s.sigmas[i]) <= opts["s_tmax"])


FAMILIES: dict[str, Family] = {"DDPMScheduler": DDPM(), "DDIMScheduler": DDIM(),
                               "DPMSolverMultistepScheduler": DPMSolverMultistep(),
                               "EulerDiscreteScheduler": EulerDiscrete()}


class FusedStep:
    """A scheduler's ``step`` as one ``denoise_step`` call (installed as ``scheduler.step``)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.name = type(scheduler).__name__
        self.family = FAMILIES[self.name]
        self._signature = inspect.signature(self.original)
        self._cache: dict = {}
        # The kernel's state slots (DPM-Solver's previous x0), updated in place by each call,
        # and the x0 of the last call (diffusers' model_outputs[-1] while the slots hold it).
        self._state: torch.Tensor | None = None
        self._state_x0: torch.Tensor | None = None

    @property
    def original(self):
        """The scheduler's own step (looked up on its class: copies rebind to the copy)."""
        return type(self.scheduler).step.__get__(self.scheduler)

    @property
    def __signature__(self):           # pipelines inspect step's parameters (eta, generator)
        return self._signature

    def __getstate__(self):            # deep copies and pickles: the scheduler, no cached tables
        return {"scheduler": self.scheduler}

    def __setstate__(self, state):
        self.__init__(state["scheduler"])

    def table(self, kind="table", **opts):
        """(table, {timestep: row}, {device: (coefficients, row indices)}) of the scheduler's
        current schedule; kind 'first_order' is DPM-Solver's first-order table of it."""
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
                # Standing in for second-order rows, they keep x0 in slot 0 as those do.
                coeffs = table.coeffs.clone()
                coeffs[:, schedules.ROW_W] = 1.0
                coeffs[:, schedules.ROW_S + schedules.NUM_V] = 1.0
                table = schedules.StepTable(**{**table.__dict__, "coeffs": coeffs, "slots": 1})
            else:
                table = schedules.table_from_scheduler(s, **opts)
            ts = table.timesteps.tolist()
            hit = (table, {t: i for i, t in enumerate(ts)}, {})
            self._cache[key] = hit
        return hit

    def index_of(self, timestep, index_of):
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

    def __call__(self, model_output, timestep, sample, *args, **kwargs):
        try:
            return self._fused(model_output, timestep, sample, *args, **kwargs)
        except _Unfused as why:
            if why.reason:
                log_once(f"{self.name}.step: {why.reason}; diffusers' step used")
            return self.original(model_output, timestep, sample, *args, **kwargs)

    def _fused(self, model_output, timestep, sample, *args, **kwargs):
        from diffusers.utils.torch_utils import randn_tensor

        s, fam = self.scheduler, self.family
        bound = self._signature.bind(model_output, timestep, sample, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if s.num_inference_steps is None:
            raise _Unfused()                                   # diffusers' own error
        if model_output.shape != sample.shape or model_output.dtype not in DTYPES:
            raise _Unfused("model output shaped or typed unlike the sample")
        reason = fam.unsupported(s.config)
        if reason:
            raise _Unfused(reason)
        if (model_output.requires_grad or sample.requires_grad) and torch.is_grad_enabled():
            raise _Unfused("autograd")
        if model_output.device != sample.device:
            raise _Unfused("model output and sample on different devices")
        opts = fam.options(s, a, timestep)
        try:
            hit = self.table(**opts)
        except ValueError as err:
            raise _Unfused(str(err)) from None
        i = fam.row(self, s, timestep, hit[1])
        if i is None:
            raise _Unfused(f"timestep {timestep} not in the schedule")
        draw = fam.draws(s, hit[0], i, opts)
        (table, _, dev_cache), prev_x0 = fam.history(self, s, hit, i)

        noise = None
        if draw:
            noise = a.get("variance_noise")
            if noise is None:
                noise = randn_tensor(model_output.shape, generator=a["generator"],
                                     device=model_output.device,
                                     dtype=fam.noise_dtype or model_output.dtype)
            noise = noise.to(device=sample.device, dtype=sample.dtype).contiguous()
        dev = sample.device
        if dev not in dev_cache:
            dev_cache[dev] = (table.coeffs.to(dev), torch.arange(len(table), device=dev))
        coeffs, idx = dev_cache[dev]
        out_dtype = model_output.dtype
        state = None
        if table.slots:
            shape = (table.slots, *sample.shape)
            st = self._state
            fresh = (st is None or st.shape != shape or st.dtype != out_dtype
                     or st.device != dev)
            if fresh:
                st = self._state = torch.zeros(shape, dtype=out_dtype, device=dev)
            # The slots hold the last call's x0; diffusers' history may have moved on without
            # us (its own step ran, a copy of the scheduler, new timesteps): take its x0.
            if prev_x0 is not None and (fresh or prev_x0 is not self._state_x0):
                st[0].copy_(prev_x0)
            state = st
        prev, x0 = ops.denoise_step(
            model_output.contiguous(), sample.to(out_dtype).contiguous(), coeffs, idx[i], noise,
            state, 1.0, table.clip_sample, table.clip_sample_range, write_x0=True, guided=False)
        self._state_x0 = x0 if state is not None else None
        fam.advance(s, x0)
        return fam.output(s, prev, x0, a["return_dict"])


def unsupported(scheduler) -> str | None:
    """Why ``scheduler``'s step cannot be fused (None: it can)."""
    name = type(scheduler).__name__
    if name not in FAMILIES:
        return f"scheduler {name} not supported (fused: {', '.join(FAMILIES)})"
    reason = FAMILIES[name].unsupported(scheduler.config)
    return f"{name} with {reason} cannot be fused" if reason else None


def patch(scheduler) -> str | None:
    """Installs FusedStep as ``scheduler.step``; returns why not (the scheduler's own step is
    then used) or None."""
    if isinstance(scheduler.__dict__.get("step"), FusedStep):
        return None
    reason = unsupported(scheduler)
    if reason is None:
        scheduler.step = FusedStep(scheduler)
    return reason


def unpatch(scheduler) -> None:
    if isinstance(scheduler.__dict__.get("step"), FusedStep):
        del scheduler.step
