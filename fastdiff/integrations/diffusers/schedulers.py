"""A diffusers scheduler's ``step`` as one ``denoise_step`` call (installed by ``accelerate``).

``FusedStep`` keeps the scheduler's own signature, return type, noise draws (same generator,
shape, dtype and order, via diffusers' ``randn_tensor``) and state updates. What differs between
schedulers lives in one small adapter per family (``FAMILIES``): the coefficient table a call
uses (``schedules.table_from_scheduler`` with the call's options), which row of it the call is,
whether it draws noise, what it reads from the scheduler's history, and how it leaves the
scheduler's state. Adding a scheduler is adding an adapter whose table
``schedules.table_from_scheduler`` can build. Calls the fused path cannot serve (learned
variance, solver order 3, a timestep not in the schedule) run the scheduler's own step, and the
reason is logged once. DDPM's and DDIM's dynamic thresholding runs after the op
(``schedules.apply_threshold``).

Version 2 (issue 14): ``RowStep`` runs every family of ``FAMILIES_V2`` (PNDM, Euler ancestral,
Heun, KDPM2 (ancestral), UniPC, LCM, DPM-Solver multistep / singlestep, DEIS, EDM, LMS and the
four above) as one version-2 row per model evaluation, the table read from the scheduler
itself (``tables.table_for``). ``V2_OP`` is the one switch: the op (the default) runs the rows
and makes ``patch`` install RowStep on every family; None runs them with the float64 reference
and leaves ``patch`` installing FusedStep on the four version-1 families.
"""
from __future__ import annotations

import copy
import inspect
import logging
import sys
from typing import NamedTuple

import torch
from torch.autograd import forward_ad

from fastdiff import ops, reference, schedules
from fastdiff.ops import log_once

from . import tables
from .blocks import DTYPES


