"""torchrun on CPU (gloo, loopback): sharded generation and DistributedDataParallel training.

Each test starts its workers with ``python -m torch.distributed.run`` (torchrun), bounded in
time, rendezvous on 127.0.0.1 and gloo on the loopback interface.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from fastdiff.digits import generate as gen_mod
from fastdiff.digits.cli import load_model
from fastdiff.digits.train import CHECKPOINT, TrainConfig, train
from fastdiff.unet import UNetConfig

TIMEOUT = 240
GEN = ["--steps", "10", "--shard-size", "8", "--batch-size", "4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, args, popen=False, cwd=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *args]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _generate(nproc, out, num, extra=()):
    return _torchrun(nproc, ["-m", "fastdiff", "generate", "--num-samples", str(num),
                             "--out", str(out), *GEN, *extra])


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen1")
    _generate(1, out, 36)
    return gen_mod.load(str(out))


def test_sharded_generation_equals_single_process(tmp_path, one_rank):
    _generate(2, tmp_path, 36, ["--png"])
    two = gen_mod.load(str(tmp_path))
    for k in ("samples", "images", "labels", "indices"):
        assert np.array_equal(two[k], one_rank[k]), k        # bit for bit
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and len(manifest["shards"]) == 5
    assert (tmp_path / "shard-00004.png").exists()
    assert list(one_rank["labels"][:12]) == list(range(10)) + [0, 1]


def test_other_batch_size_agrees_within_tolerance(tmp_path, one_rank):
    """In-process, 2 threads, batches of 3 instead of 4: the same samples up to rounding."""
    model = load_model()
    gen_mod.generate(model, str(tmp_path), 36, shard_size=8, batch_size=3, steps=10,
                     guidance=1.5, progress=False, model_name="digits.safetensors")
    other = gen_mod.load(str(tmp_path))
    assert np.array_equal(other["labels"], one_rank["labels"])
    assert np.abs(other["samples"] - one_rank["samples"]).max() < 1e-4


def test_killed_run_resumes_to_the_same_result(tmp_path, one_rank):
    proc = _torchrun(2, ["-m", "fastdiff", "generate", "--num-samples", "36", "--out",
                         str(tmp_path), *GEN[:2], "--shard-size", "8", "--batch-size", "1"],
                     popen=True)
    deadline = time.time() + TIMEOUT
    try:
        while not list(tmp_path.glob("shard-*.npz")):
            assert proc.poll() is None, "the run ended before writing a shard"
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    done = sorted(p.name for p in tmp_path.glob("shard-*.npz"))
    assert 0 < len(done) < 5 and not (tmp_path / "manifest.json").exists()
    r = _torchrun(2, ["-m", "fastdiff", "generate", "--num-samples", "36", "--out",
                      str(tmp_path), *GEN])
    assert "skipped" in r.stderr
    resumed = gen_mod.load(str(tmp_path))
    assert not list(tmp_path.glob(".tmp-*"))
    # batch size 1 before the kill, 4 after: equal up to rounding
    assert np.abs(resumed["samples"] - one_rank["samples"]).max() < 1e-4
    assert np.array_equal(resumed["indices"], np.arange(36))


def test_generation_refuses_a_folder_with_other_settings(tmp_path):
    _generate(1, tmp_path, 8)
    with pytest.raises(ValueError, match="'out' .* holds a run with other settings"):
        gen_mod.generate(load_model(), str(tmp_path), 8, shard_size=8, batch_size=4, steps=11,
                         progress=False, model_name="digits.safetensors")


def test_generation_bad_input(tmp_path):
    model = load_model()
    with pytest.raises(ValueError, match="'num' must be >= 1"):
        gen_mod.generate(model, str(tmp_path), 0)
    with pytest.raises(ValueError, match="'labels' must be in 0..9"):
        gen_mod.generate(model, str(tmp_path), 4, labels=[12])


@pytest.fixture
def small_run(tmp_path):
    """8 samples in 2 shards, 2 steps each: a finished run in about a second."""
    model = load_model()
    args = {"shard_size": 4, "batch_size": 4, "steps": 2, "progress": False, "model_name": "m"}
    gen_mod.generate(model, str(tmp_path), 8, **args)
    return tmp_path, lambda **kw: gen_mod.generate(model, str(tmp_path), 8, **args, **kw)


def _flip_sample_byte(path, samples):
    data = bytearray(path.read_bytes())
    data[data.find(samples.tobytes()[:16]) + 5] ^= 0xFF      # inside the 'samples' array
    path.write_bytes(bytes(data))


def test_rerun_draws_a_corrupt_shard_again(small_run, caplog):
    """Was: a shard with flipped bytes was skipped on rerun, its sha256 put in the manifest."""
    out, rerun = small_run
    ref = gen_mod.load(str(out))
    shard = out / "shard-00001.npz"
    _flip_sample_byte(shard, ref["samples"][4:])
    summary = rerun()
    again = gen_mod.load(str(out))
    assert all(np.array_equal(again[k], ref[k]) for k in ref)
    assert summary["corrupt"] == 1 and summary["skipped"] == 1 and summary["written"] == 1
    assert f"shard {shard} is corrupt" in caplog.text
    # both corrupt, one shard allowed: the other is removed and left to the next rerun
    for k, path in enumerate(sorted(out.glob("shard-*.npz"))):
        _flip_sample_byte(path, ref["samples"][4 * k:])
    summary = rerun(max_shards=1)
    assert (summary["corrupt"], summary["written"], summary["missing"]) == (2, 1, 1)
    assert not (out / "shard-00001.npz").exists() and not (out / "manifest.json").exists()
    rerun()
    again = gen_mod.load(str(out))
    assert all(np.array_equal(again[k], ref[k]) for k in ref)


def test_load_verifies_the_manifest_and_every_shard(small_run):
    """Was: load read the shards without looking at the manifest's sha256s; errors named no file."""
    out, _ = small_run
    manifest, shard = out / "manifest.json", out / "shard-00001.npz"
    ref = gen_mod.load(str(out))
    text, good = manifest.read_text(), shard.read_bytes()

    _flip_sample_byte(shard, ref["samples"][4:])
    with pytest.raises(ValueError, match=f"shard {shard} is corrupt: its sha256 differs from the "
                       f"one in {manifest}"):
        gen_mod.load(str(out))
    shard.write_bytes((out / "shard-00000.npz").read_bytes())    # a whole shard, the wrong one
    with pytest.raises(ValueError, match=f"shard {shard} is corrupt"):
        gen_mod.load(str(out))
    shard.write_bytes(good)
    manifest.write_text(text.replace('"steps": 2', '"steps": 3'))
    with pytest.raises(ValueError, match=f"manifest {manifest} is corrupt: its content"):
        gen_mod.load(str(out))
    m = json.loads(text)
    m["shards"][1]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"manifest {manifest} is corrupt"):
        gen_mod.load(str(out))
    manifest.write_text(text)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard} listed in {manifest} not found"):
        gen_mod.load(str(out))


