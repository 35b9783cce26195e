"""Atomic file writes (temp file in the same folder, fsync, rename) and safe tensor loading.

A crash or kill at any moment leaves either the old file or the new one, never half of one.
Safetensors files written here carry a sha256 of their payload in their metadata, checked
when they are read: a flipped byte is an error naming the file, not a silently wrong tensor.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

CHECKSUM_KEY = "sha256"        # safetensors metadata entry holding payload_sha256()


def atomic_write(path: str, write) -> None:
    """Writes ``path`` through ``write(binary file)``: temp file in the same folder, fsync,
    rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the file normal modes
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def payload_sha256(tensors: dict, metadata: dict) -> str:
    """sha256 of what a safetensors file holds: each metadata entry but the checksum, then each
    tensor's name, dtype, shape and bytes, in name order (whatever the file's layout)."""
    import torch

    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != CHECKSUM_KEY},
                        sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def atomic_save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """Writes ``tensors`` and ``metadata`` (str -> str) atomically, with their sha256."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = dict(metadata or {})
    metadata[CHECKSUM_KEY] = payload_sha256(tensors, metadata)
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(obj, path: str) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def read_safetensors(path: str, require_checksum: bool = False) -> tuple[dict, dict]:
    """(tensors, metadata) of ``path``, its checksum verified when it has one (always when
    ``require_checksum``); every error names the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        with open(path, "rb") as f:
            data = f.read()          # once: the tensors and the metadata of the same bytes
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError, AttributeError) as err:
        raise ValueError(f"checkpoint {path} is corrupt or not a safetensors file: {err}") from None
    want = metadata.get(CHECKSUM_KEY)
    if want is None:
        if require_checksum:
            raise ValueError(f"checkpoint {path} has no {CHECKSUM_KEY} checksum (written before "
                             "fastdiff checked them?), so its payload cannot be verified")
    elif payload_sha256(tensors, metadata) != want:
        raise ValueError(f"checkpoint {path} is corrupt: its payload does not match the "
                         f"{CHECKSUM_KEY} checksum it was written with")
    return tensors, metadata


def load_safetensors(path: str) -> dict:
    """The tensors of ``path`` (checksum verified when it has one)."""
    return read_safetensors(path)[0]


def load_safetensors_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}
