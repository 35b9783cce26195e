"""Sharded sample generation: ``[torchrun --nproc_per_node N -m] fastdiff generate``.

Sample j (0 <= j < num) has label ``labels[j % len(labels)]`` and its own noise generator seeded
from (seed, j), so a sample is the same whatever the number of ranks (bit for bit when the batch
it is drawn in is the same; batches never straddle shards). Shards of ``shard_size``
consecutive samples go round-robin to the ranks; each shard is written as
``shard-00042.npz`` (``samples`` float32 NCHW in [-1, 1], ``images`` uint8 NHWC, ``labels``,
``indices``, and ``sha256``: a checksum of the others), atomically (temp file, fsync, rename),
optionally with a PNG grid. A rerun verifies the shards already there and skips them (a corrupt
one is removed, with a warning naming it, and drawn again), so a killed run resumes. When every shard exists,
rank 0 verifies them all and writes ``manifest.json`` (settings, shards, sha256 of each file,
and a sha256 of the manifest itself); ``load`` checks all of it, naming the file at fault.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
import zipfile

import numpy as np
import torch

from fastdiff.checkpoint import atomic_write, atomic_write_json

RUN_FILE = "run.json"
MANIFEST = "manifest.json"
SETTINGS = ("num", "labels", "shard_size", "solver", "steps", "guidance", "seed", "model")
ARRAYS = ("samples", "images", "labels", "indices", "settings")   # what a shard's sha256 covers
log = logging.getLogger("fastdiff")


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


def _arrays_sha256(arrays: dict) -> str:
    h = hashlib.sha256()
    for name in ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def read_shard(path: str, lo: int | None = None, hi: int | None = None,
               settings: str | None = None) -> dict:
    """The arrays of shard ``path``, its checksum verified (and its sample range and settings,
    when given); a ValueError naming the file if anything is off."""
    try:
        with np.load(path) as z:
            arrays = {name: z[name] for name in (*ARRAYS, "sha256")}
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {path} not found") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"shard {path} is corrupt or not a shard: {err}") from None
    if str(arrays.pop("sha256")) != _arrays_sha256(arrays):
        raise ValueError(f"shard {path} is corrupt: its arrays do not match the sha256 "
                         "checksum it was written with")
    if lo is not None and not np.array_equal(arrays["indices"], np.arange(lo, hi)):
        raise ValueError(f"shard {path} holds samples other than {lo}..{hi - 1}")
    if settings is not None and str(arrays["settings"]) != settings:
        raise ValueError(f"shard {path} was drawn with other settings")
    return arrays


def check_args(num: int, labels: list, num_classes: int, shard_size: int, batch_size: int,
               solver: str, steps: int, guidance: float, seed: int,
               max_shards: int | None) -> None:
    """Every check of ``generate``'s arguments (before anything is written)."""
    from fastdiff.diffusion import GaussianDiffusion

    for name, v in (("num", num), ("shard_size", shard_size), ("batch_size", batch_size)):
        if v < 1:
            raise ValueError(f"'{name}' must be >= 1, got {v}")
    if max_shards is not None and max_shards < 1:
        raise ValueError(f"'max_shards' must be >= 1 (or None: no limit), got {max_shards}")
    if not labels or any(not 0 <= v < max(num_classes, 1) for v in labels):
        raise ValueError(f"'labels' must be in 0..{num_classes - 1}, got {labels}")
    GaussianDiffusion().step_table(solver, steps)      # solver and steps
    if not math.isfinite(guidance):
        raise ValueError(f"'guidance' must be finite, got {guidance}")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"'seed' must be in [0, 2**63), got {seed}")


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

    c = model.config
    labels = list(range(c.num_classes)) if labels is None else [int(v) for v in labels]
    check_args(num, labels, c.num_classes, shard_size, batch_size, solver, steps, guidance, seed,
               max_shards)
    settings = json.dumps({"num": num, "labels": labels, "shard_size": shard_size,
                           "solver": solver, "steps": steps, "guidance": guidance, "seed": seed,
                           "model": model_name}, sort_keys=True)
    os.makedirs(out_dir, exist_ok=True)
    run_file = os.path.join(out_dir, RUN_FILE)
    if rank == 0:
        if os.path.exists(run_file):
            try:
                with open(run_file) as f:
                    old = json.load(f)
            except ValueError as err:
                raise ValueError(f"{run_file} is corrupt: {err}") from None
            if json.dumps(old, sort_keys=True) != settings:
                raise ValueError(f"'out' {out_dir} holds a run with other settings ({old}); "
                                 "use another folder")
        else:
            atomic_write_json(json.loads(settings), run_file)
        for name in os.listdir(out_dir):               # temp files of a killed run
            if name.startswith(".tmp-") and "shard-" in name:
                os.unlink(os.path.join(out_dir, name))
    barrier()
    if rank != 0:
        with open(run_file) as f:
            if json.dumps(json.load(f), sort_keys=True) != settings:
                raise ValueError(f"'out' {out_dir} holds a run with other settings")

    n_shards = -(-num // shard_size)
    mine = [k for k in range(n_shards) if k % world_size == rank]
    diffusion = GaussianDiffusion()
    written = skipped = corrupt = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), desc=f"rank {rank}: shards", unit="shard")
    t0 = time.perf_counter()
    for k in mine:
        lo, hi = k * shard_size, min((k + 1) * shard_size, num)
        path = os.path.join(out_dir, shard_name(k))
        if os.path.exists(path):
            try:
                read_shard(path, lo, hi, settings)
            except ValueError as err:                  # garbage: removed, drawn again
                log.warning("%s; removed it, to be drawn again", err)
                os.unlink(path)
                corrupt += 1
                try:                                   # the run is no longer complete
                    os.unlink(os.path.join(out_dir, MANIFEST))
                except FileNotFoundError:
                    pass
        if os.path.exists(path):
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
            arrays = {"samples": x.numpy(), "images": images.numpy(),
                      "labels": np.array([labels[j % len(labels)] for j in range(lo, hi)]),
                      "indices": np.arange(lo, hi), "settings": np.array(settings)}
            buf = io.BytesIO()
            np.savez(buf, **arrays, sha256=np.array(_arrays_sha256(arrays)))
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
    summary = {"rank": rank, "written": written, "skipped": skipped, "corrupt": corrupt,
               "seconds": seconds, "missing": len(missing), "shards": n_shards}
    if rank == 0 and not missing:
        shards = []
        for k in range(n_shards):
            lo, hi = k * shard_size, min((k + 1) * shard_size, num)
            path = os.path.join(out_dir, shard_name(k))
            read_shard(path, lo, hi, settings)     # never a corrupt file's sha256 in a manifest
            shards.append({"file": shard_name(k), "indices": [lo, hi], "sha256": _sha256(path)})
        manifest = {**json.loads(settings), "world_size": world_size, "shards": shards}
        atomic_write_json({**manifest, "sha256": _json_sha256(manifest)},
                          os.path.join(out_dir, MANIFEST))
        summary["manifest"] = os.path.join(out_dir, MANIFEST)
    return summary


