"""The task interface: a `Task` (class names, prompt templates, train/val/test splits) and batching.

In-memory splits are uint8 [N, 3, H, W] tensors; the paper's TA8 datasets (`bvlib.data.paper`) are
torch Datasets behind the same interface, so batching, triggers and evaluation are shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from bvlib.errors import BVLibError

DATA_VERSION = "mini-data-3"  # bump to invalidate every cached task and corpus
MINI_TASKS: tuple[str, ...] = (
    "mnist",
    "digits",
    "fashion",
    "animals",
    "clipart",
    "textiles",
    "letters",
    "patterns",
    "housenumbers",
    "fabric",
)
PAPER_TASKS: tuple[str, ...] = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN")

TEST_FRACTION = 0.2
VAL_FRACTION = 0.1


# ----------------------------------------------------------------------------------------
# The task interface
# ----------------------------------------------------------------------------------------
@dataclass
class Split:
    """An in-memory split: uint8 images [N, 3, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


SplitLike = Split | Dataset
"""A split is in memory (mini world) or a Dataset of (uint8 CHW tensor, int) (paper scale)."""


def head(split: SplitLike, n: int | None) -> SplitLike:
    """The first `n` examples of a split (all of it if `n` is None or not smaller)."""
    if n is None or n >= len(split):
        return split
    if n < 1:
        raise BVLibError(f"need at least one image, got {n}")
    if isinstance(split, Split):
        return Split(split.images[:n], split.labels[:n])
    return Subset(split, range(n))


def outside(split: SplitLike, target: int) -> SplitLike:
    """The examples of an in-memory split not labelled `target`, the only ones an attack success rate
    counts: a triggered pass skips the others (a Dataset is returned whole, its labels unread)."""
    if not isinstance(split, Split):
        return split
    keep = split.labels != target
    return split if bool(keep.all()) else Split(split.images[keep], split.labels[keep])


@dataclass
class Task:
    """A classification task: what a zero-shot head needs (class names, templates) and its splits."""

    name: str
    classnames: list[str]
    templates: list[str]
    train: SplitLike
    val: SplitLike
    test: SplitLike

    @property
    def n_classes(self) -> int:
        return len(self.classnames)


def iterate_batches(
    split: SplitLike,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, int64 labels) batches; each index once per pass.

    In-memory splits are sliced by index (no per-sample work); any other Dataset goes
    through a single-process DataLoader so a seeded `generator` gives the same order.
    """
    if batch_size < 1:
        raise BVLibError(f"batch_size must be positive, got {batch_size}")
    if isinstance(split, Split):
        n = len(split)
        order = torch.randperm(n, generator=generator) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            if order is None:  # in order: plain slices, no copy
                yield split.images[start : start + batch_size], split.labels[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                yield split.images[idx], split.labels[idx]
        return
    loader = DataLoader(
        split,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
        drop_last=drop_last,
        num_workers=0,
    )
    for images, labels in loader:
        yield images, torch.as_tensor(labels, dtype=torch.int64)
