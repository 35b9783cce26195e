"""Subcommands of ``fastdiff`` around the shipped digits model: sample, eval, train, generate."""
from __future__ import annotations

import json
import os
import sys

import torch

WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "digits.safetensors")
DEFAULT_GUIDANCE = 1.5
DEFAULT_STEPS = 50


def add_subcommands(sub) -> None:
    s = sub.add_parser("sample", help="sample digits from the shipped model into a PNG grid")
    s.add_argument("--label", type=int, action="append",
                   help="digit 0-9 to draw (repeatable); default: one row per digit 0-9")
    s.add_argument("--num", type=int, default=None,
                   help="samples per label (default 16 with --label, else 8 per row)")
    s.add_argument("--out", default="digits.png", help="PNG file to write (default digits.png)")
    _sampling_args(s)
    s.add_argument("--progressive", action="store_true",
                   help="also write <out>-progressive.png: predicted x0 along the chain")
    e = sub.add_parser("eval", help="conditional accuracy and FD of samples vs real digits")
    e.add_argument("--num-per-class", type=int, default=30)
    _sampling_args(e)
    g = sub.add_parser("generate", help="draw many samples into shards (torchrun: sharded "
                       "across ranks; reruns resume)")
    # not --num: torchrun's own parser takes it for an abbreviation of --numa-binding
    g.add_argument("--num-samples", type=int, required=True, help="number of samples")
    g.add_argument("--out", required=True, help="output folder (shards, manifest.json)")
    g.add_argument("--label", type=int, action="append",
                   help="digit to draw (repeatable; samples cycle through them); default: 0-9")
    g.add_argument("--shard-size", type=int, default=256, help="samples per shard file")
    g.add_argument("--batch-size", type=int, default=256, help="samples per model batch")
    g.add_argument("--png", action="store_true", help="also write a PNG grid per shard")
    g.add_argument("--max-shards", type=int, default=None,
                   help="stop each rank after writing this many shards (rerun to continue)")
    g.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available (one GPU per rank: LOCAL_RANK)")
    _sampling_args(g)
    t = sub.add_parser("train", help="train a digits model (resumes from <out>/checkpoint)")
    t.add_argument("--out", default="runs/digits", help="output folder")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--no-resume", action="store_true",
                   help="start over even if a checkpoint exists")
    t.add_argument("--device", choices=("cuda", "cpu"), default="cpu",
                   help="training device (torchrun: one GPU per rank)")


def _sampling_args(p) -> None:
    from fastdiff.diffusion import SOLVERS

    p.add_argument("--weights", default=WEIGHTS, help="model .safetensors (with its .json)")
    p.add_argument("--solver", default="ddim", choices=SOLVERS)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (diffusers' convention; 1 = off)")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    return {"sample": _sample, "eval": _eval, "train": _train, "generate": _generate}[
        args.command](args)


def load_model(path: str = WEIGHTS, device="cpu"):
    from fastdiff.unet import UNet

    return UNet.load(path, fused=True).eval().to(device)


def _check_labels(labels, num_classes):
    bad = [lab for lab in labels if not 0 <= lab < num_classes]
    if bad:
        raise SystemExit(f"fastdiff sample: --label must be in 0..{num_classes - 1}, got {bad}")


def _draw(model, labels, args):
    from fastdiff.diffusion import GaussianDiffusion, sample

    n = len(labels)
    progress = set(range(0, args.steps, max(1, args.steps // 8))) | {args.steps - 1}
    x, prog = sample(model, GaussianDiffusion(), torch.tensor(labels), solver=args.solver,
                     num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                     progress_steps=progress if getattr(args, "progressive", False) else (),
                     progress_bar=n * args.steps > 2000)
    return x, prog


def _sample(args) -> int:
    from fastdiff.digits.image import save_grid

    model = load_model(args.weights)
    num = args.num if args.num is not None else (16 if args.label else 8)
    if num < 1:
        raise SystemExit(f"fastdiff sample: --num must be >= 1, got {num}")
    if args.label:
        _check_labels(args.label, model.config.num_classes)
        labels = [lab for lab in args.label for _ in range(num)]
        cols = min(num, 8)
    else:
        labels = [lab for lab in range(model.config.num_classes) for _ in range(num)]
        cols = num
    x, prog = _draw(model, labels, args)
    save_grid(x, args.out, cols)
    print(f"wrote {args.out}: {len(labels)} samples ({args.solver}, {args.steps} steps, "
          f"guidance {args.guidance}, seed {args.seed})")
    if args.progressive:
        out = os.path.splitext(args.out)[0] + "-progressive.png"
        steps = sorted(prog)
        # rows: samples (at most 10), columns: predicted x0 at successive steps
        rows = torch.stack([prog[s][:10] for s in steps], dim=1).flatten(0, 1)
        save_grid(rows.clamp(-1, 1), out, len(steps))
        print(f"wrote {out}: predicted x0 at steps {steps}")
    return 0


def _eval(args) -> int:
    from fastdiff.digits import data

    model = load_model(args.weights)
    labels = [lab for lab in range(10) for _ in range(args.num_per_class)]
    x, _ = _draw(model, labels, args)
    metrics = data.evaluate(x, torch.tensor(labels))
    metrics.update(solver=args.solver, steps=args.steps, guidance=args.guidance, seed=args.seed)
    print(json.dumps(metrics, indent=1))
    return 0


def _train(args) -> int:
    from dataclasses import replace

    from fastdiff.digits.train import TrainConfig, train

    cfg = TrainConfig()
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    if args.batch_size:
        cfg = replace(cfg, batch_size=args.batch_size)
    from fastdiff.digits import distributed

    ctx = distributed.init(args.device)
    try:
        train(args.out, cfg, resume=not args.no_resume, ctx=ctx)
    finally:
        ctx.close()
    if ctx.is_main:
        print(f"wrote {os.path.join(args.out, 'model.safetensors')} (EMA weights)",
              file=sys.stderr)
    return 0


def _generate(args) -> int:
    from fastdiff.digits import distributed
    from fastdiff.digits.generate import generate

    ctx = distributed.init(args.device)
    try:
        model = load_model(args.weights, ctx.device)
        summary = generate(model, args.out, args.num_samples, labels=args.label,
                           shard_size=args.shard_size, batch_size=args.batch_size,
                           solver=args.solver, steps=args.steps, guidance=args.guidance,
                           seed=args.seed, png=args.png, max_shards=args.max_shards,
                           rank=ctx.rank, world_size=ctx.world_size, barrier=ctx.barrier,
                           progress=ctx.is_main, model_name=os.path.basename(args.weights))
    finally:
        ctx.close()
    print(f"rank {ctx.rank}/{ctx.world_size}: wrote {summary['written']} shards, skipped "
          f"{summary['skipped']} already there, {summary['seconds']:.1f} s", file=sys.stderr)
    if ctx.is_main:
        if "manifest" in summary:
            print(f"wrote {summary['manifest']}: {args.num_samples} samples in "
                  f"{summary['shards']} shards")
        else:
            print(f"{summary['missing']} of {summary['shards']} shards still to draw: run the "
                  "same command again to continue")
    return 0
