"""Training: an interrupted run resumes to exactly the weights of an uninterrupted one."""
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from fastdiff.checkpoint import load_safetensors_metadata
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
