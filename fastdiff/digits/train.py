"""``fastdiff train``: DDPM training on the digits with checkpoints that survive a kill.

Every ``ckpt_every`` steps the whole state (weights, EMA weights, Adam moments, step, both RNG
states) is written atomically, with a sha256 of its payload, to ``<out>/checkpoint.safetensors``;
``resume=True`` verifies and continues from it and ends with exactly the weights of an
uninterrupted run with the same seed. A non-finite loss (or non-finite weights at a checkpoint)
stops the run with ``FloatingPointError`` and leaves the last good checkpoint in place. Training
runs the U-Net on the fused ops (group_norm_silu's fused backward, attention's recompute
backward: fastdiff/ops.py); the result is saved as ``<out>/model.safetensors`` + ``model.json``
(EMA weights), ready for fused sampling.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch

from fastdiff.checkpoint import atomic_save_safetensors, read_safetensors
from fastdiff.diffusion import EMA, GaussianDiffusion
from fastdiff.digits import data as digits
from fastdiff.unet import UNet, UNetConfig

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class TrainConfig:
    steps: int = 10000
    batch_size: int = 64
    lr: float = 5e-4
    ema_decay: float = 0.999
    p_uncond: float = 0.15          # condition dropout for classifier-free guidance
    ckpt_every: int = 100          # a kill loses at most this many steps
    seed: int = 0
    model: UNetConfig = field(default_factory=lambda: UNetConfig(
        image_size=8, base_channels=32, channel_mult=(1, 2), attn_resolutions=(4,),
        head_dim=32, groups=8, num_classes=10, dropout=0.1))


def _check_finite(step, model, ema, path):
    for name, m in (("weights", model), ("EMA weights", ema.model)):
        if not all(torch.isfinite(p).all() for p in m.parameters()):
            raise FloatingPointError(f"training diverged: non-finite {name} at step {step}; "
                                     f"{path} keeps the last good checkpoint")


def _save(path, step, cfg, model, ema, opt, gen):
    _check_finite(step, model, ema, path)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
    for i, st in opt.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
    tensors["rng.data"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": str(step), "train_config": json.dumps(asdict(cfg)),
            "param_groups": json.dumps(opt.state_dict()["param_groups"])}
    atomic_save_safetensors(tensors, path, metadata=meta)


def _load(path, cfg, model, ema, opt, gen) -> int:
    state, meta = read_safetensors(path, require_checksum=True)
    saved = json.loads(meta.get("train_config", "{}"))
    # the run's length and checkpoint interval may change on resume (train longer); not the rest
    same = lambda d: {k: v for k, v in d.items() if k not in ("steps", "ckpt_every")}  # noqa: E731
    if saved and same(saved) != same(json.loads(json.dumps(asdict(cfg)))):
        raise ValueError(f"checkpoint {path} was written with another training config: {saved}")
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    ema.model.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
    opt_state = {}
    for k, v in state.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
    gen.set_state(state["rng.data"])
    torch.set_rng_state(state["rng.torch"])
    return int(meta["step"])


def train(out_dir: str, cfg: TrainConfig | None = None, resume: bool = True,
          progress: bool = True, stop_after: int | None = None, ctx=None) -> UNet:
    """Trains (or resumes) into ``out_dir``; returns the EMA model.

    ctx: a ``fastdiff.digits.distributed.Context`` (torchrun): the model is wrapped in
    DistributedDataParallel, each of the W ranks takes cfg.batch_size / W samples of every global
    batch (torch's DistributedSampler over the data, reshuffled per epoch), rank 0 alone writes
    checkpoints, and any world size resumes any checkpoint. The global batch and its noise are
    the same for every W, so W ranks train as one process with the same global batch does.
    ``stop_after`` ends the run right after that step's checkpoint, as a kill would (tests).
    """
    from torch.utils.data.distributed import DistributedSampler

    from fastdiff.digits.distributed import Context

    cfg = cfg or TrainConfig()
    ctx = ctx or Context()
    W, rank, device = ctx.world_size, ctx.rank, ctx.device
    # every check before anything is written to out_dir
    for name in ("batch_size", "ckpt_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"'{name}' must be >= 1, got {getattr(cfg, name)}")
    if cfg.steps < 0:
        raise ValueError(f"'steps' must be >= 0, got {cfg.steps}")
    if cfg.batch_size % W:
        raise ValueError(f"'batch_size' ({cfg.batch_size}) must be divisible by the number of "
                         f"ranks ({W})")
    b = cfg.batch_size // W
    torch.manual_seed(cfg.seed + rank)                     # dropout masks differ per rank
    gen = torch.Generator().manual_seed(cfg.seed)          # shared: t, noise, label dropout
    x_all, y_all = digits.load("train")
    if cfg.model.image_size != x_all.shape[-1]:
        x_all = torch.nn.functional.interpolate(x_all, size=cfg.model.image_size, mode="bilinear",
                                                align_corners=False)
    sampler = DistributedSampler(range(len(y_all)), num_replicas=W, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    per_epoch = len(sampler) // b
    if per_epoch < 1:
        raise ValueError(f"'batch_size' ({cfg.batch_size}) exceeds the data ({len(y_all)})")
    diffusion = GaussianDiffusion()
    model = UNet(cfg.model, fused=True).to(device).train()
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    ckpt = os.path.join(out_dir, CHECKPOINT)
    start = _load(ckpt, cfg, model, ema, opt, gen) if resume and os.path.exists(ckpt) else 0
    os.makedirs(out_dir, exist_ok=True)
    if ctx.is_main:
        remove_stale_temp_files(out_dir)
    net = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)
    x_all, y_all = x_all.to(device), y_all.to(device)

    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="training", unit="step")
    epoch, order = -1, None
    shape = (cfg.batch_size, *x_all.shape[1:])
    done = start
    for step in range(start, cfg.steps):
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
        j = step % per_epoch
        idx = order[j * b:(j + 1) * b].to(device)
        # randomness of the whole global batch, identical on every rank; rank r takes the
        # positions r, r + W, ... (where DistributedSampler puts its samples)
        drop = torch.rand(cfg.batch_size, generator=gen)[rank::W] < cfg.p_uncond
        t = torch.randint(0, diffusion.T, (cfg.batch_size,), generator=gen)[rank::W]
        noise = torch.randn(shape, generator=gen)[rank::W]
        labels = y_all[idx].clone()
        labels[drop.to(device)] = cfg.model.num_classes
        loss = diffusion.loss(net, x_all[idx], labels, t=t.to(device), noise=noise.to(device))
        total = loss.detach().clone()
        if ctx.distributed:                    # every rank stops together, or none does
            import torch.distributed as dist

            dist.all_reduce(total)
        done = step + 1
        if not torch.isfinite(total):
            if bar is not None:
                bar.close()
            raise FloatingPointError(
                f"training diverged: non-finite loss ({total.item() / W}) at step {done}; "
                + (f"{ckpt} keeps the last good checkpoint (step {_saved_step(ckpt)})"
                   if os.path.exists(ckpt) else "no checkpoint had been written yet"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total.item() / W:.4f}")
        if (done % cfg.ckpt_every == 0 or done == cfg.steps) and ctx.is_main:
            _save(ckpt, done, cfg, model, ema, opt, gen)
        if stop_after is not None and done >= stop_after:
            break
    if bar is not None:
        bar.close()
    ctx.barrier()
    if ctx.is_main:
        _check_finite(done, model, ema, ckpt)
        ema.model.save(os.path.join(out_dir, "model.safetensors"))
    return ema.model


def remove_stale_temp_files(out_dir: str) -> list[str]:
    """Deletes the temp files a kill during a checkpoint or model write left in ``out_dir``
    (``.tmp-*`` beside the files train writes; each one is as large as a checkpoint)."""
    ours = (CHECKPOINT, "model.safetensors", "model.json")
    removed = [n for n in os.listdir(out_dir) if n.startswith(".tmp-") and n.endswith(ours)]
    for name in removed:
        os.unlink(os.path.join(out_dir, name))
    return removed


def _saved_step(path: str) -> str:
    try:
        return read_safetensors(path)[1].get("step", "?")
    except (OSError, ValueError):
        return "?"
