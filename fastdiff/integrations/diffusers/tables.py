"""Version-2 step tables (``fastdiff.schedules`` ROW_*) read from a diffusers scheduler itself.

Every scheduler step fastdiff fuses is affine in its tensor inputs - the sample x, the model
output m, the step's noise n and the tensors the scheduler carries between calls (past model
outputs, a saved sample, a derivative) - and its order and counter logic depends only on the
number of calls made. So the coefficients of a call can be read by running the scheduler's own
``step`` once on a batch whose element k is 1 on input k and 0 elsewhere (``_probe``): the
outputs and the new carried tensors, element by element, are the row's P, O and slot writes.
The carried tensors live in the row's four state slots; ``LAYOUTS`` names them per family and
``_allocate`` assigns them to slots call by call: a carried tensor that is an old one moved
(``model_outputs[i] = model_outputs[i + 1]``) keeps its slot, so a multistep history costs one
slot write per call (a ring buffer decided here, in the table).

Three extra batch elements check each call: one all zero (no constant term), two random (the
outputs must be the same linear combination of the basis outputs: a clip, a threshold or a
branch on the data would show). Settings known not to be affine are refused first, by name
(``refusal``); DDPM and DDIM with ``clip_sample`` use the analytic tables of
``fastdiff.schedules``, whose clip is the row's x0 clip, checked against the probe.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from contextlib import contextmanager

import numpy as np
import torch

from fastdiff import schedules as S

__all__ = ["LAYOUTS", "TableInfo", "config_refusal", "refusal", "table_for"]

# Which attributes of each family hold tensors between calls (everything else a step changes is
# plain bookkeeping: counters, orders, step index, timesteps, Heun's dt).
LAYOUTS: dict[str, tuple[str, ...]] = {
    "DDPMScheduler": (),
    "DDIMScheduler": (),
    "EulerDiscreteScheduler": (),
    "EulerAncestralDiscreteScheduler": (),
    "EDMEulerScheduler": (),
    "LCMScheduler": (),
    "HeunDiscreteScheduler": ("prev_derivative", "sample"),
    "KDPM2DiscreteScheduler": ("sample",),
    "KDPM2AncestralDiscreteScheduler": ("sample",),
    "DPMSolverMultistepScheduler": ("model_outputs",),
    "EDMDPMSolverMultistepScheduler": ("model_outputs",),
    "DEISMultistepScheduler": ("model_outputs",),
    "DPMSolverSinglestepScheduler": ("model_outputs", "sample"),
    "UniPCMultistepScheduler": ("model_outputs", "last_sample"),
    "PNDMScheduler": ("ets", "cur_sample", "cur_model_output"),
    "LMSDiscreteScheduler": ("derivatives",),
}
# Schedulers whose row is found from the timestep alone: no state, the table starts at 0.
TIMESTEP_INDEXED = ("DDPMScheduler", "DDIMScheduler")
# Step arguments that are tensors or generators, not table options.
NON_OPTIONS = ("model_output", "timestep", "sample", "generator", "return_dict", "variance_noise")

_RANDOM = 2                               # random batch elements checking each call
_ZERO = S.NUM_V                           # the all-zero element
_BATCH = S.NUM_V + 1 + _RANDOM
_SHAPE = (_BATCH, 1, 1, 1)
_RTOL = 2e-5                              # superposition tolerance (steps compute in float32)
_NOT_EXPECTED = ("is_scale_input_called",)  # set by scale_model_input, not by step


@dataclasses.dataclass
class TableInfo:
    """What an adapter needs besides the coefficients, per call c of the table (row c).

    start: the index in ``scheduler.timesteps`` of the first call (call c is index start + c);
    timesteps: the timestep each call is given; slots: state slots used (K);
    draws[c]: whether call c draws noise (as diffusers' step does, even where its coefficient is
    0, so a generator stream stays the same) and noise_dtype its dtype (None: the model
    output's); output_class / output_fields: the step's output, and x0_field the field the row's
    x0 is (pred_original_sample, LCM's denoised; None: the step returns prev_sample alone);
    layouts[c]: after call c, each carried attribute as ("slot", j), ("list", (j or None, ...))
    or ("value", v) (no tensor: None, 0, []); initial: the same before call 0; after[c]: the
    other attributes call c changes (step index, counters, orders, ...) with their new values:
    set both and the scheduler is as its own step leaves it. expects[c]: the scheduler's integer
    bookkeeping before call c (step index, counters, orders), which an adapter checks before
    it trusts the table's slots. clip_sample(_range): the row's x0 clip (DDPM/DDIM only).
    out_dtypes: the dtypes the step promotes the model output's with for prev_sample and x0
    (None: the model output's own).
    """

    scheduler: str
    start: int
    timesteps: list
    slots: int
    draws: list
    noise_dtype: torch.dtype | None
    output_class: type
    output_fields: tuple
    x0_field: str | None
    initial: dict
    layouts: list
    after: list
    expects: list
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    source: str = "probe"
    out_dtypes: tuple = (None, None)     # prev_sample's and x0's (None: the model output's)
    input_scales: list = dataclasses.field(default_factory=list)  # scale_model_input per call
    _slot_paths: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _on_device: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _copies: tuple = dataclasses.field(default=(None, None), repr=False, compare=False)
    _expects: list = dataclasses.field(default_factory=list, repr=False, compare=False)
    _after: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    @property
    def calls(self) -> int:
        return len(self.timesteps)

    def slot_of(self, c: int) -> dict:
        """{slot: attribute path} of the state call c reads: ((name,) or (name, index)).
        Computed once per call c (read on every step)."""
        paths = self._slot_paths.get(c)
        if paths is None:
            layout = self.initial if c == 0 else self.layouts[c - 1]
            paths = self._slot_paths[c] = _slot_paths(layout)
        return paths

    def expected(self, scheduler, c: int) -> bool:
        """Whether ``scheduler``'s bookkeeping is what call c of the table expects (so its slots
        and row apply): c is one of the table's calls and each expected value is there."""
        if not 0 <= c < self.calls:
            return False
        if not self._expects:     # per call: the keys and the values as tuples (read per step)
            self._expects = [(tuple(e), tuple(e.values())) for e in self.expects]
        keys, values = self._expects[c]
        attrs = scheduler.__dict__
        return tuple([attrs.get(k) for k in keys]) == values

    def after_items(self, c: int) -> list:
        """after[c] as a list of (name, value, mutable): a mutable value (a tensor, a list) is
        set as a copy of it, each call (made once per table: read per step)."""
        if not self._after:
            immutable = (bool, int, float, str, type(None))
            self._after = [[(k, v, not isinstance(v, immutable)) for k, v in a.items()]
                           for a in self.after]
        return self._after[c]

    def copies(self, coeffs: torch.Tensor, c: int) -> tuple | None:
        """The state slots that call c needs in the buffer the op updates in place: those its
        row reads, and those it leaves to the next call without writing them (the layout after
        it names them); None when the row writes no slot (the op then leaves the state as it
        is, and the call can run on the current buffer, no copy). Read once per table from
        ``coeffs`` (the table's rows, as content_table gives them)."""
        if self._copies[0] is not coeffs:
            rows = coeffs.detach().cpu().double().tolist()
            found = []
            for i, row in enumerate(rows):
                writes = [j for j in range(self.slots) if row[S.ROW_W + j] != 0]
                if not writes:
                    found.append(None)
                    continue
                live = set(_slot_paths(self.layouts[i]))
                need = []
                for j in range(self.slots):
                    read = (row[S.ROW_P + S.V_S + j] != 0 or row[S.ROW_O + S.V_S + j] != 0
                            or any(row[S.ROW_S + w * (S.NUM_V + 1) + S.V_S + j] != 0
                                   for w in writes))
                    if read or (j in live and j not in writes):
                        need.append(j)
                found.append(tuple(need))
            self._copies = (coeffs, found)
        return self._copies[1][c]

    def on_device(self, coeffs: torch.Tensor, device) -> tuple:
        """(coeffs as float32 on ``device``, each call's row index as a 0-d tensor there), made
        once per device: a new schedule with the same content (the next image) reuses them."""
        hit = self._on_device.get(device)
        if hit is None or hit[0] is not coeffs:
            hit = (coeffs, coeffs.to(device, torch.float32).contiguous(),
                   torch.arange(self.calls, device=device).unbind())
            self._on_device[device] = hit
        return hit[1:]


def _slot_paths(layout) -> dict:
    paths = {}
    for name, (kind, v) in layout.items():
        if kind == "slot":
            paths.setdefault(v, (name,))
        elif kind == "list":
            for i, j in enumerate(v):
                if j is not None:
                    paths.setdefault(j, (name, i))
    return paths


def _settings(cfg, keys=None) -> str:
    keys = keys or ("beta_schedule", "prediction_type", "timestep_spacing", "algorithm_type",
                    "solver_type", "solver_order", "variance_type", "rescale_betas_zero_snr",
                    "final_sigmas_type", "use_karras_sigmas", "use_exponential_sigmas",
                    "use_beta_sigmas")
    return ", ".join(f"{k}={cfg[k]!r}" for k in keys if k in cfg and cfg[k] is not None)


def refusal(scheduler, step_kwargs: dict | None = None) -> str | None:
    """The setting (named) that makes ``scheduler``'s step not a row, or None."""
    return (config_refusal(type(scheduler).__name__, scheduler.config)
            or options_refusal(step_kwargs))


def options_refusal(step_kwargs: dict | None) -> str | None:
    """The step argument (named) that is not a table option (a tensor or object), or None."""
    for k, v in (step_kwargs or {}).items():
        if torch.is_tensor(v) or not isinstance(v, (bool, int, float, str, type(None))):
            return f"step argument {k} (a tensor or object, not a table option)"
    return None


def config_refusal(name: str, cfg) -> str | None:
    """The configuration setting (named, with why) that makes scheduler ``name``'s step not a
    row, or None."""
    if name not in LAYOUTS:
        return f"scheduler {name} (tables exist for {', '.join(LAYOUTS)})"
    if cfg.get("thresholding", False):
        return "thresholding=True (a per-sample quantile of x0 is not affine)"
    if cfg.get("clip_sample", False) and name not in TIMESTEP_INDEXED:
        return "clip_sample=True (the clipped x0 feeds the saved state)"
    if cfg.get("variance_type") in ("learned", "learned_range"):
        return f"variance_type={cfg.variance_type!r} (the variance comes from the model output)"
    if name == "UniPCMultistepScheduler" and cfg.get("solver_p") is not None:
        return "solver_p (another scheduler's step inside UniPC's)"
    return None


# ---------------------------------------------------------------- the probe


def table_for(scheduler, start: int | None = None, **step_kwargs):
    """(coeffs (calls, ROW_LEN) float32, TableInfo) of a scheduler on which ``set_timesteps``
    (and ``set_begin_index``, if the loop starts later) was called: the calls from its current
    state on (a table may start mid-run: the tensors it holds then are the first slots).

    step_kwargs: the options each ``step`` call gets (eta, s_churn, ...). start: the index in
    ``scheduler.timesteps`` of the first call (default: the scheduler's begin or step index, else
    0). Raises ValueError naming the setting when a step is not a row.
    """
    name = type(scheduler).__name__
    why = refusal(scheduler, step_kwargs)
    if why:
        raise ValueError(f"{name}: {why} cannot be a fused step")
    if getattr(scheduler, "timesteps", None) is None:
        raise ValueError(f"call {name}.set_timesteps(...) before building its table")
    if name in TIMESTEP_INDEXED:
        start = 0
    elif start is None:
        start = next((int(v) for v in (getattr(scheduler, "_begin_index", None),
                                       getattr(scheduler, "_step_index", None))
                      if v is not None), 0)
    cfg = scheduler.config
    if cfg.get("clip_sample", False) and name in TIMESTEP_INDEXED:
        return _clipped_table(scheduler, step_kwargs)
    return _probe(scheduler, start, step_kwargs)


def carried(scheduler) -> tuple[str, ...]:
    """The attributes that carry tensors between ``scheduler``'s calls from here on. PNDM after
    its Runge-Kutta warm-up keeps the warm-up's last sample, never read again: not carried."""
    name = type(scheduler).__name__
    if (name == "PNDMScheduler" and not scheduler.config.skip_prk_steps
            and scheduler.counter >= len(scheduler.prk_timesteps)):
        return ("ets", "cur_model_output")
    return LAYOUTS[name]


def _cpu_copy(scheduler):
    """A deep copy with every tensor on the CPU (the probe's basis lives there)."""
    s = copy.deepcopy(scheduler)
    s.__dict__.pop("step", None)                  # an installed FusedStep: the class's step runs
    for k, v in list(s.__dict__.items()):
        if torch.is_tensor(v):
            s.__dict__[k] = v.cpu()
        elif isinstance(v, list) and any(torch.is_tensor(e) for e in v):
            s.__dict__[k] = [e.cpu() if torch.is_tensor(e) else e for e in v]
    return s


def _fingerprint(v):
    if isinstance(v, (list, tuple)):
        return (type(v), id(v), tuple(_fingerprint(e) for e in v))
    if isinstance(v, (bool, int, float, str, type(None))):
        return (type(v), v)
    return (type(v), id(v))


@contextmanager
def _patched_randn(module, noise, drawn):
    """diffusers' randn_tensor in the scheduler's module returns the noise basis."""
    own = module.__dict__.get("randn_tensor")

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        if tuple(shape) != _SHAPE:
            raise ValueError(f"noise of shape {tuple(shape)}, not the sample's")
        drawn.append(dtype)
        return noise.to(dtype=dtype or noise.dtype)

    module.randn_tensor = fake
    try:
        yield
    finally:
        if own is None:
            del module.randn_tensor
        else:
            module.randn_tensor = own


def _probe(scheduler, start: int, step_kwargs: dict):
    name = type(scheduler).__name__
    s = _cpu_copy(scheduler)
    carried = globals()["carried"](s)
    calls = len(s.timesteps) - start
    if calls <= 0:
        raise ValueError(f"{name}: no steps from index {start} of {len(s.timesteps)}")
    if "_step_index" in s.__dict__:
        if s._step_index not in (None, start):
            raise ValueError(f"{name}: the table's first call is index {start}, the scheduler "
                             f"is at {s._step_index}")
        s._step_index = start                 # as _init_step_index leaves it at the first call
    module = sys.modules[type(s).__module__]
    basis = np.zeros((_BATCH, S.NUM_V))
    basis[:S.NUM_V] = np.eye(S.NUM_V)
    basis[_ZERO + 1:] = np.random.default_rng(14).normal(size=(_RANDOM, S.NUM_V)) * 3.0
    basis_t = torch.tensor(basis)

    def column(k):
        return basis_t[:, k].reshape(_SHAPE).clone()

    layout = _held(s, carried)
    if "is_scale_input_called" in s.__dict__:
        s.is_scale_input_called = True            # the copy's warning is not the pipeline's
    initial = copy.deepcopy(layout)
    dtypes = _output_dtypes(s, layout, column, module, s.timesteps[start], step_kwargs)
    rows, draws, layouts, afters, timesteps, expects = [], [], [], [], [], []
    noise_dtypes, out_class, fields, x0_field, used = set(), None, None, None, 0
    scales = []
    for c in range(calls):
        _install(s, layout, column)
        t = s.timesteps[start + c]
        scales.append(_input_scale(s, t, f"{name} call {c}"))
        before = {k: _fingerprint(v) for k, v in s.__dict__.items()}
        expects.append({k: v for k, v in s.__dict__.items()
                        if type(v) in (int, bool, type(None)) and k not in carried
                        and k not in _NOT_EXPECTED})
        drawn: list = []
        with _patched_randn(module, column(S.V_N), drawn):
            try:
                out = type(s).step(s, column(S.V_M), t, column(S.V_X), return_dict=True,
                                   **step_kwargs)
            except Exception as err:                    # noqa: BLE001 - diffusers' own failure
                name_err = f"{type(err).__name__}: {err}"
                raise ValueError(f"{name}'s own step fails at call {c} ({_settings(s.config)}):"
                                 f" {name_err}") from None
        if len(drawn) > 1:
            raise ValueError(f"{name}: call {c} draws noise {len(drawn)} times; a row has one")
        draws.append(bool(drawn))
        noise_dtypes.update(None if d in (None, torch.float64) else d for d in drawn)
        if out_class is None:
            out_class = type(out)
            fields = tuple(f.name for f in dataclasses.fields(out))
            x0_field = next((f for f in ("pred_original_sample", "denoised")
                             if torch.is_tensor(getattr(out, f, None))), None)
        where = f"{name} call {c} (t={float(t):g})"
        o = _vector(out.prev_sample, basis, f"{where}: prev_sample")
        p = (_vector(getattr(out, x0_field), basis, f"{where}: {x0_field}") if x0_field
             else np.zeros(S.NUM_V))
        new = {}
        for n in carried:
            v = s.__dict__.get(n)
            if torch.is_tensor(v):
                new[n] = ("tensor", _vector(v, basis, f"{where}: {n}"))
            elif isinstance(v, (list, tuple)):
                new[n] = ("list", [None if e is None else
                                   _vector(e, basis, f"{where}: {n}[{i}]")
                                   for i, e in enumerate(v)])
            else:
                new[n] = ("value", copy.deepcopy(v))
        for k, v in s.__dict__.items():
            if k not in carried and _holds_batch_tensor(v):
                raise ValueError(f"{name}.{k} carries a tensor between calls that "
                                 "tables.LAYOUTS does not name")
        try:
            layout, writes = _allocate(layout, new)
        except _TooManySlots as err:
            hint = (" (skip_prk_steps=False: the Runge-Kutta warm-up)"
                    if name == "PNDMScheduler" else "")
            raise ValueError(f"{where}: the step keeps {err.needed} tensors between calls"
                             f"{hint}; a row has {S.SLOTS} slots") from None
        used = max([used] + [j + 1 for j in _slot_paths(layout)] + [j + 1 for j in writes])
        rows.append(_row(p, o, writes))
        layouts.append(copy.deepcopy(layout))
        afters.append({k: copy.deepcopy(v) for k, v in s.__dict__.items()
                       if k not in carried and _fingerprint(v) != before.get(k)})
        timesteps.append(t.item())
    if len(noise_dtypes) > 1:
        raise ValueError(f"{name}: noise drawn in several dtypes {noise_dtypes}")
    coeffs = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(coeffs).all():
        bad = int(np.argwhere(~np.isfinite(coeffs).all(1))[0][0])
        raise ValueError(f"{name}: non-finite coefficients at call {bad} (t={timesteps[bad]:g}); "
                         f"degenerate schedule with {_settings(s.config)}")
    info = TableInfo(name, start, timesteps, used, draws,
                     next(iter(noise_dtypes)) if noise_dtypes else None, out_class, fields,
                     x0_field, initial, layouts, afters, expects, out_dtypes=dtypes,
                     input_scales=scales[:len(rows)])
    return torch.tensor(coeffs, dtype=torch.float32), info


def _input_scale(s, t, where: str) -> float:
    """The factor ``s.scale_model_input`` applies at the call about to run with timestep t: a
    scalar for every family (1/sqrt(sigma^2 + 1), EDM's c_in, 1), checked on two inputs."""
    x = torch.tensor([1.0, -2.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    y = type(s).scale_model_input(s, x, t).double().flatten()
    f = float(y[0])
    if not (np.isfinite(f) and abs(float(y[1]) + 2 * f) <= 1e-6 * max(1.0, abs(f))):
        raise ValueError(f"{where}: scale_model_input is not a scalar factor ({y.tolist()})")
    return f


def _output_dtypes(s, layout, column, module, t, step_kwargs) -> tuple:
    """The dtypes the step returns prev_sample and its x0 in, read from one float16 call on a
    copy: None where it is the inputs' dtype, else the dtype the step promotes the inputs with
    (Euler's x0 is computed from its float32 upcast of the sample: float32 for half inputs)."""
    d = copy.deepcopy(s)
    _install(d, layout, lambda k: column(k).half())
    try:
        with _patched_randn(module, column(S.V_N).half(), []):
            out = type(d).step(d, column(S.V_M).half(), t, column(S.V_X).half(),
                               return_dict=True, **step_kwargs)
    except Exception:                                   # noqa: BLE001 - e.g. a half solve
        return (None, None)
    x0 = next((getattr(out, f) for f in ("pred_original_sample", "denoised")
               if torch.is_tensor(getattr(out, f, None))), out.prev_sample)
    return tuple(None if v.dtype == torch.float16 else v.dtype for v in (out.prev_sample, x0))


def _held(s, carried) -> dict:
    """The layout of what ``s`` carries now: a table may start mid-run (after calls diffusers'
    own step made), its held tensors in the first slots (the adapter copies them in)."""
    layout, j = {}, 0
    for n in carried:
        v = s.__dict__.get(n)
        if torch.is_tensor(v):
            layout[n], j = ("slot", j), j + 1
        elif isinstance(v, (list, tuple)) and any(map(torch.is_tensor, v)):
            slots = []
            for e in v:
                if e is None:
                    slots.append(None)
                elif torch.is_tensor(e):
                    slots.append(j)
                    j += 1
                else:
                    raise ValueError(f"{type(s).__name__}.{n} holds {type(e).__name__}")
            layout[n] = ("list", tuple(slots))
        else:
            layout[n] = ("value", copy.deepcopy(v))
    if j > S.SLOTS:
        raise ValueError(f"{type(s).__name__} holds {j} tensors; a row has {S.SLOTS} slots")
    return layout


def _holds_batch_tensor(v) -> bool:
    if torch.is_tensor(v):
        return tuple(v.shape) == _SHAPE
    if isinstance(v, (list, tuple)):
        return any(_holds_batch_tensor(e) for e in v)
    return False


def _install(s, layout, column) -> None:
    """Sets the carried attributes to the slot bases (each a fresh tensor)."""
    for n, (kind, v) in layout.items():
        if kind == "slot":
            setattr(s, n, column(S.V_S + v))
        elif kind == "list":
            setattr(s, n, [None if j is None else column(S.V_S + j) for j in v])
        else:
            setattr(s, n, copy.deepcopy(v))


def _vector(t, basis, what) -> np.ndarray:
    """The coefficients over v of a probe output; checks it is linear in v (no constant, the
    random elements the same combination of the basis elements)."""
    if not torch.is_tensor(t) or tuple(t.shape) != _SHAPE:
        raise ValueError(f"{what}: not a tensor shaped like the sample")
    y = t.detach().to(torch.float64).reshape(-1).numpy()
    coef = y[:S.NUM_V].copy()
    scale = np.abs(basis[_ZERO + 1:] * coef).sum(1) + np.abs(y[_ZERO + 1:])
    err = np.abs(basis[_ZERO + 1:] @ coef - y[_ZERO + 1:])
    if not np.isfinite(y).all():
        return np.full(S.NUM_V, np.nan)          # refused with the schedule's settings below
    if abs(y[_ZERO]) > 1e-12 * (1 + np.abs(coef).sum()) or (err > _RTOL * scale + 1e-12).any():
        raise ValueError(f"{what} is not affine in the step's inputs (a clip, a threshold or a "
                         "data-dependent branch): it cannot be a fused step")
    return coef


class _TooManySlots(Exception):
    def __init__(self, needed):
        super().__init__(needed)
        self.needed = needed


def _unit_slot(vec, occupied):
    """j when vec is exactly slot j's old value (a tensor moved, not computed), else None."""
    nz = np.flatnonzero(vec)
    if len(nz) == 1 and vec[nz[0]] == 1.0 and nz[0] >= S.V_S and nz[0] - S.V_S in occupied:
        return int(nz[0] - S.V_S)
    return None


def _allocate(old_layout, new):
    """New layout and slot writes {j: coefficients over v} for the carried values ``new``
    (name -> ("tensor", vec) | ("list", [vec | None]) | ("value", v))."""
    occupied = set(_slot_paths(old_layout))
    entries = []                                  # (name, index or None, vec)
    for n, (kind, v) in new.items():
        if kind == "tensor":
            entries.append((n, None, v))
        elif kind == "list":
            entries.extend((n, i, e) for i, e in enumerate(v) if e is not None)
    slot_of, kept, writes = {}, set(), {}
    for n, i, vec in entries:
        j = _unit_slot(vec, occupied)
        if j is not None:
            slot_of[(n, i)] = j
            kept.add(j)
    pending = [(n, i, vec) for n, i, vec in entries if (n, i) not in slot_of]
    for n, i, vec in pending:
        j = next((j for j, w in writes.items() if np.array_equal(w, vec)), None)
        if j is None:
            free = [j for j in range(S.SLOTS) if j not in kept and j not in writes]
            if not free:
                distinct = len(kept) + len(writes) + len(
                    {tuple(v) for _, _, v in pending if not any(np.array_equal(v, w)
                                                                for w in writes.values())})
                raise _TooManySlots(distinct)
            j = free[0]
            writes[j] = vec
        slot_of[(n, i)] = j
    layout = {}
    for n, (kind, v) in new.items():
        if kind == "tensor":
            layout[n] = ("slot", slot_of[(n, None)])
        elif kind == "list":
            layout[n] = ("list", tuple(None if e is None else slot_of[(n, i)]
                                       for i, e in enumerate(v)))
        else:
            layout[n] = ("value", v)
    return layout, writes


def _row(p, o, writes) -> list:
    names = ["x", "m", "n"] + [f"s{j}" for j in range(S.SLOTS)]
    return S.step_row(p=dict(zip(names, p)), o=dict(zip(names, o)),
                      writes={j: dict(zip(names, w)) for j, w in writes.items()})


# ---------------------------------------------------------------- DDPM/DDIM with clip_sample


def _clipped_table(scheduler, step_kwargs):
    """DDPM/DDIM with clip_sample: the probe of the same scheduler with the clip off gives P and
    the whole unclipped map O + O_x0 P; the part that goes through the clipped x0 (O_x0, the
    analytic tables' K_0) comes from fastdiff.schedules (DDIM) or from a probe with
    prediction_type='sample' (DDPM, whose K_0 diffusers rounds in float32 by 6e-5 near t = 0).
    So an unclipped element steps exactly as the probe, a clipped one through the row's x0
    clip. The analytic table's own unclipped map is checked against the probe (2e-4: that
    rounding)."""
    name = type(scheduler).__name__
    if name == "DDIMScheduler" and len(scheduler.timesteps) != scheduler.num_inference_steps:
        raise ValueError(f"{name} with clip_sample=True and timesteps not from set_timesteps")
    unclipped = copy.copy(scheduler)
    unclipped._internal_dict = type(scheduler.config)({**scheduler.config, "clip_sample": False})
    probed, info = _probe(unclipped, 0, step_kwargs)
    probed = probed.double()
    p = probed[:, S.ROW_P:S.ROW_P + S.NUM_V]
    o = probed[:, S.ROW_O:S.ROW_O + S.NUM_V]
    ana = _analytic(scheduler, step_kwargs)
    # Its x0 and next-sample maps over x, m, n; the next sample's unclipped map adds x0's weight
    # (K_0, the x0c column of O) times the x0 map.
    k0 = ana[:, S.ROW_O + S.NUM_V]
    ana_p = ana[:, S.ROW_P:S.ROW_P + 3]
    ana_o = ana[:, S.ROW_O:S.ROW_O + 3] + k0[:, None] * ana_p
    scale = torch.cat([p, o], 1).abs().amax(1, keepdim=True).clamp_min(1.0)
    if not ((torch.cat([ana_p - p[:, :3], ana_o - o[:, :3]], 1)).abs() <= 2e-4 * scale).all():
        raise ValueError(f"{name}: the analytic clipped table disagrees with the scheduler's step "
                         f"({_settings(scheduler.config)})")
    if name == "DDPMScheduler":
        # K_0 as diffusers rounds it (1 - alpha-bar_t / alpha-bar_prev in float32 near t = 0):
        # it weighs x0 alike for every prediction type, and is the model output's weight for
        # prediction_type='sample'
        twin = copy.copy(unclipped)
        twin._internal_dict = type(scheduler.config)({**unclipped.config,
                                                      "prediction_type": "sample"})
        k0 = _probe(twin, 0, step_kwargs)[0].double()[:, S.ROW_O + S.V_M]
    coeffs = probed.clone()
    coeffs[:, S.ROW_O:S.ROW_O + S.NUM_V] = o - k0[:, None] * p
    coeffs[:, S.ROW_O + S.NUM_V] = k0
    info.clip_sample = True
    info.clip_sample_range = float(scheduler.config.clip_sample_range)
    info.source = "probe + analytic x0 weight"
    return coeffs.float(), info


def _analytic(scheduler, kw):
    """fastdiff.schedules' own (version-2, clipped) table of a DDPM or DDIM scheduler, float64."""
    name = type(scheduler).__name__
    cfg = scheduler.config
    S._check_schedule(scheduler)
    ac = scheduler.alphas_cumprod.double().cpu().numpy()
    ts = scheduler.timesteps.cpu()
    try:
        if name == "DDPMScheduler":
            return S.ddpm_table(ac, ts, cfg.prediction_type, cfg.variance_type, True,
                                cfg.clip_sample_range).coeffs.double()
        return S.ddim_table(ac, ts, cfg.num_train_timesteps, float(scheduler.final_alpha_cumprod),
                            float(kw.get("eta", 0.0)), cfg.prediction_type, True,
                            cfg.clip_sample_range,
                            bool(kw.get("use_clipped_model_output", False))).coeffs.double()
    except (ZeroDivisionError, OverflowError) as err:
        raise ValueError(f"{name}: degenerate schedule ({err}) with "
                         f"{_settings(cfg)}") from None


def describe(coeffs, info) -> str:
    """Rows by name, one call a line (for reading a table)."""
    names = ["x", "m", "n"] + [f"s{j}" for j in range(S.SLOTS)]
    lines = []
    for c, r in enumerate(coeffs.double().tolist()):
        def fmt(off, extra=()):
            ks = names + list(extra)
            return " ".join(f"{k}:{r[off + i]:.4g}" for i, k in enumerate(ks) if r[off + i])
        w = [f"s{j}<-[{fmt(S.ROW_S + j * (S.NUM_V + 1), ['x0'])}]"
             for j in range(S.SLOTS) if r[S.ROW_W + j]]
        lines.append(f"{c:3d} t={info.timesteps[c]:g} noise={int(info.draws[c])} "
                     f"x0=[{fmt(S.ROW_P)}] out=[{fmt(S.ROW_O, ['x0'])}] {' '.join(w)}")
    return "\n".join(lines)