def test_invalid_generation_writes_nothing(tmp_path):
    """Was: steps=0 wrote run.json before failing, and the folder refused the corrected rerun;
    max_shards=-1 wrote nothing and reported success."""
    model, out = load_model(), tmp_path / "g"
    for kwargs, msg in [({"steps": 0}, "'num_steps' must be in \\[1, 1000\\], got 0"),
                        ({"max_shards": -1}, "'max_shards' must be >= 1"),
                        ({"guidance": float("nan")}, "'guidance' must be finite"),
                        ({"seed": -1}, "'seed' must be in"),
                        ({"solver": "foo"}, "'solver' must be one of")]:
        with pytest.raises(ValueError, match=msg):
            gen_mod.generate(model, str(out), 4, shard_size=4, progress=False, **kwargs)
    assert not out.exists()
    gen_mod.generate(model, str(out), 4, shard_size=4, steps=1, progress=False)
    assert gen_mod.load(str(out))["samples"].shape == (4, 1, 8, 8)


TINY = TrainConfig(steps=3, ckpt_every=1, batch_size=8, model=UNetConfig(
    image_size=8, base_channels=16, channel_mult=(1, 2), attn_resolutions=(4,), head_dim=8,
    groups=4, num_classes=10, dropout=0.0))

TRAIN_SCRIPT = """
import sys
from dataclasses import replace
sys.path.insert(0, {tests!r})
from test_distributed import TINY
from fastdiff.digits import distributed
from fastdiff.digits.train import train
ctx = distributed.init("cpu")
train({out!r}, replace(TINY, steps={steps}), progress=False, ctx=ctx)
ctx.close()
"""


def _ddp_train(tmp_path, out, steps):
    script = tmp_path / f"train_{steps}.py"
    script.write_text(TRAIN_SCRIPT.format(tests=os.path.dirname(__file__), out=str(out),
                                          steps=steps))
    _torchrun(2, [str(script)])


def _weights(path):
    from fastdiff.checkpoint import load_safetensors
    return {k: v for k, v in load_safetensors(str(path)).items() if k.startswith("model.")}


def _close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, f"max weight difference {worst:.3g}"


def test_ddp_step_matches_single_process_on_the_same_global_batch(tmp_path):
    _ddp_train(tmp_path, tmp_path / "ddp", 1)
    train(str(tmp_path / "one"), replace(TINY, steps=1), progress=False)
    start = train(str(tmp_path / "zero"), replace(TINY, steps=0), progress=False)
    ddp, one = _weights(tmp_path / "ddp" / CHECKPOINT), _weights(tmp_path / "one" / CHECKPOINT)
    _close(ddp, one, atol=1e-5)
    moved = max((one[f"model.{k}"] - v).abs().max().item() for k, v in start.state_dict().items())
    assert moved > 1e-4                                    # the step did change the weights


def test_ddp_checkpoint_resumes_on_another_world_size(tmp_path):
    _ddp_train(tmp_path, tmp_path / "run", 2)              # 2 ranks, 2 steps
    train(str(tmp_path / "run"), TINY, progress=False)     # 1 process, steps 3
    train(str(tmp_path / "ref"), TINY, progress=False)     # 1 process, all 3 steps
    _close(_weights(tmp_path / "run" / CHECKPOINT), _weights(tmp_path / "ref" / CHECKPOINT),
           atol=1e-4)


def test_train_batch_must_divide_across_ranks(tmp_path):
    from fastdiff.digits.distributed import Context
    with pytest.raises(ValueError, match="'batch_size' \\(8\\) must be divisible"):
        train(str(tmp_path), TINY, progress=False, ctx=Context(world_size=3))
