"""Subcommands of ``fastdiff`` around the shipped digits model: sample, eval, train, generate.

``run`` checks every argument before any work (``_check_<command>``: output paths, counts and
their bounds, seeds, the device, the weights file and its values), so a bad invocation ends
with ``fastdiff <command>: error: ...`` and writes nothing.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from fastdiff import argcheck
from fastdiff.argcheck import UsageError

WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "digits.safetensors")
DEFAULT_GUIDANCE = 1.5
DEFAULT_STEPS = 50
NUM_TRAIN_TIMESTEPS = 1000        # GaussianDiffusion's T: the most sampling steps
# Bounds on counts, from memory. Sampling draws a whole model batch at once; the shipped model
# needs ~180 kB per sample at batch 4096 on CPU (guidance doubles the batch): ~0.75 GB.
MAX_BATCH = 4096
MAX_SHARD = 100_000               # a shard is held in memory while drawn: ~340 bytes a sample
MAX_SAMPLES = 10 ** 8             # one generate run: ~34 GB of shards
MAX_SHARDS = 10 ** 6              # shards of one run (each rank lists its own)


def add_subcommands(sub) -> None:
    s = sub.add_parser("sample", help="sample digits from the shipped model into a PNG grid")
    s.add_argument("--label", type=int, action="append",
                   help="digit 0-9 to draw (repeatable); default: one row per digit 0-9")
    s.add_argument("--num", type=int, default=None,
                   help="samples per label (default 16 with --label, else 8 per row; "
                   f"labels x num <= {MAX_BATCH})")
    s.add_argument("--out", default="digits.png",
                   help="image file to write, format from its extension (default digits.png)")
    _sampling_args(s)
    s.add_argument("--progressive", action="store_true",
                   help="also write <out>-progressive.png: predicted x0 along the chain")
    e = sub.add_parser("eval", help="conditional accuracy and FD of samples vs real digits")
    e.add_argument("--num-per-class", type=int, default=30,
                   help=f"samples per digit (1..{MAX_BATCH // 10})")
    _sampling_args(e)
    g = sub.add_parser("generate", help="draw many samples into shards (torchrun: sharded "
                       "across ranks; reruns resume)")
    # not --num: torchrun's own parser takes it for an abbreviation of --numa-binding
    g.add_argument("--num-samples", type=int, required=True,
                   help=f"number of samples (1..{MAX_SAMPLES})")
    g.add_argument("--out", required=True, help="output folder (shards, manifest.json)")
    g.add_argument("--label", type=int, action="append",
                   help="digit to draw (repeatable; samples cycle through them); default: 0-9")
    g.add_argument("--shard-size", type=int, default=256,
                   help=f"samples per shard file (1..{MAX_SHARD})")
    g.add_argument("--batch-size", type=int, default=256,
                   help=f"samples per model batch (1..{MAX_BATCH})")
    g.add_argument("--png", action="store_true", help="also write a PNG grid per shard")
    g.add_argument("--max-shards", type=int, default=None,
                   help="stop each rank after writing this many shards (>= 1; rerun to continue)")
    g.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available (one GPU per rank: LOCAL_RANK)")
    _sampling_args(g)
    t = sub.add_parser("train", help="train a digits model (resumes from <out>/checkpoint)")
    t.add_argument("--out", default="runs/digits", help="output folder")
    t.add_argument("--steps", type=int, default=None, help="training steps (>= 1; default "
                   "10000)")
    t.add_argument("--batch-size", type=int, default=None,
                   help="global batch (1..1347, the training digits; default 64)")
    t.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints (>= 1; default 100): what a kill can lose")
    t.add_argument("--no-resume", action="store_true",
                   help="start over even if a checkpoint exists")
    t.add_argument("--device", choices=("cuda", "cpu"), default="cpu",
                   help="training device (torchrun: one GPU per rank)")


def _sampling_args(p) -> None:
    from fastdiff.diffusion import SOLVERS

    p.add_argument("--weights", default=WEIGHTS, help="model .safetensors (with its .json)")
    p.add_argument("--solver", default="ddim", choices=SOLVERS)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"sampling steps (1..{NUM_TRAIN_TIMESTEPS})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (diffusers' convention; 1 = off; >= 0)")
    p.add_argument("--seed", type=int, default=0, help="0..2**63-1")


def run(args) -> int:
    return {"sample": _sample, "eval": _eval, "train": _train, "generate": _generate}[
        args.command](args)


def load_model(path: str = WEIGHTS, device="cpu"):
    """The U-Net at ``path`` (fused ops, eval mode); a ValueError naming the file if any of its
    weights is not finite (it would only draw NaN)."""
    from fastdiff.unet import UNet

    model = UNet.load(path, fused=True).eval()
    bad = [k for k, v in model.state_dict().items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"weights {path} hold non-finite values (in {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): refusing to sample from them")
    return model.to(device)


def _check_sampling(args) -> None:
    argcheck.count("--steps", args.steps, hi=NUM_TRAIN_TIMESTEPS,
                   why="the model's diffusion timesteps")
    argcheck.number("--guidance", args.guidance, lo=0.0)
    argcheck.seed("--seed", args.seed)


def _check_labels(labels, num_classes):
    bad = [lab for lab in labels if not 0 <= lab < num_classes]
    if bad:
        raise UsageError(f"--label must be in 0..{num_classes - 1}, got {bad}")


def _draw(model, labels, args):
    from fastdiff.diffusion import GaussianDiffusion, sample

    n = len(labels)
    progress = set(range(0, args.steps, max(1, args.steps // 8))) | {args.steps - 1}
    x, prog = sample(model, GaussianDiffusion(), torch.tensor(labels), solver=args.solver,
                     num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                     progress_steps=progress if getattr(args, "progressive", False) else (),
                     progress_bar=n * args.steps > 2000)
    return x, prog


def _progressive_path(out: str) -> str:
    return os.path.splitext(out)[0] + "-progressive.png"


def _check_sample(args):
    from fastdiff.digits.image import image_format

    _check_sampling(args)
    num = args.num if args.num is not None else (16 if args.label else 8)
    argcheck.count("--num", num, hi=MAX_BATCH, why="samples drawn at once")
    outs = [args.out] + ([_progressive_path(args.out)] if args.progressive else [])
    for out in outs:
        argcheck.out_file("--out", out)
        try:
            image_format(out)
        except ValueError as err:
            raise UsageError(f"--out {err}") from None
    model = load_model(args.weights)
    if args.label:
        _check_labels(args.label, model.config.num_classes)
        labels = [lab for lab in args.label for _ in range(num)]
    else:
        labels = [lab for lab in range(model.config.num_classes) for _ in range(num)]
    if len(labels) > MAX_BATCH:
        raise UsageError(f"--num {num} for {len(labels) // num} labels is {len(labels)} samples, "
                         f"more than the {MAX_BATCH} drawn at once (memory)")
    return model, labels, (min(num, 8) if args.label else num)


def _sample(args) -> int:
    from fastdiff.digits.image import save_grid

    model, labels, cols = _check_sample(args)
    x, prog = _draw(model, labels, args)
    save_grid(x, args.out, cols)
    print(f"wrote {args.out}: {len(labels)} samples ({args.solver}, {args.steps} steps, "
          f"guidance {args.guidance}, seed {args.seed})")
    if args.progressive:
        out = _progressive_path(args.out)
        steps = sorted(prog)
        # rows: samples (at most 10), columns: predicted x0 at successive steps
        rows = torch.stack([prog[s][:10] for s in steps], dim=1).flatten(0, 1)
        save_grid(rows.clamp(-1, 1), out, len(steps))
        print(f"wrote {out}: predicted x0 at steps {steps}")
    return 0


def _eval(args) -> int:
    from fastdiff.digits import data

    _check_sampling(args)
    argcheck.count("--num-per-class", args.num_per_class, hi=MAX_BATCH // 10,
                   why="10 classes drawn at once")
    model = load_model(args.weights)
    labels = [lab for lab in range(10) for _ in range(args.num_per_class)]
    x, _ = _draw(model, labels, args)
    metrics = data.evaluate(x, torch.tensor(labels))
    metrics.update(solver=args.solver, steps=args.steps, guidance=args.guidance, seed=args.seed)
    print(json.dumps(metrics, indent=1))
    return 0


def _check_train(args):
    from dataclasses import replace

    from fastdiff.digits import data
    from fastdiff.digits.train import TrainConfig

    cfg = TrainConfig()
    if args.steps is not None:
        cfg = replace(cfg, steps=argcheck.count("--steps", args.steps))
    if args.batch_size is not None:
        n = len(data.load("train")[1])
        cfg = replace(cfg, batch_size=argcheck.count("--batch-size", args.batch_size, hi=n,
                                                     why="the training digits"))
    if args.checkpoint_every is not None:
        cfg = replace(cfg, ckpt_every=argcheck.count("--checkpoint-every",
                                                     args.checkpoint_every))
    argcheck.out_dir("--out", args.out)
    argcheck.device("--device", args.device)
    return cfg


def _train(args) -> int:
    from fastdiff.digits import distributed
    from fastdiff.digits.train import train

    cfg = _check_train(args)
    ctx = distributed.init(args.device)
    try:
        train(args.out, cfg, resume=not args.no_resume, ctx=ctx)
    finally:
        ctx.close()
    if ctx.is_main:
        print(f"wrote {os.path.join(args.out, 'model.safetensors')} (EMA weights)",
              file=sys.stderr)
    return 0


def _check_generate(args):
    _check_sampling(args)
    argcheck.count("--num-samples", args.num_samples, hi=MAX_SAMPLES)
    argcheck.count("--shard-size", args.shard_size, hi=MAX_SHARD,
                   why="a shard is held in memory")
    argcheck.count("--batch-size", args.batch_size, hi=MAX_BATCH, why="samples drawn at once")
    shards = -(-args.num_samples // args.shard_size)
    if shards > MAX_SHARDS:
        raise UsageError(f"--num-samples {args.num_samples} in shards of {args.shard_size} is "
                         f"{shards} shards, more than {MAX_SHARDS}: raise --shard-size")
    if args.max_shards is not None:
        argcheck.count("--max-shards", args.max_shards)
    argcheck.out_dir("--out", args.out)
    argcheck.device("--device", args.device)
    model = load_model(args.weights)
    if args.label:
        _check_labels(args.label, model.config.num_classes)
    return model


def _generate(args) -> int:
    from fastdiff.digits import distributed
    from fastdiff.digits.generate import generate

    model = _check_generate(args)
    ctx = distributed.init(args.device)
    try:
        summary = generate(model.to(ctx.device), args.out, args.num_samples, labels=args.label,
                           shard_size=args.shard_size, batch_size=args.batch_size,
                           solver=args.solver, steps=args.steps, guidance=args.guidance,
                           seed=args.seed, png=args.png, max_shards=args.max_shards,
                           rank=ctx.rank, world_size=ctx.world_size, barrier=ctx.barrier,
                           progress=ctx.is_main, model_name=os.path.basename(args.weights))
    finally:
        ctx.close()
    corrupt = (f", removed {summary['corrupt']} corrupt ones to draw again"
               if summary["corrupt"] else "")
    print(f"rank {ctx.rank}/{ctx.world_size}: wrote {summary['written']} shards, skipped "
          f"{summary['skipped']} already there{corrupt}, {summary['seconds']:.1f} s",
          file=sys.stderr)
    if ctx.is_main:
        if "manifest" in summary:
            print(f"wrote {summary['manifest']}: {args.num_samples} samples in "
                  f"{summary['shards']} shards")
        else:
            print(f"{summary['missing']} of {summary['shards']} shards still to draw: run the "
                  "same command again to continue")
    return 0