class _Unfused(Exception):
    """The call runs the scheduler's own step; ``reason`` is logged (None: silently, e.g. to
    let the scheduler raise its own error)."""

    def __init__(self, reason: str | None = None, warn: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.warn = warn                 # a refused configuration (WARNING), not a call's detail


class Family:
    """How the step of one scheduler family maps onto ``denoise_step`` (defaults: a schedule
    indexed by timestep, no noise, no history, no state)."""
    output_class = ""            # the step's output class in the scheduler's module
    noise_dtype = None           # dtype of the drawn noise (None: the model output's)
    thresholding = False         # dynamic thresholding after the op (schedules.apply_threshold)

    def unsupported(self, cfg) -> str | None:
        """Why a scheduler with config ``cfg`` cannot be fused (None: it can)."""
        if cfg.get("thresholding", False) and not self.thresholding:
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

    # -- version-2 rows (issue 14): the table is read from the scheduler (tables.table_for).
    # plan() says what a call is (row, noise, state slots), an executor with
    # reference.denoise_step_v2's signature runs it, finish() leaves the scheduler as its own
    # step would; RowStep drives the three.
    int_timesteps_error = False  # the step refuses integer timesteps (diffusers' Euler family)

    def unsupported_rows(self, cfg) -> str | None:
        """Why a scheduler with config ``cfg`` cannot run as version-2 rows (None: it can).
        The version-1 families keep ``unsupported`` for FusedStep's 8-column rows; the
        version-2 families' ``unsupported`` is this."""
        return tables.config_refusal(self.scheduler_name, cfg)

    scheduler_name = ""          # set in FAMILIES_V2

    def table_options(self, s, a: dict) -> dict:
        """The step arguments that shape the table (eta, churn, order, ...); raises _Unfused."""
        return {k: v for k, v in a.items() if k not in tables.NON_OPTIONS}

    def position(self, rows: "Rows", s, timestep) -> int | None:
        """Index in scheduler.timesteps of this call. Default: the timestep's own index."""
        return _timestep_index(s.timesteps, timestep)

    def refuses_timestep(self, timestep) -> bool:
        """Whether the step raises its own error for this timestep (an integer one, for
        diffusers' Euler family)."""
        return self.int_timesteps_error and isinstance(
            timestep, (int, torch.IntTensor, torch.LongTensor))

    def plan(self, rows: "Rows", s, a: dict, model_output, sample) -> "Planned":
        """What this call is: its row, noise (drawn here, as the scheduler draws it) and the
        state slots it reads, gathered from the scheduler's carried tensors. Raises _Unfused."""
        if self.refuses_timestep(a["timestep"]):
            raise _Unfused()                                   # diffusers' own error
        opts = self.table_options(s, a)
        why = tables.options_refusal(opts)     # the configuration: RowStep checked it
        if why:
            raise _Unfused(why)
        # (the instance's dict: a missing attribute costs ~1 us in ConfigMixin's __getattr__)
        if s.__dict__.get("is_scale_input_called", True) is False:
            logging.getLogger("diffusers").warning(
                "The `scale_model_input` function should be called before `step` to ensure "
                "correct denoising. See `StableDiffusionPipeline` for a usage example.")
        pos = self.position(rows, s, a["timestep"])
        if pos is None:
            raise _Unfused(f"timestep {a['timestep']} not in the schedule")
        coeffs, info, row = rows.table(pos, opts)
        noise = self.noise(info, row, a, model_output.dtype, sample)
        dcoeffs, index = info.on_device(coeffs, sample.device)
        state = rows.gather(info, row, sample, fresh=row == 0)
        return Planned(row, dcoeffs, index[row], noise, state, info, coeffs)

    def noise(self, info, row: int, a: dict, dtype, sample):
        """The noise call ``row`` draws, as the scheduler draws it (None: it draws none)."""
        if not info.draws[row]:
            return None
        noise = a.get("variance_noise")
        if noise is None:
            noise = _randn(sample.shape, a.get("generator"), sample.device,
                           info.noise_dtype or dtype)
        if noise.dtype != sample.dtype or noise.device != sample.device:
            noise = noise.to(device=sample.device, dtype=sample.dtype)
        return noise if noise.is_contiguous() else noise.contiguous()

    def finish(self, rows: "Rows", s, planned: "Planned", state) -> None:
        """Leaves the scheduler as its own step would: carried attributes as views of the new
        state slots, then the bookkeeping the call changed (step index, counters, orders)."""
        info = planned.info
        # (a row that writes no slot ran on the current buffer: its views stand)
        if state is not None and state is not rows.state:
            if state.dtype != planned.state.dtype:
                state = state.to(planned.state.dtype)
            made, rows.target_views = rows.target_views, None
            rows.state = state
            rows.views = dict(enumerate(made[1] if made is not None and made[0] is state
                                        else state.unbind(0)))
        views = rows.views
        for name, (kind, v) in info.layouts[planned.row].items():
            if kind == "slot":
                setattr(s, name, views[v])
            elif kind == "list":
                setattr(s, name, [None if j is None else views[j] for j in v])
            else:
                setattr(s, name, _fresh(v))
        for k, v, mutable in info.after_items(planned.row):
            setattr(s, k, _fresh(v) if mutable else v)

    def output_v2(self, info, prev, x0, return_dict: bool):
        values = {"prev_sample": prev}
        if info.x0_field:
            values[info.x0_field] = x0
        if not return_dict:
            return tuple([values.get(f) for f in info.output_fields])
        return info.output_class(**values)


class DDPM(Family):
    output_class = "DDPMSchedulerOutput"
    thresholding = True

    def unsupported(self, cfg):
        if cfg.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
            return f"variance_type={cfg.variance_type!r}"
        return super().unsupported(cfg)

    def draws(self, s, table, i, opts):
        if self._draws[0] is not table:      # read once per table (~5 us a tensor read)
            self._draws = (table, (table.timesteps > 0).tolist())
        return self._draws[1][i]

    _draws: tuple = (None, [])


class DDIM(Family):
    output_class = "DDIMSchedulerOutput"
    thresholding = True

    def table_options(self, s, a):
        if a["variance_noise"] is not None and a["generator"] is not None:
            raise _Unfused()                                   # diffusers' own error
        return super().table_options(s, a)

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

    def position(self, rows, s, timestep):
        if s.step_index is None:
            s._init_step_index(timestep)
        return s.step_index

    def advance(self, s, x0):
        s._step_index += 1


class DPMSolverMultistep(_StepIndexed):
    noise_dtype = torch.float32
    _second_order: tuple = (None, [])   # (a table's coefficients, which rows are 2nd order)

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
        # A second-order row reads the previous x0 from slot 0 (out's coefficient of s_0);
        # which rows do is read once per table (a tensor read per call costs ~5 us).
        coeffs = hit[0].coeffs
        if self._second_order[0] is not coeffs:
            self._second_order = (coeffs,
                                  (coeffs[:, schedules.ROW_O + schedules.V_S] != 0).tolist())
        second_order = self._second_order[1][i]
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
    int_timesteps_error = True

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


# ---------------------------------------------------------------- version-2 families (issue 14)
# Each runs its rows from tables.table_for; tables.LAYOUTS names what a family carries between
# calls (the slots). Those without a docstring's worth of difference are plain step-indexed.


class _V2:
    """Mixin of the families that exist only as version-2 rows: ``unsupported`` is theirs."""

    def unsupported(self, cfg):
        return self.unsupported_rows(cfg)


class PNDM(_V2, Family):
    """PLMS: the row is the call counter; the past outputs (and the first step's sample) live in
    the slots. With skip_prk_steps=False the Runge-Kutta warm-up (calls 0 to 11) is rows too:
    its last step keeps five tensors between calls (three past outputs, the step's first sample
    and the running sum of its stages), the five slots of a row."""

    def position(self, rows, s, timestep):
        c = s.counter
        if c >= len(s.timesteps):
            return None
        if _timestep_index(s.timesteps, timestep, at=c) != c:
            raise _Unfused(f"timestep {timestep} is not the schedule's call {c}")
        return c


class EulerAncestralDiscrete(_V2, _StepIndexed):
    """Euler ancestral: noise every step, no state."""
    int_timesteps_error = True


class EDMEuler(_V2, _StepIndexed):
    """EDM Euler, churn as step options; no state."""
    int_timesteps_error = True


class LCM(_V2, _StepIndexed):
    """LCM: boundary-condition scalings; noise at every call but the last; returns denoised."""


class HeunDiscrete(_V2, _StepIndexed):
    """Two evaluations a step (one row each): the saved sample and derivative in two slots."""


class KDPM2Discrete(_V2, _StepIndexed):
    """Two evaluations a step: the saved sample in one slot."""


class KDPM2AncestralDiscrete(_V2, _StepIndexed):
    """Two evaluations a step, noise at the second: the saved sample in one slot."""


class UniPCMultistep(_V2, _StepIndexed):
    """UniPC predictor-corrector: the past data predictions (order) and the last sample."""


class DPMSolverSinglestep(_V2, _StepIndexed):
    """Singlestep DPM-Solver: the outputs of the current step's stages and its first sample."""


class DEISMultistep(_V2, _StepIndexed):
    """DEIS: the past outputs in a ring of slots."""


class EDMDPMSolverMultistep(_V2, _StepIndexed):
    """DPM-Solver(++) on EDM sigmas: the past data predictions in a ring of slots."""


class LMSDiscrete(_V2, _StepIndexed):
    """Linear multistep: the past derivatives (up to ``order``) in a ring of slots."""


FAMILIES_V2: dict[str, Family] = {
    **FAMILIES,
    "PNDMScheduler": PNDM(),
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscrete(),
    "EDMEulerScheduler": EDMEuler(),
    "LCMScheduler": LCM(),
    "HeunDiscreteScheduler": HeunDiscrete(),
    "KDPM2DiscreteScheduler": KDPM2Discrete(),
    "KDPM2AncestralDiscreteScheduler": KDPM2AncestralDiscrete(),
    "UniPCMultistepScheduler": UniPCMultistep(),
    "DPMSolverSinglestepScheduler": DPMSolverSinglestep(),
    "DEISMultistepScheduler": DEISMultistep(),
    "EDMDPMSolverMultistepScheduler": EDMDPMSolverMultistep(),
    "LMSDiscreteScheduler": LMSDiscrete(),
}
for _name, _family in FAMILIES_V2.items():
    _family.scheduler_name = _name


class _Binder:
    """``inspect.Signature.bind`` + ``apply_defaults`` for a scheduler's step, with the same
    errors, at a fraction of the cost (it ran on every step: ~30 us of a 130 us fused Euler step
    on the 2-core CPU). Signatures with *args or **kwargs take inspect's own path."""

    def __init__(self, signature: inspect.Signature):
        self.signature = signature
        params = list(signature.parameters.values())
        P = inspect.Parameter
        kinds = {p.kind for p in params}
        self.plain = not kinds & {P.VAR_POSITIONAL, P.VAR_KEYWORD, P.POSITIONAL_ONLY}
        self.names = [p.name for p in params if p.kind == P.POSITIONAL_OR_KEYWORD]
        self.known = {p.name for p in params}
        self.defaults = {p.name: p.default for p in params if p.default is not p.empty}
        self.required = [p.name for p in params if p.default is p.empty]

    def __call__(self, *args, **kwargs) -> dict:
        if not self.plain or len(args) > len(self.names):
            bound = self.signature.bind(*args, **kwargs)   # inspect's error, or its binding
            bound.apply_defaults()
            return bound.arguments
        a = dict(zip(self.names, args))
        for k, v in kwargs.items():
            if k not in self.known or k in a:
                self.signature.bind(*args, **kwargs)        # raises inspect's TypeError
            a[k] = v
        for k in self.required:
            if k not in a:
                self.signature.bind(*args, **kwargs)
        return {**self.defaults, **a}


def _view_index(ts, timestep) -> int | None:
    """The offset of ``timestep`` in ``ts`` when it is a 0-d view into it (what pipelines pass:
    an element of scheduler.timesteps), found without reading the device; else None."""
    if (timestep.dim() == 0 and timestep.dtype == ts.dtype and ts.dim() == 1
            and ts.stride(0) == 1 and timestep.device == ts.device
            and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()):
        i = timestep.storage_offset() - ts.storage_offset()
        if 0 <= i < ts.shape[0]:
            return i
    return None


def _timestep_index(ts, timestep, at: int | None = None) -> int | None:
    """Index of ``timestep`` in the schedule ``ts``: a 0-d view into ``ts`` (what pipelines
    pass) by its storage offset, without reading the device; else by value (the first match,
    or ``at`` when that one matches)."""
    if torch.is_tensor(timestep):
        i = _view_index(ts, timestep)
        if i is not None:
            return i
        timestep = timestep.item()
    values = ts.tolist()
    if at is not None and 0 <= at < len(values) and values[at] == timestep:
        return at
    return values.index(timestep) if timestep in values else None


class Planned(NamedTuple):
    """One version-2 call, as the executor takes it: the coefficient table on the sample's
    device, the row (``index``: the same as a device tensor), the noise (None: none drawn), the
    state slots (K, *sample.shape) it reads (None: K = 0) and the table's info."""
    row: int
    coeffs: torch.Tensor
    index: torch.Tensor
    noise: torch.Tensor | None
    state: torch.Tensor | None
    info: "tables.TableInfo"
    table: torch.Tensor | None = None   # the coefficients as the table holds them


class _Next(NamedTuple):
    """What RowStep's next calls must look like to be the next rows of the last call's table
    without the generic checks (the same scheduler schedule and configuration, arguments and
    tensors alike but for their values): a pipeline's loop, call after call. One per run of
    calls (RowStep keeps it with the next row)."""
    timesteps: object
    config: object
    unguided: bool
    tensors: tuple        # (pair's shape, sample's shape, their dtypes, their devices)
    kw_names: tuple
    option_names: tuple
    option_values: list
    info: "tables.TableInfo"
    table: torch.Tensor


class _Memo(NamedTuple):
    """What FusedStep's next call must look like to reuse the last one's checks, options and
    table (a table without state slots): the same schedule and configuration, tensors alike
    but for their values, the same step arguments but for the tensors and generator."""
    timesteps: object
    config: object
    steps: object
    unguided: bool
    tensors: tuple
    kw_names: tuple
    option_names: tuple
    option_values: list
    opts: dict
    hit: tuple


def _tensors_key(pair, sample) -> tuple:
    return (pair.shape, sample.shape, pair.dtype, sample.dtype, pair.device, sample.device)


def _unguided(pair, sample, guidance):
    """The model output a step's own signature sees: ``pair`` itself, or guided, the [uncond;
    cond] pair's first half (checks and binding read it; the op reads the pair)."""
    if guidance is None:
        return pair
    if pair.shape[0] != 2 * sample.shape[0]:
        raise _Unfused("guided model outputs not [uncond; cond] of the sample's batch")
    return pair[:sample.shape[0]]


def _fresh(v):
    """A table's value for a scheduler attribute: itself if immutable, else a copy of it (a
    tensor, e.g. Heun's dt, by clone: deepcopy costs ~10x more, per call)."""
    if isinstance(v, (bool, int, float, str, type(None))):
        return v
    return v.clone() if torch.is_tensor(v) else copy.deepcopy(v)


def _denoise_step(*args):
    """ops.denoise_step(*args) with every argument given positionally and of the right kind
    (tensors, floats, bools made by the caller): with no gradient wanted, the op's overload is
    called below autograd as ops._run does, without ops' Python type checks (the op checks the
    rest); else ops.denoise_step itself (~2 us less a call)."""
    if torch.is_grad_enabled() or forward_ad._current_level >= 0 or torch.compiler.is_compiling():
        return ops.denoise_step(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return _DENOISE_STEP(*args)


_DENOISE_STEP = torch.ops.fastdiff.denoise_step.default
# References to a storage (Rows.target); a torch without it gets a new buffer per call.
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _randn(shape, generator, device, dtype):
    """diffusers' randn_tensor(shape, generator, device, dtype): the same values. With no
    generator, or one on the device's type, it is torch.randn on the device, called here
    directly (randn_tensor's own Python costs ~2 us a call); other generators (a list, a CPU
    one for a GPU tensor) take randn_tensor itself."""
    if device.type != "neuron" and (generator is None or (
            isinstance(generator, torch.Generator) and generator.device.type == device.type)):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


_TABLES: dict = {}   # schedule content -> (coeffs, TableInfo): see content_table
_V1_TABLES: dict = {}  # schedule content -> FusedStep.table's triple
_CONFIG_TEXT: list = [None, ""]   # the last configuration (a FrozenDict) and its text


def _content(s, *extra) -> tuple:
    """A key of what a scheduler's table is made of: its class, configuration, timesteps,
    sigmas and step count (a new set_timesteps with the same content has the same table)."""
    sig = getattr(s, "sigmas", None)
    return (type(s).__name__, _config_text(s.config),
            s.timesteps.detach().cpu().numpy().tobytes(),
            None if not torch.is_tensor(sig) else sig.detach().cpu().numpy().tobytes(),
            getattr(s, "num_inference_steps", None), *extra)


def _config_text(cfg) -> str:
    """repr of a configuration's sorted items, once per configuration object (~10 us)."""
    if _CONFIG_TEXT[0] is not cfg:
        _CONFIG_TEXT[:] = [cfg, repr(sorted(cfg.items()))]
    return _CONFIG_TEXT[1]


def content_table(s, start: int, opts: dict):
    """tables.table_for(s, start, **opts), cached by the schedule's content for runs from the
    start: a loop calls set_timesteps per image, and the same schedule again is not probed again
    (~14 ms for 20 PNDM steps on a CPU). Shared by RowStep and the engine's sample_pipeline.
    Raises ValueError naming the setting when a step is not a row."""
    content = _content(s, tuple(sorted(opts.items()))) if start == 0 else None
    known = _TABLES.get(content) if content is not None else None
    if known is not None and known[1].expected(s, 0):
        return known
    coeffs, info = tables.table_for(s, start=start, **opts)
    if content is not None:
        if len(_TABLES) > 32:
            _TABLES.clear()
        _TABLES[content] = (coeffs, info)
    return coeffs, info


class Rows:
    """Per scheduler: its version-2 tables (by schedule, start and step options) and the state
    slots, whose views are the scheduler's carried attributes between calls."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self._cache: dict = {}
        self._last = None     # (timesteps, len, num_inference_steps, opts, hit) of the last call
        self.start: int | None = None
        self.state: torch.Tensor | None = None
        self.views: dict = {}
        self.spare: torch.Tensor | None = None   # the buffer before the last, see target()
        self.target_views: tuple | None = None   # (target()'s buffer, its slots' views)

    def table(self, pos: int, opts: dict):
        """(coeffs, info, row) for the call at index ``pos``:
        the run's table when the scheduler's bookkeeping is what the table expects there, else
        a new one from here (a run's first call, or the first after diffusers' own steps)."""
        s = self.scheduler
        last = self._last         # the run's table: checked without building a key
        if (last is not None and last[0] is s.timesteps and last[1] == len(s.timesteps)
                and last[2] == s.__dict__.get("num_inference_steps") and last[3] == opts):
            hit = last[4]
            row = pos - hit[2].start
            if hit[2].expected(s, row):
                return (*hit[1:], row)
        key = (id(s.timesteps), len(s.timesteps), getattr(s, "num_inference_steps", None),
               tuple(sorted(opts.items())))
        for start in (self.start, pos):
            if start is None:
                continue
            hit = self._cache.get(key + (start,))
            if hit is None or hit[0] is not s.timesteps:
                continue
            row = pos - hit[2].start
            if hit[2].expected(s, row):
                self.start = start
                self._last = (s.timesteps, len(s.timesteps),
                              s.__dict__.get("num_inference_steps"), dict(opts), hit)
                return (*hit[1:], row)
        start = 0 if type(s).__name__ in tables.TIMESTEP_INDEXED else pos
        try:
            coeffs, info = content_table(s, start, opts)
        except ValueError as err:
            raise _Unfused(str(err)) from None
        if len(self._cache) > 8:
            self._cache.clear()
        self._cache[key + (start,)] = hit = (s.timesteps, coeffs, info)
        self.start = start
        self._last = (s.timesteps, len(s.timesteps), s.__dict__.get("num_inference_steps"),
                      dict(opts), hit)
        return (*hit[1:], pos - start)

    def gather(self, info, row: int, like, fresh: bool):
        """The state slots call ``row`` reads: the views finish() left, else (the scheduler's
        own step ran in between) copies of its carried tensors."""
        if info.slots == 0:
            return None
        s = self.scheduler
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        buf = self.state
        if (fresh or buf is None or buf.shape[0] != info.slots or buf.shape[1:] != like.shape
                or buf.dtype != dtype or buf.device != like.device):
            # a new table (or layout): a new zeroed buffer (no stale non-finite values under
            # zero weights); the scheduler's tensors may be views of the old one, still intact
            buf = torch.empty((info.slots, *like.shape), dtype=dtype, device=like.device)
            for v in buf.unbind(0):     # slot by slot: see target()
                v.zero_()
            self.views = {}
        views, attrs = self.views, s.__dict__
        moved = {}                # the slots whose source is not the view finish() left
        for j, path in info.slot_of(row).items():
            t = attrs[path[0]] if path[0] in attrs else getattr(s, path[0], None)
            if len(path) == 2:
                t = t[path[1]] if isinstance(t, (list, tuple)) and len(t) > path[1] else None
            if t is not None and t is views.get(j):
                continue
            if not torch.is_tensor(t) or t.shape != like.shape:
                raise _Unfused(f"the scheduler's {'.'.join(map(str, path))} is not the tensor "
                               "its table reads")
            moved[j] = t
        if moved:
            ptr = buf.untyped_storage().data_ptr()
            moved = {j: t.clone() if t.untyped_storage().data_ptr() == ptr else t
                     for j, t in moved.items()}       # a view of another slot: read it first
            for j, t in moved.items():
                buf[j].copy_(t)
        self.state = buf
        return buf

    def unshared(self, state: torch.Tensor) -> bool:
        """Whether nothing but the scheduler's own carried attributes sees ``state``: then the
        op may update it in place (no copy), since finish() sets those attributes anew right
        after. True when its storage's references are the buffer, the probe's own and the
        views of finish() (no other view of it exists), and each of those views is referenced
        by this dict, the scheduler's attributes of tables.LAYOUTS (counted) and this
        function alone (nothing else holds a tensor the scheduler handed out)."""
        views = self.views
        k = state.shape[0]
        if (state is not self.state or len(views) != k or _USE_COUNT is None
                or _USE_COUNT(state.untyped_storage()._cdata) != 2 + k):
            return False
        held = _held(self.scheduler)
        for j in range(k):
            v = views[j]
            # the dict's reference, the local v, getrefcount's argument (_REFS, as counted by
            # this interpreter), then the scheduler's
            if sys.getrefcount(v) != _REFS + held.get(id(v), 0):
                return False
        return True

    def target(self, state: torch.Tensor, copies: tuple) -> torch.Tensor:
        """The buffer a call that writes slots runs the op on, holding ``state``'s slots
        ``copies`` (TableInfo.copies): not ``state`` itself, whose slots the scheduler's tensors
        (and whatever was handed out) are views of and must keep their values. The buffer
        before the last is reused when nothing else holds it (no view of it is left: its
        storage's only references are the buffer and the probe's own), else a new one; the
        slots not copied are the row's writes and slots no later call reads, finite as the
        buffer's earlier values or zeros (the op checks that the inputs it multiplies by 0
        are finite)."""
        buf, self.spare = self.spare, None
        fresh = (buf is None or buf.shape != state.shape or buf.dtype != state.dtype
                 or buf.device != state.device
                 or _USE_COUNT is None or _USE_COUNT(buf.untyped_storage()._cdata) != 2)
        if fresh:
            buf = torch.empty_like(state)
        # Slot by slot, each a sample's size: torch splits a copy or fill of 32768 elements or
        # more over its threads, and on a CPU shared with other work a second thread can wait
        # for a time slice (ms); diffusers' step makes no tensor that large at SD1.5's latent.
        views = buf.unbind(0)
        src = self.views if state is self.state and self.views else dict(
            enumerate(state.unbind(0)))
        for j, v in enumerate(views):
            if j in copies:
                v.copy_(src[j])
            elif fresh:
                v.zero_()
        self.target_views = (buf, views)     # finish() takes them as the new state's views
        return buf


def _refs_of_a_dict_value() -> int:
    """sys.getrefcount of a value held by a dict alone, read as Rows.unshared reads it (a local
    of the loop): what the interpreter counts (a newer CPython may not count the local)."""
    views = {0: torch.empty(0)}
    for j in range(1):
        v = views[j]
        return sys.getrefcount(v)


_REFS = _refs_of_a_dict_value()


def _held(scheduler) -> dict:
    """{id(tensor): references to it from the scheduler's carried attributes (tables.LAYOUTS)}
    (a function of its own: no local of it outlives the count)."""
    held: dict = {}
    attrs = scheduler.__dict__
    for name in tables.LAYOUTS.get(type(scheduler).__name__, ()):
        value = attrs.get(name)
        for t in (value if isinstance(value, list) else (value,)):
            if t is not None:
                held[id(t)] = held.get(id(t), 0) + 1
    return held


def _op_v2(model_output, sample, coeffs, step_index, noise=None, state=None, guidance_scale=1.0,
           clip_sample=False, clip_sample_range=1.0, guided=None):
    """torch.ops.fastdiff.denoise_step with reference.denoise_step_v2's signature: (out, x0c,
    new state). The op updates its state in place: it gets a copy in the sample's dtype, so the
    tensors of the scheduler that live in the old buffer stay as they were until
    Family.finish."""
    dev, dt = sample.device, sample.dtype
    st = None
    if state is not None:     # a copy: the op updates it in place
        st = state.clone() if state.dtype == dt and state.device == dev else state.to(dev, dt)
    out, x0 = ops.denoise_step(model_output, sample, _like(coeffs, dev, torch.float32),
                               _like(step_index, dev, step_index.dtype), _like(noise, dev, dt),
                               st, guidance_scale, clip_sample, clip_sample_range, write_x0=True,
                               guided=guided)
    return out, x0, st


def _like(t, dev, dtype):
    """t on ``dev`` in ``dtype``, contiguous: itself when it is (no call: one a step counts)."""
    if t is None or (t.dtype == dtype and t.device == dev and t.is_contiguous()):
        return t
    return t.to(device=dev, dtype=dtype).contiguous()


# The executor of version-2 rows: the op (set to None, RowStep runs the float64 reference and
# ``patch`` installs FusedStep on the four version-1 families only).
V2_OP = _op_v2


def v2_executor():
    """The function RowStep runs a row with: V2_OP, else the float64 reference."""
    return V2_OP or reference.denoise_step_v2


class _Step:
    """What FusedStep and RowStep share as a scheduler's ``step``: the scheduler's own step
    (``original``) and signature, and the calls: ``_step`` (the fused call; raises _Unfused)
    or, refused, the scheduler's own step after ``_fallback`` says why."""

    @property
    def original(self):
        """The scheduler's own step (looked up on its class: copies rebind to the copy)."""
        return type(self.scheduler).step.__get__(self.scheduler)

    @property
    def __signature__(self):           # pipelines inspect step's parameters (eta, generator)
        return self._signature

    def __call__(self, model_output, timestep, sample, *args, **kwargs):
        try:
            return self._step(model_output, timestep, sample, *args, **kwargs)
        except _Unfused as why:
            self._fallback(why)
            return self.original(model_output, timestep, sample, *args, **kwargs)

    def guided(self, model_outputs, guidance_scale: float, timestep, sample, *args, **kwargs):
        """The step of the classifier-free guided output u + g (c - u), with
        ``model_outputs`` = [u; c] (2B, ...) combined inside the op call."""
        try:
            return self._step(model_outputs, timestep, sample, *args, guidance=guidance_scale,
                              **kwargs)
        except _Unfused as why:
            self._fallback(why)
            u, c = model_outputs.chunk(2)
            return self.original(u + guidance_scale * (c - u), timestep, sample, *args, **kwargs)

    def _fallback(self, why) -> None:
        if why.reason:
            log_once(f"{self.name}.step: {why.reason}; diffusers' step used")


class RowStep(_Step):
    """A scheduler's step as one version-2 row call: Family.plan, the executor, Family.finish.

    ``executor`` has reference.denoise_step_v2's signature and returns (out, x0, new state);
    default: ``v2_executor()`` (the reference until the op reads version-2 rows; FusedStep
    takes this path over when it does). Calls a table cannot serve run the scheduler's own
    step, the reason logged once; a configuration the family refuses (``unsupported``) is
    logged at WARNING once per scheduler."""

    def __init__(self, scheduler, executor=None):
        self.scheduler = scheduler
        self.name = type(scheduler).__name__
        self.family = FAMILIES_V2[self.name]
        self.rows = Rows(scheduler)
        self.executor = executor or v2_executor()
        self._signature = inspect.signature(self.original)
        self._bind = _Binder(self._signature)
        self._warned: set = set()
        self._config, self._config_refusal = None, None
        self._next: tuple | None = None    # (_Next, its next row)
        self._return_dict = self._bind.defaults.get("return_dict", True)

    def __getstate__(self):            # deep copies and pickles: the scheduler, no tables
        return {"scheduler": self.scheduler, "executor": self.executor}

    def __setstate__(self, state):
        self.__init__(state["scheduler"], state["executor"])

    def _fallback(self, why) -> None:
        self._next = None                  # diffusers' step moves the scheduler on
        if why.reason and why.warn:
            if why.reason not in self._warned:
                self._warned.add(why.reason)
                logging.getLogger("fastdiff").warning("fastdiff: %s.step: %s; diffusers' step "
                                                      "used (not fused)", self.name, why.reason)
        else:
            super()._fallback(why)

    def _continued(self, nxt: _Next, row: int, pair, timestep, sample, guidance, kwargs):
        """The Planned of a call that continues the last one's run (row ``row`` of its table;
        see _Next), or None: the generic path decides. What the generic path checks once per
        configuration, schedule and argument set is compared by identity and equality here;
        what can change between calls (the position, the scheduler's bookkeeping, its carried
        tensors, grad mode) is checked as there. Raises _Unfused where that path would."""
        s, fam = self.scheduler, self.family
        if (s.__dict__.get("timesteps") is not nxt.timesteps or s.config is not nxt.config
                or (guidance is None) is not nxt.unguided
                or _tensors_key(pair, sample) != nxt.tensors
                or tuple(kwargs) != nxt.kw_names
                or [kwargs[k] for k in nxt.option_names] != nxt.option_values
                or "variance_noise" in kwargs
                or (torch.is_grad_enabled() and (pair.requires_grad or sample.requires_grad))
                or fam.refuses_timestep(timestep)):
            return None
        info = nxt.info
        if s.__dict__.get("is_scale_input_called", True) is False:
            return None                      # the generic path warns as diffusers does
        if (fam.position(self.rows, s, timestep) != info.start + row
                or not info.expected(s, row)):
            return None
        noise = fam.noise(info, row, kwargs, pair.dtype, sample) if info.draws[row] else None
        dcoeffs, index = info.on_device(nxt.table, sample.device)
        state = self.rows.gather(info, row, sample, fresh=row == 0) if info.slots else None
        return Planned(row, dcoeffs, index[row], noise, state, info, nxt.table)

    def _step(self, model_output, timestep, sample, *args, guidance=None, **kwargs):
        s, fam = self.scheduler, self.family
        pair = model_output
        nxt, self._next = self._next, None
        planned = None
        if nxt is not None and not args:
            planned = self._continued(nxt[0], nxt[1], pair, timestep, sample, guidance, kwargs)
        if planned is None:
            nxt = None
            planned, return_dict = self._plan(pair, timestep, sample, args, guidance, kwargs)
        else:
            return_dict = kwargs.get("return_dict", self._return_dict)
        info = planned.info
        out_dtype = pair.dtype
        st = planned.state
        if (self.executor is _op_v2 and sample.dtype == out_dtype
                and (st is None or (st.dtype == out_dtype and st.device == sample.device))):
            prev, x0, state = self._op(pair, sample, planned, guidance)
        else:
            prev, x0, state = self.executor(
                pair.contiguous(), sample.to(out_dtype).contiguous(), planned.coeffs,
                planned.index, planned.noise, planned.state,
                1.0 if guidance is None else float(guidance), info.clip_sample,
                info.clip_sample_range, guided=guidance is not None)
        fam.finish(self.rows, s, planned, state)
        if planned.row + 1 < info.calls and not args:
            if nxt is None:
                names = tuple(k for k in kwargs if k not in tables.NON_OPTIONS)
                nxt = (_Next(s.timesteps, s.config, guidance is None, _tensors_key(pair, sample),
                             tuple(kwargs), names, [kwargs[k] for k in names], info,
                             planned.table), 0)
            self._next = (nxt[0], planned.row + 1)
        dp = dx = out_dtype
        if info.out_dtypes != (None, None):
            dp, dx = (out_dtype if d is None else torch.promote_types(d, out_dtype)
                      for d in info.out_dtypes)
        prev = prev if prev.dtype == dp else prev.to(dp)
        x0 = x0 if x0.dtype == dx else x0.to(dx)
        return fam.output_v2(info, prev, x0, return_dict)

    def _op(self, pair, sample, planned: Planned, guidance):
        """The executor's call when it is the op (_op_v2) and the sample and the state are in
        the model output's dtype and on its device: the op called directly, on the current
        state buffer when the row writes no slot (the op leaves it as it is) or nothing but
        the scheduler's attributes sees it (Rows.unshared), else on a second buffer holding
        the slots the row needs (Rows.target). Returns (out, x0, new state)."""
        info, state = planned.info, planned.state
        st = state
        if st is not None:
            copies = info.copies(planned.table, planned.row)
            if copies is not None and not self.rows.unshared(state):
                st = self.rows.target(state, copies)
        args = (pair if pair.is_contiguous() else pair.contiguous(),
                sample if sample.is_contiguous() else sample.contiguous(),
                planned.coeffs, planned.index, planned.noise, st,
                1.0 if guidance is None else float(guidance), info.clip_sample,
                info.clip_sample_range, info.x0_field is not None, guidance is not None)
        # (x0 is written only when the step returns it: PNDM's, UniPC's, DPM-Solver's, DEIS's
        # and LMS's outputs have no x0 field, and their slots read x0 inside the op)
        out, x0 = _denoise_step(*args)
        if st is not state:
            self.rows.spare = state        # the next call that writes may reuse it
        return out, x0, st

    def _plan(self, model_output, timestep, sample, args, guidance, kwargs):
        """(Planned, return_dict) of a call, every check made. Raises _Unfused."""
        s, fam = self.scheduler, self.family
        pair = model_output
        model_output = _unguided(pair, sample, guidance)
        a = self._bind(model_output, timestep, sample, *args, **kwargs)
        if getattr(s, "timesteps", None) is None:
            raise _Unfused()                                   # diffusers' own error
        cfg = s.config
        if cfg is not self._config:           # checked once per configuration (~2 us a call)
            self._config, self._config_refusal = cfg, fam.unsupported_rows(cfg)
        why = self._config_refusal
        if why:
            raise _Unfused(f"{self.name} with {why} cannot be v2 rows", warn=True)
        if model_output.shape != sample.shape or model_output.dtype not in DTYPES:
            raise _Unfused("model output shaped or typed unlike the sample")
        if (model_output.requires_grad or sample.requires_grad) and torch.is_grad_enabled():
            raise _Unfused("autograd")
        if model_output.device != sample.device:
            raise _Unfused("model output and sample on different devices")
        return fam.plan(self.rows, s, a, model_output, sample), a["return_dict"]


class FusedStep(_Step):
    """A scheduler's ``step`` as one ``denoise_step`` call (installed as ``scheduler.step``)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.name = type(scheduler).__name__
        self.family = FAMILIES[self.name]
        self._signature = inspect.signature(self.original)
        self._bind = _Binder(self._signature)
        self._cache: dict = {}
        self._last = None       # (timesteps, steps, kind, options, table's triple): see table
        # The kernel's state slots (DPM-Solver's previous x0), updated in place by each call,
        # and the x0 of the last call (diffusers' model_outputs[-1] while the slots hold it).
        self._state: torch.Tensor | None = None
        self._state_x0: torch.Tensor | None = None
        self._config, self._config_refusal = None, None
        self._memo: _Memo | None = None
        self._defaults = (self._bind.defaults.get("generator"),
                          self._bind.defaults.get("return_dict", True))

    def __getstate__(self):            # deep copies and pickles: the scheduler, no cached tables
        return {"scheduler": self.scheduler}

    def __setstate__(self, state):
        self.__init__(state["scheduler"])

    def table(self, kind="table", **opts):
        """(table, {timestep: row}, {device: (coefficients, row indices)}) of the scheduler's
        current schedule; kind 'first_order' is DPM-Solver's first-order table of it."""
        s = self.scheduler
        cur, steps = s.timesteps, s.num_inference_steps
        last = self._last      # the last call's: checked without building a key (~1 us)
        if (last is not None and last[0] is cur and last[1] == steps and last[2] == kind
                and last[3] == opts):
            return last[4]
        key = (kind, id(cur), steps, tuple(sorted(opts.items())))
        hit = self._cache.get(key)
        if hit is not None and hit[3] is cur:
            self._last = (cur, steps, kind, dict(opts), hit[:3])
            return hit[:3]
        content = _content(s, kind, key[3])
        hit = _V1_TABLES.get(content)       # the same schedule again (the next image)
        if hit is None:
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
            if len(_V1_TABLES) > 32:
                _V1_TABLES.clear()
            _V1_TABLES[content] = hit
        if len(self._cache) > 8:
            self._cache.clear()
        self._cache[key] = (*hit, s.timesteps)
        self._last = (cur, steps, kind, dict(opts), hit)
        return hit

    def index_of(self, timestep, index_of):
        """Row of ``timestep`` in the schedule. A pipeline's ``t`` is usually an element of
        ``scheduler.timesteps`` itself (a 0-d view): its row is its offset in that storage, found
        without reading the device (no host sync per step)."""
        ts = self.scheduler.timesteps
        if torch.is_tensor(timestep):
            i = _view_index(ts, timestep)
            if i is not None:
                return i
            timestep = timestep.item()
        return index_of.get(timestep)

    def _step(self, model_output, timestep, sample, *args, guidance=None, **kwargs):
        s, fam, pair = self.scheduler, self.family, model_output
        memo = self._memo
        if (memo is not None and not args and s.__dict__.get("timesteps") is memo.timesteps
                and s.config is memo.config
                and s.__dict__.get("num_inference_steps") == memo.steps
                and (guidance is None) is memo.unguided
                and _tensors_key(pair, sample) == memo.tensors
                and tuple(kwargs) == memo.kw_names
                and [kwargs[k] for k in memo.option_names] == memo.option_values):
            # The same schedule, configuration, tensors and options as the call that made the
            # memo: its checks, binding, options and table stand (a table without slots: no
            # history either); the timestep is checked as options() would.
            if fam.refuses_timestep(timestep):
                raise _Unfused()                               # diffusers' own error
            generator, return_dict = self._defaults
            return self._run(pair, timestep, sample, guidance, memo.opts, memo.hit,
                             kwargs.get("generator", generator), None,
                             kwargs.get("return_dict", return_dict))
        self._memo = None
        a, opts, hit = self._checked(pair, timestep, sample, args, guidance, kwargs)
        out = self._run(pair, timestep, sample, guidance, opts, hit, a["generator"],
                        a.get("variance_noise"), a["return_dict"])
        if not args and not hit[0].slots and "variance_noise" not in kwargs:
            names = tuple(k for k in kwargs if k not in tables.NON_OPTIONS)
            self._memo = _Memo(s.timesteps, s.config, s.num_inference_steps, guidance is None,
                               _tensors_key(pair, sample), tuple(kwargs), names,
                               [kwargs[k] for k in names], opts, hit)
        return out

    def _checked(self, pair, timestep, sample, args, guidance, kwargs):
        """(bound arguments, table options, table) of a call, every check made. Raises
        _Unfused."""
        s, fam = self.scheduler, self.family
        # Guided, the step's model output is the pair's first half (_unguided); nothing here
        # reads its values, so the pair stands in for it (no slice made per call).
        if guidance is not None and pair.shape[0] != 2 * sample.shape[0]:
            raise _Unfused("guided model outputs not [uncond; cond] of the sample's batch")
        a = self._bind(pair, timestep, sample, *args, **kwargs)
        if s.num_inference_steps is None:
            raise _Unfused()                                   # diffusers' own error
        if ((pair.shape != sample.shape if guidance is None
             else pair.shape[1:] != sample.shape[1:]) or pair.dtype not in DTYPES):
            raise _Unfused("model output shaped or typed unlike the sample")
        model_output = pair
        cfg = s.config
        if cfg is not self._config:           # checked once per configuration
            self._config, self._config_refusal = cfg, fam.unsupported(cfg)
        reason = self._config_refusal
        if reason:
            raise _Unfused(reason)
        if model_output.device != sample.device:
            raise _Unfused("model output and sample on different devices")
        opts = fam.options(s, a, timestep)
        try:
            hit = self.table(**opts)
        except ValueError as err:
            raise _Unfused(str(err)) from None
        return a, opts, hit

    def _run(self, pair, timestep, sample, guidance, opts, hit, generator, variance_noise,
             return_dict):
        """The op call of a checked call, and the scheduler left as its step leaves it."""
        s, fam = self.scheduler, self.family
        model_output = pair
        i = fam.row(self, s, timestep, hit[1])
        if i is None:
            raise _Unfused(f"timestep {timestep} not in the schedule")
        draw = fam.draws(s, hit[0], i, opts)
        (table, _, dev_cache), prev_x0 = fam.history(self, s, hit, i)
        if (table.slots and torch.is_grad_enabled()
                and (model_output.requires_grad or sample.requires_grad)):
            # denoise_step does not differentiate through its in-place slots (a multistep
            # history); steps without slots (DDPM, DDIM, Euler) run fused with gradients.
            raise _Unfused("autograd through the solver's state slots")

        noise = None
        if draw:
            noise = variance_noise
            if noise is None:
                noise = _randn(sample.shape, generator, model_output.device,
                               fam.noise_dtype or model_output.dtype)
            if noise.dtype != sample.dtype or noise.device != sample.device:
                noise = noise.to(device=sample.device, dtype=sample.dtype)
            noise = noise if noise.is_contiguous() else noise.contiguous()
        dev = sample.device
        if dev not in dev_cache:   # the table and each row's index (0-d views) on the device
            dev_cache[dev] = (table.coeffs.to(dev),
                              torch.arange(len(table), device=dev).unbind())
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
        if sample.dtype != out_dtype:
            sample = sample.to(out_dtype)
        prev, x0 = _denoise_step(
            pair if pair.is_contiguous() else pair.contiguous(),
            sample if sample.is_contiguous() else sample.contiguous(), coeffs,
            idx[i], noise, state, 1.0 if guidance is None else float(guidance),
            table.clip_sample, table.clip_sample_range, True, guidance is not None)
        if table.threshold is not None:
            prev, x0 = schedules.apply_threshold(prev, x0, coeffs, idx[i], *table.threshold)
        self._state_x0 = x0 if state is not None else None
        fam.advance(s, x0)
        return fam.output(s, prev, x0, return_dict)


def _why_not(scheduler, families: dict, refusal: str) -> str | None:
    """Why ``scheduler`` is not served by ``families`` (their ``refusal`` method names the
    setting), or None."""
    name = type(scheduler).__name__
    if name not in families:
        return f"scheduler {name} not supported (fused: {', '.join(families)})"
    reason = getattr(families[name], refusal)(scheduler.config)
    return f"{name} with {reason} cannot be fused" if reason else None


def unsupported_rows(scheduler) -> str | None:
    """Why ``scheduler``'s step cannot be version-2 rows (RowStep; None: it can)."""
    return _why_not(scheduler, FAMILIES_V2, "unsupported_rows")


def unsupported(scheduler) -> str | None:
    """Why ``scheduler``'s step cannot be fused as FusedStep's 8-column rows (what the engine's
    sample_pipeline runs too; None: it can)."""
    return _why_not(scheduler, FAMILIES, "unsupported")


def patch(scheduler) -> str | None:
    """Installs FusedStep or RowStep as ``scheduler.step``; returns why not (the scheduler's own
    step is then used) or None."""
    if isinstance(scheduler.__dict__.get("step"), (FusedStep, RowStep)):
        return None
    # The four version-1 families keep FusedStep (the engine shares its tables); every other
    # family of FAMILIES_V2 runs as version-2 rows through the op.
    # (FAMILIES is a subset of FAMILIES_V2, so the rows' reason is the one to give.)
    reason = unsupported(scheduler)
    if reason is None:
        scheduler.step = FusedStep(scheduler)
        return None
    if V2_OP is None:
        return reason
    reason = unsupported_rows(scheduler)
    if reason is None:
        scheduler.step = RowStep(scheduler)
    return reason


def unpatch(scheduler) -> None:
    if isinstance(scheduler.__dict__.get("step"), (FusedStep, RowStep)):
        del scheduler.step