def _json_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def load(out_dir: str) -> dict:
    """All shards of a finished run, concatenated in sample order, after verifying the manifest
    (its own sha256, that its shards cover samples 0..num-1) and each shard against it (file
    sha256, the shard's own checksum, its samples and settings). Errors name the file."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the run in {out_dir} is not complete")
    try:
        with open(path) as f:
            manifest = json.load(f)
        want = manifest.pop("sha256", None)
    except (ValueError, AttributeError) as err:
        raise ValueError(f"manifest {path} is corrupt or not a manifest: {err}") from None
    if want is None:
        raise ValueError(f"manifest {path} has no sha256 (written before fastdiff checked "
                         "them?): rerun the same generate command to verify the shards and "
                         "rewrite it")
    if _json_sha256(manifest) != want:
        raise ValueError(f"manifest {path} is corrupt: its content does not match the sha256 "
                         "it was written with")
    try:
        num, size, shards = manifest["num"], manifest["shard_size"], manifest["shards"]
        settings = json.dumps({k: manifest[k] for k in SETTINGS}, sort_keys=True)
        ranges = [tuple(s["indices"]) for s in shards]
    except (KeyError, TypeError) as err:
        raise ValueError(f"manifest {path} is not a manifest of generate: {err!r}") from None
    if ranges != [(k * size, min((k + 1) * size, num)) for k in range(-(-num // size))]:
        raise ValueError(f"manifest {path}: its shards do not cover samples 0..{num - 1}")
    parts = {k: [] for k in ("samples", "images", "labels", "indices")}
    for s, (lo, hi) in zip(shards, ranges):
        file = os.path.join(out_dir, s["file"])
        if not os.path.exists(file):
            raise FileNotFoundError(f"shard {file} listed in {path} not found")
        if _sha256(file) != s["sha256"]:
            raise ValueError(f"shard {file} is corrupt: its sha256 differs from the one in {path}")
        arrays = read_shard(file, lo, hi, settings)
        for k, v in parts.items():
            v.append(arrays[k])
    return {k: np.concatenate(v) for k, v in parts.items()}
