"""Training: an interrupted run resumes to exactly the weights of an uninterrupted one."""
import os
import re
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from fastdiff.checkpoint import load_safetensors, load_safetensors_metadata
from fastdiff.diffusion import EMA, GaussianDiffusion
from fastdiff.digits.train import CHECKPOINT, TrainConfig, train
from fastdiff.unet import UNet, UNetConfig

TINY = TrainConfig(steps=6, ckpt_every=2, batch_size=8, model=UNetConfig(
    image_size=8, base_channels=16, channel_mult=(1, 2), attn_resolutions=(4,), head_dim=8,
    groups=4, num_classes=10, dropout=0.1))


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_after_interruption_is_bit_identical(tmp_path):
    straight = train(str(tmp_path / "a"), TINY, progress=False)
    train(str(tmp_path / "b"), TINY, progress=False, stop_after=4)   # "killed" after step 4
    resumed = train(str(tmp_path / "b"), TINY, progress=False)
    assert _equal(straight, resumed)
    assert _equal(straight, UNet.load(str(tmp_path / "b" / "model.safetensors")))


def test_killed_process_leaves_a_whole_checkpoint(tmp_path):
    """A real SIGKILL mid-run: the checkpoint on disk loads, and training continues from it."""
    out = tmp_path / "k"
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "from dataclasses import replace\n"
            "from test_train import TINY\n"
            "from fastdiff.digits.train import train\n"
            f"train({str(out)!r}, replace(TINY, steps=10**6), progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    ckpt = out / CHECKPOINT
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and _step(ckpt) >= 4:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    step = _step(ckpt)
    assert step >= 4
    model = train(str(out), replace(TINY, steps=10**6), progress=False, stop_after=step + 2)
    assert _step(ckpt) == step + 2 and isinstance(model, UNet)


def _step(path):
    return int(load_safetensors_metadata(str(path))["step"])


def test_checkpoint_from_another_config_is_refused(tmp_path):
    train(str(tmp_path), TINY, progress=False, stop_after=2)
    other = TrainConfig(steps=6, ckpt_every=2, batch_size=4, model=TINY.model)
    with pytest.raises(ValueError, match="another training config"):
        train(str(tmp_path), other, progress=False)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF                      # the end of the last tensor's payload
    path.write_bytes(bytes(data))


def test_flipped_payload_bytes_are_refused_naming_the_file(tmp_path):
    """Was: a checkpoint (or model) with a flipped byte loaded, and training went on from it."""
    train(str(tmp_path), replace(TINY, steps=2), progress=False)
    ckpt, weights = tmp_path / CHECKPOINT, tmp_path / "model.safetensors"
    _flip_last_byte(ckpt)
    with pytest.raises(ValueError, match=f"checkpoint {re.escape(str(ckpt))} is corrupt: its "
                       "payload does not match the sha256"):
        train(str(tmp_path), TINY, progress=False)
    _flip_last_byte(weights)
    with pytest.raises(ValueError, match=f"{re.escape(str(weights))} is corrupt"):
        UNet.load(str(weights))


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Was: a NaN loss trained on and saved an all-NaN model."""
    real, calls = GaussianDiffusion.loss, []

    def loss(self, *args, **kwargs):
        calls.append(None)
        return real(self, *args, **kwargs) * (float("nan") if len(calls) == 5 else 1.0)

    monkeypatch.setattr(GaussianDiffusion, "loss", loss)
    with pytest.raises(FloatingPointError, match="non-finite loss \\(nan\\) at step 5; .* keeps "
                       "the last good checkpoint \\(step 4\\)"):
        train(str(tmp_path), TINY, progress=False)
    assert _step(tmp_path / CHECKPOINT) == 4 and not (tmp_path / "model.safetensors").exists()
    state = load_safetensors(str(tmp_path / CHECKPOINT))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """Finite loss, weights turned NaN by the update (as an overflowing gradient does)."""
    real, calls = EMA.update, []

    def update(self, model):
        calls.append(None)
        if len(calls) == 4:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        real(self, model)

    monkeypatch.setattr(EMA, "update", update)
    with pytest.raises(FloatingPointError, match="non-finite weights at step 4; .* keeps the "
                       "last good checkpoint"):
        train(str(tmp_path), TINY, progress=False)
    assert _step(tmp_path / CHECKPOINT) == 2


def test_stale_temp_files_of_killed_checkpoint_writes_are_removed(tmp_path):
    """Was: a kill during a checkpoint write left a checkpoint-sized .tmp file forever."""
    stale = [".tmp-k3j2checkpoint.safetensors", ".tmp-9xq1model.safetensors", ".tmp-aa0model.json"]
    for name in stale:
        (tmp_path / name).write_bytes(b"\0" * 1000)
    (tmp_path / ".tmp-notes.txt").write_text("not ours")
    train(str(tmp_path), replace(TINY, steps=1), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-notes.txt", CHECKPOINT, "model.json", "model.safetensors"]


def test_bad_config_writes_nothing(tmp_path):
    for cfg, msg in [(replace(TINY, batch_size=0), "'batch_size' must be >= 1"),
                     (replace(TINY, batch_size=4000), "'batch_size' \\(4000\\) exceeds the data"),
                     (replace(TINY, ckpt_every=0), "'ckpt_every' must be >= 1"),
                     (replace(TINY, steps=-1), "'steps' must be >= 0")]:
        with pytest.raises(ValueError, match=msg):
            train(str(tmp_path / "run"), cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_training_runs_the_fused_ops_and_the_loss_falls(tmp_path, monkeypatch):
    """`fastdiff train` runs group_norm_silu and attention (with their backward) in every step,
    its losses equal those of the same run on plain torch ops, and they fall."""
    from fastdiff import ops, unet

    counts = {"group_norm_silu": 0, "attention": 0}
    for name in counts:
        def counted(*a, _fn=getattr(ops, name), _name=name, **k):
            counts[_name] += torch.is_grad_enabled()
            return _fn(*a, **k)
        monkeypatch.setattr(ops, name, counted)
    real, losses = GaussianDiffusion.loss, []

    def loss(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        losses.append(out.item())
        return out
    monkeypatch.setattr(GaussianDiffusion, "loss", loss)
    cfg = replace(TINY, steps=24, ckpt_every=24, lr=3e-3)
    train(str(tmp_path / "fused"), cfg, progress=False)
    assert counts["group_norm_silu"] >= 24 * 5 and counts["attention"] >= 24
    fused = losses[:]
    losses.clear()
    real_init = unet.UNet.__init__
    monkeypatch.setattr(unet.UNet, "__init__",
                        lambda self, config, fused=True: real_init(self, config, fused=False))
    train(str(tmp_path / "plain"), cfg, progress=False)
    torch.testing.assert_close(torch.tensor(fused[:8]), torch.tensor(losses[:8]), rtol=1e-3,
                               atol=1e-5)
    assert sum(fused[-8:]) < 0.8 * sum(fused[:8])
