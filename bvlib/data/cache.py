"""Hashing, resizing and the cache of built tasks and corpora (safetensors under $BVLIB_CACHE, atomic writes)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bvlib.data.tasks import DATA_VERSION


# ----------------------------------------------------------------------------------------
# Hashing, resizing, caching
# ----------------------------------------------------------------------------------------
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised: a well-mixed 64-bit value per element."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _hash_rows(a: np.ndarray | torch.Tensor) -> np.ndarray:
    """A 64-bit content hash per row (per image), vectorised over rows."""
    if isinstance(a, torch.Tensor):
        a = a.numpy()
    flat = np.ascontiguousarray(a).reshape(len(a), int(np.prod(a.shape[1:]))).view(np.uint8)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = np.concatenate([flat, np.zeros((len(flat), pad), np.uint8)], axis=1)
    words = flat.view(np.uint64)
    h = np.full(len(flat), flat.shape[1], dtype=np.uint64)
    for j in range(words.shape[1]):
        h = _mix64(h ^ words[:, j])
    return h


def _name_seed(*parts: object) -> int:
    """A stable 32-bit seed from names and numbers (Python's hash() is salted per process)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


def _resize(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """uint8 [N, C, h, w] -> uint8 [N, 3, size, size], bilinear with antialiasing; grey -> 3 channels."""
    n, c, h, w = images.shape
    if (h, w) != (size, size):
        out = torch.empty((n, c, size, size), dtype=torch.uint8)
        for s in range(0, n, chunk):
            x = images[s:s + chunk].float()
            out[s:s + chunk] = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                             align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        images = out
    if c == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


def cache_dir() -> Path:
    """Where built tasks and corpora are cached: $BVLIB_CACHE, else `data/` beside the default store."""
    from bvlib.store import bvlib_home

    return Path(os.environ.get("BVLIB_CACHE") or bvlib_home() / "data")


def _cache_path(kind: str, config: dict) -> Path:
    blob = json.dumps({"version": DATA_VERSION, "kind": kind, **config}, sort_keys=True, default=str)
    return cache_dir() / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}.safetensors"


def _cache_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception:  # a truncated or foreign file: rebuild rather than fail
        return None


def _cache_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temp file in the same folder, then os.replace: readers never see half a file."""
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as e:  # a read-only cache is not fatal: the data are just rebuilt next time
        import warnings

        warnings.warn(f"could not cache {path.name} in {path.parent}: {e}; set BVLIB_CACHE to a writable folder", stacklevel=3)
