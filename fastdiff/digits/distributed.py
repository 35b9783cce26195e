"""torch.distributed set-up for commands started by torchrun (NCCL on GPUs, gloo on CPUs).

``init()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT or the
rendezvous endpoint torchrun resolved) and starts the default process group; without torchrun
it returns a single-process context and starts nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str | None = None) -> Context:
    """The process group of this torchrun worker (a no-op context outside torchrun).

    device: 'cuda', 'cpu' or None (CUDA when available). Each rank takes GPU LOCAL_RANK.
    """
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if device not in (None, "cuda", "cpu"):
        raise ValueError(f"'device' must be 'cuda', 'cpu' or None, got {device!r}")
    if not launched_by_torchrun():
        return Context(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                device_id=dev if use_cuda else None)
    return Context(rank, world, local, dev, True)
