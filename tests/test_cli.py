"""The ``fastdiff`` commands check every argument before any work.

Every bad invocation, run in-process: exit status 2, stderr ``fastdiff <command>: error: ...``,
no traceback, and nothing written (not in the output location, not in the working folder).
The work itself (sampling, training, generation, the demo) is replaced by a stub that fails the
test if it is ever reached, so the whole list runs in a few seconds.
"""
import os
import re
import shutil

import pytest
import safetensors.torch
import torch

import fastdiff.demo
import fastdiff.diffusion
import fastdiff.digits.generate
import fastdiff.digits.train
from fastdiff.__main__ import main
from fastdiff.digits import cli


@pytest.fixture(scope="module")
def nan_weights(tmp_path_factory):
    """The shipped weights with one NaN: a model that would only draw NaN."""
    folder = tmp_path_factory.mktemp("weights")
    state = safetensors.torch.load_file(cli.WEIGHTS)
    state["mid.1.proj.bias"] = torch.full_like(state["mid.1.proj.bias"], float("nan"))
    path = folder / "nan.safetensors"
    safetensors.torch.save_file(state, str(path))
    shutil.copy(os.path.splitext(cli.WEIGHTS)[0] + ".json", folder / "nan.json")
    return str(path)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with a file and a folder in it, as the working folder; no GPU; no real work."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "taken-progressive.png").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def started(*args, **kwargs):
        raise AssertionError("the command started its work despite a bad argument")

    for module, name in [(fastdiff.diffusion, "sample"), (fastdiff.digits.train, "train"),
                         (fastdiff.digits.generate, "generate"), (fastdiff.demo, "run_demo")]:
        monkeypatch.setattr(module, name, started)
    return tmp_path


def _tree(root):
    return sorted((os.path.relpath(os.path.join(d, n), root), os.path.getsize(os.path.join(d, n)))
                  for d, dirs, files in os.walk(root) for n in dirs + files)


