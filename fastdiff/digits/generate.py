"""Sharded sample generation: ``[torchrun --nproc_per_node N -m] fastdiff generate``.

Sample j (0 <= j < num) has label ``labels[j % len(labels)]`` and its own noise generator seeded
from (seed, j), so a sample is the same whatever the number of ranks (bit for bit when the batch
it is drawn in is the same; batches never straddle shards). Shards of ``shard_size``
consecutive samples go round-robin to the ranks; each shard is written as
``shard-00042.npz`` (``samples`` float32 NCHW in [-1, 1], ``images`` uint8 NHWC, ``labels``,
``indices``), atomically (temp file, fsync, rename), optionally with a PNG grid. A rerun skips
the shards already there, so a killed run resumes. When every shard exists, rank 0 writes
``manifest.json`` (settings, shards, sha256 of each file).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time

import numpy as np
import torch

from fastdiff.checkpoint import atomic_write, atomic_write_json

RUN_FILE = "run.json"
MANIFEST = "manifest.json"


def sample_seed(seed: int, index: int) -> int:
    """The noise seed of sample ``index`` of a run seeded ``seed`` (64 bits, well mixed)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npz"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _valid(path: str, lo: int, hi: int, settings: str) -> bool:
    try:
        with np.load(path) as z:
            return (str(z["settings"]) == settings
                    and np.array_equal(z["indices"], np.arange(lo, hi)))
    except Exception:                              # unreadable: computed again
        return False


def generate(model, out_dir: str, num: int, *, labels=None, shard_size: int = 256,
             batch_size: int = 256, solver: str = "ddim", steps: int = 50,
             guidance: float = 1.5, seed: int = 0, png: bool = False,
             max_shards: int | None = None, rank: int = 0, world_size: int = 1,
             barrier=lambda: None, progress: bool = True, model_name: str = "") -> dict:
    """Draws this rank's shards into ``out_dir``; returns a summary.

    labels: the label cycle (default: every class in turn). max_shards: stop this rank after
    writing that many shards (time-boxed jobs; a rerun continues). barrier: the process group's
    barrier (between the run-file check and the work, and before the manifest).
    """
    from fastdiff.diffusion import GaussianDiffusion, sample
    from fastdiff.digits.image import save_grid

    if num < 1:
        raise ValueError(f"'num' must be >= 1, got {num}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"'shard_size' and 'batch_size' must be >= 1, got {shard_size}, "
                         f"{batch_size}")
    c = model.config
    labels = list(range(c.num_classes)) if labels is None else [int(v) for v in labels]
    if not labels or any(not 0 <= v < max(c.num_classes, 1) for v in labels):
        raise ValueError(f"'labels' must be in 0..{c.num_classes - 1}, got {labels}")
    settings = json.dumps({"num": num, "labels": labels, "shard_size": shard_size,
                           "solver": solver, "steps": steps, "guidance": guidance, "seed": seed,
                           "model": model_name}, sort_keys=True)
    os.makedirs(out_dir, exist_ok=True)
    run_file = os.path.join(out_dir, RUN_FILE)
    if rank == 0:
        for name in os.listdir(out_dir):               # temp files of a killed run
            if name.startswith(".tmp-") and "shard-" in name:
                os.unlink(os.path.join(out_dir, name))
        if os.path.exists(run_file):
            with open(run_file) as f:
                old = json.load(f)
            if json.dumps(old, sort_keys=True) != settings:
                raise ValueError(f"'out' {out_dir} holds a run with other settings ({old}); "
                                 "use another folder")
        else:
            atomic_write_json(json.loads(settings), run_file)
    barrier()
    if rank != 0:
        with open(run_file) as f:
            if json.dumps(json.load(f), sort_keys=True) != settings:
                raise ValueError(f"'out' {out_dir} holds a run with other settings")

    n_shards = -(-num // shard_size)
    mine = [k for k in range(n_shards) if k % world_size == rank]
    diffusion = GaussianDiffusion()
    written = skipped = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), desc=f"rank {rank}: shards", unit="shard")
    t0 = time.perf_counter()
    for k in mine:
        lo, hi = k * shard_size, min((k + 1) * shard_size, num)
        path = os.path.join(out_dir, shard_name(k))
        if os.path.exists(path) and _valid(path, lo, hi, settings):
            skipped += 1
        else:
            if max_shards is not None and written >= max_shards:
                break
            xs = []
            for b in range(lo, hi, batch_size):
                idx = range(b, min(b + batch_size, hi))
                lab = torch.tensor([labels[j % len(labels)] for j in idx])
                x, _ = sample(model, diffusion, lab, solver=solver, num_steps=steps,
                              guidance_scale=guidance, sample_seeds=[sample_seed(seed, j)
                                                                     for j in idx])
                xs.append(x.float().cpu())
            x = torch.cat(xs)
            images = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            buf = io.BytesIO()
            np.savez(buf, samples=x.numpy(), images=images.numpy(),
                     labels=np.array([labels[j % len(labels)] for j in range(lo, hi)]),
                     indices=np.arange(lo, hi), settings=np.array(settings))
            atomic_write(path, lambda f: f.write(buf.getvalue()))
            if png:
                save_grid(x, os.path.splitext(path)[0] + ".png", min(16, hi - lo))
            written += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    barrier()
    missing = [k for k in range(n_shards) if not os.path.exists(os.path.join(out_dir,
                                                                              shard_name(k)))]
    summary = {"rank": rank, "written": written, "skipped": skipped, "seconds": seconds,
               "missing": len(missing), "shards": n_shards}
    if rank == 0 and not missing:
        shards = [{"file": shard_name(k), "indices": [k * shard_size,
                                                      min((k + 1) * shard_size, num)],
                   "sha256": _sha256(os.path.join(out_dir, shard_name(k)))}
                  for k in range(n_shards)]
        atomic_write_json({**json.loads(settings), "world_size": world_size, "shards": shards},
                          os.path.join(out_dir, MANIFEST))
        summary["manifest"] = os.path.join(out_dir, MANIFEST)
    return summary


def load(out_dir: str) -> dict:
    """All shards of a finished run, concatenated in sample order (reads the manifest)."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the run in {out_dir} is not complete")
    with open(path) as f:
        manifest = json.load(f)
    parts = {k: [] for k in ("samples", "images", "labels", "indices")}
    for s in manifest["shards"]:
        with np.load(os.path.join(out_dir, s["file"])) as z:
            for k in parts:
                parts[k].append(z[k])
    return {k: np.concatenate(v) for k, v in parts.items()}
