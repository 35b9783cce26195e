"""FusedStep (the scheduler step fastdiff.accelerate installs) against the scheduler's own step,
call by call: outputs, return types and the scheduler state after every step."""
import copy
import dataclasses

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdiff.integrations.diffusers import schedulers  # noqa: E402

CASES = [
    ("DDPMScheduler", {}, {}),
    ("DDPMScheduler", {"variance_type": "fixed_large", "prediction_type": "v_prediction"}, {}),
    ("DDIMScheduler", {"clip_sample": True}, {"eta": 0.5, "use_clipped_model_output": True}),
    ("DDIMScheduler", {"prediction_type": "sample", "timestep_spacing": "trailing"}, {"eta": 0.0}),
    ("DPMSolverMultistepScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun",
                                     "prediction_type": "v_prediction"}, {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "lower_order_final": False}, {}),
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction"},
     {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 5.0}),
    # dynamic thresholding (DeepFloyd IF's DDPM sets it): the op, then the per-sample quantile
    ("DDPMScheduler", {"thresholding": True}, {}),
    ("DDPMScheduler", {"thresholding": True, "prediction_type": "sample",
                       "dynamic_thresholding_ratio": 0.8, "sample_max_value": 2.0}, {}),
    ("DDIMScheduler", {"thresholding": True, "prediction_type": "v_prediction",
                       "clip_sample": True}, {}),
    ("DDIMScheduler", {"thresholding": True, "dynamic_thresholding_ratio": 0.9,
                       "sample_max_value": 1.5}, {"eta": 0.5, "use_clipped_model_output": True}),
]


def _pair(kind, cfg, steps):
    cls = getattr(diffusers, kind)
    a = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **cfg)
    b = cls.from_config(a.config)
    for s in (a, b):
        s.set_timesteps(steps)
    b.step = schedulers.FusedStep(b)
    return a, b


def _assert_same(out_ref, out, what):
    if isinstance(out_ref, tuple):
        assert isinstance(out, tuple) and len(out) == len(out_ref), what
        pairs = zip(out_ref, out)
    else:
        assert type(out) is type(out_ref), what
        pairs = ((getattr(out_ref, f.name), getattr(out, f.name))
                 for f in dataclasses.fields(out_ref))
    for r, o in pairs:
        if r is None:
            assert o is None
            continue
        atol = 2e-5 * max(1.0, r.abs().max().item())
        torch.testing.assert_close(o, r.to(o.dtype), rtol=2e-5, atol=atol, msg=what)


