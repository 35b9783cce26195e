"""Checks of the ``fastdiff`` commands' arguments, made before a command does any work.

Each raises ``UsageError`` (a ValueError) naming the option, what it accepts and what it got;
``fastdiff`` turns it into ``fastdiff <command>: error: ...`` and exit status 2. None of them
writes anything: an invalid run leaves the file system as it was.
"""
from __future__ import annotations

import math
import os

MAX_SEED = 2 ** 63 - 1      # what both torch.Generator and numpy's SeedSequence take


class UsageError(ValueError):
    """An invalid command-line argument."""


def count(option: str, value: int, hi: int | None = None, why: str = "") -> int:
    """An integer >= 1 (and <= ``hi``; ``why`` says where that bound comes from)."""
    if value < 1 or (hi is not None and value > hi):
        bound = f"in 1..{hi}" + (f" ({why})" if why else "") if hi is not None else ">= 1"
        raise UsageError(f"{option} must be {bound}, got {value}")
    return value


def seed(option: str, value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise UsageError(f"{option} must be in 0..2**63-1, got {value}")
    return value


def number(option: str, value: float, lo: float | None = None) -> float:
    """A finite float (>= ``lo``)."""
    if not math.isfinite(value) or (lo is not None and value < lo):
        raise UsageError(f"{option} must be a finite number" + (f" >= {lo}" if lo is not None
                                                                else "") + f", got {value}")
    return value


def device(option: str, value: str | None) -> str | None:
    """'cpu', 'cuda' (a GPU must be there: under torchrun, one for LOCAL_RANK) or None."""
    if value == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"{option} cuda: no CUDA GPU is available here "
                             "(torch.cuda.is_available() is False); use --device cpu")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(f"{option} cuda: LOCAL_RANK {local} but only "
                             f"{torch.cuda.device_count()} GPU(s) here")
    return value


def _existing_ancestor(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        p = os.path.dirname(p)
    return p


def _writable_folder(option: str, path: str, folder: str) -> None:
    """``folder`` (which may not exist yet) can be made and written in."""
    base = _existing_ancestor(folder)
    if not os.path.isdir(base):
        raise UsageError(f"{option} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {base} is not writable")


def out_file(option: str, path: str) -> str:
    """A file to write: not a folder, in a folder that exists or can be made, writable."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path} exists and is not writable")
    _writable_folder(option, path, os.path.dirname(os.path.abspath(path)))
    return path


def out_dir(option: str, path: str) -> str:
    """A folder to write in: an existing folder or one that can be made, writable."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path} is a file, not a folder")
    _writable_folder(option, path, path)
    return path
