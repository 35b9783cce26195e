"""The shipped digits model: quality, the sample command, and the eval toolkit."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.digits import cli
from fastdiff.digits import data as digits
from fastdiff.diffusion import GaussianDiffusion, sample

PER_CLASS = 20   # 200 samples: the whole check stays well under a minute on 2 cores


@pytest.fixture(scope="module")
def classifier():
    return digits.train_classifier()


def test_shipped_model_quality(classifier):
    """DDIM 50 steps at the default guidance: >= 95% conditional accuracy; FD reported."""
    model = cli.load_model()
    labels = torch.arange(10).repeat_interleave(PER_CLASS)
    x, _ = sample(model, GaussianDiffusion(), labels, solver="ddim", num_steps=50,
                  guidance_scale=cli.DEFAULT_GUIDANCE, seed=0)
    m = digits.evaluate(x, labels, classifier)
    print(json.dumps(m, indent=1))
    assert m["classifier_test_accuracy"] >= 0.95
    assert m["accuracy"] >= 0.95, m
    assert np.isfinite(m["fd_samples_vs_train"]) and m["fd_test_vs_train"] > 0


def test_frechet_distance_properties():
    g = np.random.default_rng(0)
    a = g.normal(size=(500, 4))
    assert digits.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert digits.frechet_distance(a, a + 1.0) == pytest.approx(4.0, rel=1e-3)


def test_sample_command_writes_a_grid(tmp_path):
    out = tmp_path / "threes.png"
    proc = subprocess.run([sys.executable, "-m", "fastdiff", "sample", "--label", "3", "--num",
                           "4", "--steps", "10", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    img = Image.open(out)
    assert img.size[0] > 32 and img.size[1] > 32


def test_eval_command_reports_accuracy_and_fd():
    proc = subprocess.run([sys.executable, "-m", "fastdiff", "eval", "--num-per-class", "3",
                           "--steps", "10"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert {"accuracy", "fd_samples_vs_train", "fd_test_vs_train"} <= set(m)


def test_sample_command_rejects_unknown_labels(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastdiff", "sample", "--label", "12", "--out",
                           str(tmp_path / "x.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--label must be in 0..9" in proc.stderr


@pytest.mark.parametrize("argv,msg", [
    (["--num", "0"], "--num must be in 1..4096 \\(samples drawn at once\\), got 0"),
    (["--steps", "0"], "--steps must be in 1..1000 \\(the model's diffusion timesteps\\), got 0"),
    (["--weights", "/nonexistent/w.safetensors"], "not found"),
])
def test_sample_command_reports_bad_options(tmp_path, argv, msg):
    proc = subprocess.run([sys.executable, "-m", "fastdiff", "sample", "--out",
                           str(tmp_path / "x.png"), *argv], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert re.search(msg, proc.stderr), proc.stderr


def test_data_split():
    x_tr, y_tr = digits.load("train")
    x_te, y_te = digits.load("test")
    assert len(y_tr) + len(y_te) == 1797 and x_tr.shape[1:] == (1, 8, 8)
    assert x_tr.min() >= -1 and x_tr.max() <= 1
    with pytest.raises(ValueError, match="'split' must be"):
        digits.load("val")
