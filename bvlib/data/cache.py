"""Hashing, resizing and the cache of built tasks and corpora (a `Store` under $BVLIB_CACHE)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bvlib.data.tasks import DATA_VERSION
from bvlib.errors import BVLibError


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
            x = images[s : s + chunk].float()
            out[s : s + chunk] = (
                F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                .round_()
                .clamp_(0, 255)
                .to(torch.uint8)
            )
        images = out
    if c == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


def cache_dir() -> Path:
    """Where built tasks and corpora are cached: $BVLIB_CACHE, else `data/` beside the default store."""
    from bvlib.store import bvlib_home

    return Path(os.environ.get("BVLIB_CACHE") or bvlib_home() / "data")


def cached_data(
    kind: str, config: dict, build: Callable[[], tuple[dict[str, torch.Tensor], dict]]
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of built data (a task's splits, a corpus) from the cache: the artifact `Store`
    rooted at `cache_dir()`, with its verified loads, atomic writes and one builder per entry. A cache
    that cannot be written only costs a rebuild next time (one warning)."""
    from bvlib.store import Store

    store, config = Store(cache_dir()), {"version": DATA_VERSION, **config}
    hit = store.load(kind, config)
    if hit is not None:
        return hit
    try:
        store.check_writable()
    except BVLibError as e:
        import warnings

        warnings.warn(
            f"{e}; the data are built but not cached (set BVLIB_CACHE to a writable folder)", stacklevel=3
        )
        return build()
    return store.cached(kind, config, build)