@pytest.mark.parametrize("kind,cfg,step_kw", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("return_dict", [True, False])
@pytest.mark.parametrize("guided", [False, True])
def test_fused_step_matches_scheduler_step(kind, cfg, step_kw, return_dict, guided,
                                          monkeypatch):
    """guided: FusedStep.guided([u; c], g, ...) against the step of u + g (c - u) (the op
    combines the pair inside its call: one op call a step, with the pair)."""
    batches = []
    op = schedulers.ops.denoise_step
    monkeypatch.setattr(schedulers.ops, "denoise_step",
                        lambda mo, *a, **k: batches.append(mo.shape[0]) or op(mo, *a, **k))
    steps = 6
    a, b = _pair(kind, cfg, steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 7, generator=gen) * a.init_noise_sigma
    xa, xb = x.clone(), x.clone()
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i, t in enumerate(a.timesteps):
        m = torch.randn(x.shape, generator=gen)
        ia, ib = a.scale_model_input(xa, t), b.scale_model_input(xb, t)
        torch.testing.assert_close(ib, ia)
        if guided:
            u = torch.randn(x.shape, generator=gen)
            ra = a.step(u + 3.0 * (m - u), t, xa, generator=ga, return_dict=return_dict,
                        **step_kw)
            rb = b.step.guided(torch.cat([u, m]), 3.0, t, xb, generator=gb,
                               return_dict=return_dict, **step_kw)
        else:
            ra = a.step(m, t, xa, generator=ga, return_dict=return_dict, **step_kw)
            rb = b.step(m, t, xb, generator=gb, return_dict=return_dict, **step_kw)
        _assert_same(ra, rb, f"step {i}")
        xa, xb = (ra[0], rb[0]) if not return_dict else (ra.prev_sample, rb.prev_sample)
        assert getattr(a, "step_index", None) == getattr(b, "step_index", None)
        if kind == "DPMSolverMultistepScheduler":
            assert a.lower_order_nums == b.lower_order_nums
            for ma, mb in zip(a.model_outputs, b.model_outputs):
                torch.testing.assert_close(mb, ma, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(xb, xa, rtol=1e-4, atol=1e-4)
    assert batches == [x.shape[0] * (2 if guided else 1)] * steps
    # the noise consumed from the generator is the same
    assert torch.equal(torch.randn(3, generator=ga), torch.randn(3, generator=gb))


@pytest.mark.parametrize("kind", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_fused_step_from_a_begin_index(kind):
    """img2img starts mid-schedule (set_begin_index): DPM's first step there is first order."""
    a, b = _pair(kind, {}, 8)
    for s in (a, b):
        s.set_begin_index(3)
    gen = torch.Generator().manual_seed(0)
    xa = xb = torch.randn(1, 4, 4, 4, generator=gen)
    for t in a.timesteps[3:]:
        m = torch.randn(xa.shape, generator=gen)
        xa = a.step(m, t, a.scale_model_input(xa, t)).prev_sample
        xb = b.step(m, t, b.scale_model_input(xb, t)).prev_sample
        torch.testing.assert_close(xb, xa, rtol=1e-5, atol=1e-5)


def test_dpm_history_survives_diffusers_own_steps_and_copies():
    """The fused DPM-Solver step keeps the previous x0 in the kernel's state slot, which the
    kernel writes; where diffusers' history moved on without it (its own step ran, the scheduler
    was deep-copied mid-run), the slot is taken from the scheduler's model_outputs."""
    a, b = _pair("DPMSolverMultistepScheduler", {}, 8)
    gen = torch.Generator().manual_seed(0)
    xa = xb = torch.randn(1, 4, 4, 4, generator=gen)
    for i, t in enumerate(a.timesteps):
        m = torch.randn(xa.shape, generator=gen)
        if i == 4:
            b = copy.deepcopy(b)                          # a new FusedStep, new slots
        step = b.step.original if i == 2 else b.step     # diffusers' own step at step 2
        xa = a.step(m, t, xa).prev_sample
        xb = step(m, t, xb).prev_sample
        torch.testing.assert_close(xb, xa, rtol=1e-5, atol=1e-5, msg=f"step {i}")
    assert isinstance(b.step, schedulers.FusedStep) and b.step._state is not None


@pytest.mark.parametrize("kind", ["DDPMScheduler", "DDIMScheduler"])
def test_thresholding_is_fused(kind, monkeypatch):
    """Issue 14: thresholding=True ran diffusers' step; now the op runs it, and equals it with
    the threshold active (|x0| well beyond 1) and not."""
    calls = []
    op = schedulers.ops.denoise_step
    monkeypatch.setattr(schedulers.ops, "denoise_step",
                        lambda *a, **k: calls.append(1) or op(*a, **k))
    a, b = _pair(kind, {"thresholding": True, "sample_max_value": 3.0}, 4)
    assert schedulers.patch(b) is None
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for scale in (10.0, 0.1):
        x, m = torch.randn(3, 4, 4, 4) * scale, torch.randn(3, 4, 4, 4)
        for t in a.timesteps:
            ra, rb = (s.step(m, t, x, generator=seeded()) for s in (a, b))
            for f in ("prev_sample", "pred_original_sample"):
                torch.testing.assert_close(getattr(rb, f), getattr(ra, f), rtol=2e-5,
                                           atol=2e-5 * scale)
    assert len(calls) == 2 * len(a.timesteps)


def test_fused_step_falls_back_for_learned_variance():
    a, b = _pair("DDPMScheduler", {"variance_type": "learned_range"}, 4)
    x = torch.randn(1, 4, 4, 4)
    t = a.timesteps[0]
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    m2 = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(b.step(m2, t, x, generator=seeded()).prev_sample,
                               a.step(m2, t, x, generator=seeded()).prev_sample)


def test_fused_step_keeps_the_schedulers_errors():
    a, b = _pair("EulerDiscreteScheduler", {}, 4)
    with pytest.raises(ValueError, match="integer indices"):
        b.step(torch.randn(1, 4, 2, 2), 3, torch.randn(1, 4, 2, 2))
    c = diffusers.DDIMScheduler()
    c.step = schedulers.FusedStep(c)
    with pytest.raises(ValueError, match="set_timesteps"):
        c.step(torch.randn(1, 4, 2, 2), 3, torch.randn(1, 4, 2, 2))


def test_fused_step_after_set_timesteps_again():
    """A new schedule (another step count) gets a new table."""
    a, b = _pair("DDIMScheduler", {}, 4)
    x, m = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    b.step(m, b.timesteps[0], x)
    for s in (a, b):
        s.set_timesteps(10)
    t = a.timesteps[1]
    torch.testing.assert_close(b.step(m, t, x).prev_sample, a.step(m, t, x).prev_sample)


def test_tables_cached_by_schedule_content():
    """FusedStep's tables are shared by schedule content (the next image's set_timesteps reuses
    its table): the same schedule again is the same table; a configuration that changes only
    the coefficients (prediction_type: the same timesteps) is another one, and each equals its
    scheduler's own step."""
    x, m = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    a, b = _pair("DDIMScheduler", {}, 4)
    first = b.step.table(eta=0.0, use_clipped_model_output=False)[0]
    b.set_timesteps(4)                                  # a new timesteps tensor, same content
    assert b.step.table(eta=0.0, use_clipped_model_output=False)[0] is first
    va, vb = _pair("DDIMScheduler", {"prediction_type": "v_prediction"}, 4)
    assert torch.equal(va.timesteps, a.timesteps)
    assert vb.step.table(eta=0.0, use_clipped_model_output=False)[0] is not first
    for (s, ref) in ((b, a), (vb, va)):
        t = s.timesteps[1]
        torch.testing.assert_close(s.step(m, t, x).prev_sample, ref.step(m, t, x).prev_sample)


def test_row_of_a_timestep_view_is_found_without_reading_it():
    _, b = _pair("DDIMScheduler", {}, 5)
    step = b.step
    _, index_of, _ = step.table("table", eta=0.0, use_clipped_model_output=False)
    for i, t in enumerate(b.timesteps):                   # views into scheduler.timesteps
        assert step.index_of(t, index_of) == i
        assert step.index_of(t.clone(), index_of) == i   # a copy: looked up by value
        assert step.index_of(int(t), index_of) == i
    assert step.index_of(torch.tensor(3), index_of) is None


@pytest.mark.parametrize("kind,cfg,options", [
    ("EulerDiscreteScheduler", {}, {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 5.0}),
    ("DDIMScheduler", {}, {"eta": 0.5}),
    ("DDPMScheduler", {}, {}),
])
def test_calls_like_the_last_reuse_its_checks(kind, cfg, options, monkeypatch):
    """A call with the last one's schedule, configuration, tensor shapes and arguments reuses
    its checks, options and table (FusedStep._memo); a changed option, guidance, return_dict,
    argument set or schedule takes the full path, and every call equals the scheduler's own
    step (the same generator draws)."""
    a, b = _pair(kind, cfg, 12)
    checked = []
    real = schedulers.FusedStep._checked

    def counting(self, *args, **kwargs):
        checked.append(True)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(schedulers.FusedStep, "_checked", counting)
    takes_gen = kind != "DPMSolverMultistepScheduler"
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g) * a.init_noise_sigma
    xa = xb = x
    full = []
    for k, t in enumerate(a.timesteps):
        #  calls: 0-2 plain; 3 an option; 4-5 guided; 6 return_dict=False; 7-8 plain;
        #  9 set_timesteps again, then plain
        if k == 9:
            for s in (a, b):
                s.set_timesteps(12)
            t = a.timesteps[k]
        if hasattr(a, "is_scale_input_called"):
            a.is_scale_input_called = b.is_scale_input_called = True
        kw = dict(options)
        if k == 3 and options:
            kw = {n: v * 0.5 for n, v in options.items()}
        if k == 6:
            kw["return_dict"] = False
        u, c = torch.randn(2, 1, 4, 8, 8, generator=g)
        n = len(checked)
        ref = a.step(u + 2.0 * (c - u) if k in (4, 5) else c, t, xa,
                     **kw, **({"generator": ga} if takes_gen else {}))
        kwb = dict(kw, **({"generator": gb} if takes_gen else {}))
        out = (b.step.guided(torch.cat([u, c]), 2.0, t, xb, **kwb) if k in (4, 5)
               else b.step(c, t, xb, **kwb))
        _assert_same(ref, out, k)
        full.append(len(checked) > n)
        xa, xb = ref[0], out[0]
    changed = bool(options)
    assert full == [True, False, False, changed, True, False, True, True, False, True, False,
                    False]