GEN = ["generate", "--num-samples", "8", "--out", "g"]
# (argv, what the error says): every defect found by trying bad invocations, per command
BAD = [
    (["sample", "--num", "0"], "--num must be in 1..4096"),
    (["sample", "--num", "-3"], "--num must be in 1..4096"),
    (["sample", "--num", "1000000000000"], "--num must be in 1..4096"),   # was a traceback
    (["sample", "--num", "500"], "5000 samples, more than the 4096"),    # 10 labels x 500
    (["sample", "--label", "3", "--label", "4", "--num", "3000"], "6000 samples"),
    (["sample", "--num", "x"], "argument --num: invalid int value"),
    (["sample", "--label", "12"], "--label must be in 0..9, got \\[12\\]"),
    (["sample", "--label", "-1"], "--label must be in 0..9"),
    (["sample", "--steps", "0"], "--steps must be in 1..1000"),
    (["sample", "--steps", "1001"], "--steps must be in 1..1000"),
    (["sample", "--steps", "-1"], "--steps must be in 1..1000"),
    (["sample", "--seed", "-1"], "--seed must be in 0..2\\*\\*63-1"),
    (["sample", "--seed", str(2 ** 64)], "--seed must be in 0..2\\*\\*63-1"),
    (["sample", "--guidance", "nan"], "--guidance must be a finite number"),
    (["sample", "--guidance", "inf"], "--guidance must be a finite number"),
    (["sample", "--guidance", "-1"], "--guidance must be a finite number >= 0"),
    (["sample", "--solver", "foo"], "argument --solver: invalid choice"),
    (["sample", "--out", "adir"], "--out adir is a folder"),             # failed after sampling
    (["sample", "--out", "afile/x.png"], "afile is a file, not a folder"),   # was a traceback
    (["sample", "--out", "digits"], "--out digits has no extension"),    # failed after sampling
    (["sample", "--out", "x.unknown"], "extension '.unknown'"),
    (["sample", "--out", "x.xbm"], "extension '.xbm'"),      # pillow cannot write grey as XBM
    (["sample", "--out", "taken.png", "--progressive"], "--out taken-progressive.png is a folder"),
    (["sample", "--weights", "nope.safetensors"], "nope.json not found"),
    (["sample", "--bogus"], "unrecognized arguments: --bogus"),
    (["eval", "--num-per-class", "0"], "--num-per-class must be in 1..409"),
    (["eval", "--num-per-class", "100000"], "--num-per-class must be in 1..409"),
    (["eval", "--steps", "0"], "--steps must be in 1..1000"),
    (["eval", "--seed", "-5"], "--seed must be in"),
    (["eval", "--guidance", "nan"], "--guidance must be a finite number"),
    (["train", "--steps", "0"], "--steps must be >= 1, got 0"),         # ran the default 10,000
    (["train", "--steps", "-1"], "--steps must be >= 1, got -1"),       # wrote an untrained model
    (["train", "--batch-size", "0"], "--batch-size must be in 1..1347"),   # used 64
    (["train", "--batch-size", "-8"], "--batch-size must be in 1..1347"),
    (["train", "--batch-size", "100000000"], "--batch-size must be in 1..1347"),
    (["train", "--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    (["train", "--out", "afile"], "--out afile is a file, not a folder"),    # was a traceback
    (["train", "--out", "afile/run"], "afile is a file, not a folder"),      # was a traceback
    (["train", "--device", "cuda"], "--device cuda: no CUDA GPU"),           # was a traceback
    (["train", "--device", "tpu"], "argument --device: invalid choice"),
    ([*GEN[:3]], "the following arguments are required: --out"),
    (["generate", "--num-samples", "0", "--out", "g"], "--num-samples must be in 1..100000000"),
    (["generate", "--num-samples", str(10 ** 12), "--out", "g"], "--num-samples must be in"),
    ([*GEN, "--max-shards", "-1"], "--max-shards must be >= 1"),        # wrote nothing, exit 0
    ([*GEN, "--max-shards", "0"], "--max-shards must be >= 1"),
    ([*GEN, "--steps", "0"], "--steps must be in 1..1000"),             # wrote run.json first
    ([*GEN, "--shard-size", "0"], "--shard-size must be in 1..100000"),
    ([*GEN, "--shard-size", "1000000"], "--shard-size must be in 1..100000"),
    ([*GEN, "--batch-size", "0"], "--batch-size must be in 1..4096"),
    ([*GEN, "--batch-size", "1000000000"], "--batch-size must be in 1..4096"),
    (["generate", "--num-samples", "10000000", "--shard-size", "1", "--out", "g"],
     "10000000 shards, more than 1000000"),
    ([*GEN, "--label", "10"], "--label must be in 0..9"),
    ([*GEN, "--seed", "-1"], "--seed must be in"),
    ([*GEN, "--guidance", "nan"], "--guidance must be a finite number"),
    ([*GEN, "--device", "cuda"], "--device cuda: no CUDA GPU"),              # was a traceback
    (["generate", "--num-samples", "8", "--out", "afile"], "--out afile is a file"),
    (["generate", "--num-samples", "8", "--out", "afile/g"], "afile is a file, not a folder"),
    (["demo", "--repeats", "0"], "--repeats must be in 1..10000"),           # was a traceback
    (["demo", "--repeats", "-2"], "--repeats must be in 1..10000"),
    (["demo", "--repeats", "1000000000"], "--repeats must be in 1..10000"),
    (["demo", "--device", "foo"], "argument --device: invalid choice"),      # was a traceback
    (["demo", "--device", "cuda"], "--device cuda: no CUDA GPU"),
    (["info", "--verbose"], "unrecognized arguments: --verbose"),
    (["info", "extra"], "unrecognized arguments: extra"),
]


@pytest.mark.parametrize("argv,msg", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_invocation_exits_2_names_the_error_and_writes_nothing(work, capsys, argv, msg):
    before = _tree(work)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith(f"fastdiff {argv[0]}: error: "), err
    assert "Traceback" not in err
    assert re.search(msg, err), err
    assert _tree(work) == before


def test_sampling_refuses_non_finite_weights(work, capsys, nan_weights):
    """Was: an all-NaN PNG, exit 0."""
    before = _tree(work)
    for argv in (["sample", "--out", "x.png"], ["eval"], [*GEN]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--weights", nan_weights])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"fastdiff {argv[0]}: error: ")
        assert f"weights {nan_weights} hold non-finite values (in mid.1.proj.bias)" in err
    assert _tree(work) == before


def test_sample_makes_the_folders_of_out(tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "threes.jpg"
    assert main(["sample", "--label", "3", "--num", "2", "--steps", "2", "--out", str(out)]) == 0
    from PIL import Image
    assert Image.open(out).format == "JPEG"
    assert os.listdir(out.parent) == ["threes.jpg"]            # no temp file left


def test_train_checkpoint_every_reaches_the_training(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(fastdiff.digits.train, "train",
                        lambda out, cfg, **kw: seen.update(out=out, cfg=cfg))
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "7", "--batch-size", "16",
                 "--checkpoint-every", "3"]) == 0
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.batch_size, cfg.ckpt_every) == (7, 16, 3)
    assert fastdiff.digits.train.TrainConfig().ckpt_every == 100   # was 500: a kill lost 499


def test_diverged_training_exits_1_with_the_error(tmp_path, monkeypatch, capsys):
    real = fastdiff.diffusion.GaussianDiffusion.loss
    calls = []

    def loss(self, *args, **kwargs):
        calls.append(None)
        out = real(self, *args, **kwargs)
        return out * float("nan") if len(calls) == 3 else out

    monkeypatch.setattr(fastdiff.diffusion.GaussianDiffusion, "loss", loss)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--out", str(out), "--steps", "4", "--batch-size", "4",
              "--checkpoint-every", "2"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert "fastdiff train: error: training diverged: non-finite loss (nan) at step 3" in err
    assert "keeps the last good checkpoint (step 2)" in err
    assert not (out / "model.safetensors").exists()
