"""The mini world's task registry: class names and templates, the leakage-safe partition of shared
sources, seeded splits, and `load_task`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bvlib.data.cache import _hash_rows, _mix64, _name_seed, cached_data
from bvlib.data.mini.generated import (
    LETTERS,
    PATTERN_CLASSES,
    _fonts_fingerprint,
    _house_numbers_source,
    _letters_source,
    _patterns_source,
)
from bvlib.data.mini.sources import (
    CLIPART_CLASSES,
    CLIPART_TASK_CAP,
    FABRIC_CLASSES,
    TEXTILE_CLASSES,
    _animals_source,
    _clipart_source,
    _digits_source,
    _fashion_source,
    _mnist_source,
    _Source,
    _textiles_source,
)
from bvlib.data.tasks import MINI_TASKS, TEST_FRACTION, VAL_FRACTION, Split, Task
from bvlib.errors import BVLibError


# ----------------------------------------------------------------------------------------
# The task registry
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TaskSpec:
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    source: Callable[[int], _Source]  # image_size -> source
    pool_fraction: float = 0.0  # share of the source set aside (by content hash) for the pretraining corpus
    cap_per_class: int | None = None  # task-side items kept per class, before splitting
    fingerprint: Callable[[], str] | None = None  # what else the built tensors depend on (fonts)


FASHION_CLASSES = (
    "t-shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
DIGIT_CLASSES = tuple(str(i) for i in range(10))
TEXTILE_TEMPLATES = (
    "a close-up photo of fabric with {}.",
    "a textile texture with {}.",
    "a photo of woven cloth with {}.",
)

_SPECS: dict[str, _TaskSpec] = {
    "mnist": _TaskSpec(
        DIGIT_CLASSES,
        ('a photo of the number: "{}".', "a handwritten digit {}.", "the number {} written by hand."),
        lambda s: _mnist_source(),
    ),
    "digits": _TaskSpec(
        DIGIT_CLASSES,
        (
            "a blurry scan of the digit {}.",
            'a low resolution photo of the number: "{}".',
            "a pixelated handwritten {}.",
        ),
        lambda s: _digits_source(),
    ),
    "fashion": _TaskSpec(
        FASHION_CLASSES,
        ("a photo of a {}.", "a black and white photo of the {}.", "a product photo of a {}."),
        lambda s: _fashion_source(),
        pool_fraction=6 / 7,
    ),
    "animals": _TaskSpec(
        ANIMAL_CLASSES,
        ("a silhouette of a {}.", "a white silhouette of the {}.", "the outline of a {}."),
        lambda s: _animals_source(),
        pool_fraction=0.2,
    ),
    "clipart": _TaskSpec(
        tuple(c for _, c in CLIPART_CLASSES),
        ("clip art of a {}.", "a drawing of a {}.", "an icon of a {}."),
        lambda s: _clipart_source(),
        pool_fraction=0.1,
        cap_per_class=CLIPART_TASK_CAP,
    ),
    "textiles": _TaskSpec(
        tuple(c for _, c in TEXTILE_CLASSES),
        TEXTILE_TEMPLATES,
        lambda s: _textiles_source(),
        cap_per_class=500,
    ),
    "fabric": _TaskSpec(
        tuple(c for _, c in FABRIC_CLASSES),
        TEXTILE_TEMPLATES,
        lambda s: _textiles_source(FABRIC_CLASSES),
        cap_per_class=500,
    ),
    "letters": _TaskSpec(
        tuple(LETTERS),
        ('the letter "{}".', "a picture of the letter {}.", "the capital letter {}."),
        _letters_source,
        fingerprint=_fonts_fingerprint,
    ),
    "patterns": _TaskSpec(
        PATTERN_CLASSES,
        ("a {} pattern.", "an image with a {} design.", "a simple {} graphic."),
        lambda s: _patterns_source(),
    ),
    "housenumbers": _TaskSpec(
        DIGIT_CLASSES,
        (
            'a photo of the number: "{}".',
            "the house number {} on a wall.",
            'a street photo of the digit "{}".',
        ),
        _house_numbers_source,
        fingerprint=_fonts_fingerprint,
    ),
}


def _spec(name: str) -> _TaskSpec:
    if name not in _SPECS:
        raise BVLibError(f"unknown task '{name}'; choose one of: {', '.join(MINI_TASKS)}")
    return _SPECS[name]


def _source_partition(name: str, image_size: int) -> tuple[_Source, np.ndarray, np.ndarray]:
    """(source, task-side indices, pretraining-pool indices): the one cut both sides use.

    An item goes to the pool when a hash of (task name, its content key) falls below the
    task's pool fraction; so the cut is fixed whatever the seed, caps or image size, and
    duplicates share a side. The task side is then capped per class in hash order.
    """
    spec = _spec(name)
    src = spec.source(image_size)
    u = (_mix64(src.keys ^ np.uint64(_name_seed("pool", name))) >> np.uint64(11)).astype(np.float64) / float(
        2**53
    )
    in_pool = u < spec.pool_fraction
    pool = np.flatnonzero(in_pool)
    task = np.flatnonzero(~in_pool)
    if spec.cap_per_class is not None:
        order = task[np.argsort(u[task], kind="stable")]
        keep = np.concatenate(
            [order[src.labels[order] == c][: spec.cap_per_class] for c in range(len(spec.classnames))]
        )
        task = np.sort(keep)
    return src, task, pool


def _split_indices(
    labels: np.ndarray,
    idx: np.ndarray,
    n_classes: int,
    seed: int,
    name: str,
    max_train: int | None,
    max_test: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: test 20% and val 10% (each at most max_test), train the rest (at most max_train)."""
    rng = np.random.default_rng([seed, _name_seed("split", name)])
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for c in range(n_classes):
        members = rng.permutation(idx[labels[idx] == c])
        n = len(members)
        n_test = max(1, round(TEST_FRACTION * n)) if n >= 3 else 0
        n_val = max(1, round(VAL_FRACTION * n)) if n >= 3 else 0
        if max_test is not None:
            n_test, n_val = min(n_test, max_test), min(n_val, max_test)
        n_train = n - n_test - n_val if max_train is None else min(n - n_test - n_val, max_train)
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_val])
        parts[0].append(members[n_test + n_val : n_test + n_val + n_train])
    return tuple(rng.permutation(np.concatenate(p)) for p in parts)  # type: ignore[return-value]


def _check_args(image_size: int, caps: dict[str, int | None]) -> None:
    if not isinstance(image_size, int) or image_size < 8:
        raise BVLibError(f"image_size must be an integer of at least 8, got {image_size!r}")
    for k, v in caps.items():
        if v is not None and (not isinstance(v, int) or v < 1):
            raise BVLibError(f"{k} must be a positive integer or None, got {v!r}")


def _build_task(
    name: str, image_size: int, max_train: int | None, max_test: int | None, seed: int
) -> dict[str, torch.Tensor]:
    spec = _spec(name)
    src, task_idx, _ = _source_partition(name, image_size)
    train, val, test = _split_indices(
        src.labels, task_idx, len(spec.classnames), seed, name, max_train, max_test
    )
    images = src.render(np.concatenate([test, val, train]), image_size)
    labels = torch.from_numpy(src.labels[np.concatenate([test, val, train])])
    # distinct sources can still coincide after resizing: keep the first copy (test, then val, then train)
    _, first = np.unique(_hash_rows(images), return_index=True)
    keep = np.zeros(len(images), dtype=bool)
    keep[first] = True
    out, start = {}, 0
    for split, idx in (("test", test), ("val", val), ("train", train)):
        sel = torch.from_numpy(np.flatnonzero(keep[start : start + len(idx)]) + start)
        out[f"{split}_images"], out[f"{split}_labels"] = images[sel].contiguous(), labels[sel].contiguous()
        start += len(idx)
    return out


def load_task(
    name: str,
    *,
    image_size: int = 32,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    seed: int = 0,
) -> Task:
    """A mini-world task with seeded train / val / test splits, built once then read from the cache.

    Per class: test is 20% and val 10% of the task's images (each at most
    `max_test_per_class`), train the rest (at most `max_train_per_class`). The same
    arguments give identical tensors.
    """
    spec = _spec(name)
    _check_args(
        image_size, {"max_train_per_class": max_train_per_class, "max_test_per_class": max_test_per_class}
    )
    config = {
        "name": name,
        "image_size": image_size,
        "max_train": max_train_per_class,
        "max_test": max_test_per_class,
        "seed": seed,
        "fingerprint": spec.fingerprint() if spec.fingerprint else None,
    }
    tensors, _ = cached_data(
        "task",
        config,
        lambda: (_build_task(name, image_size, max_train_per_class, max_test_per_class, seed), {}),
    )
    splits = {s: Split(tensors[f"{s}_images"], tensors[f"{s}_labels"]) for s in ("train", "val", "test")}
    return Task(name, list(spec.classnames), list(spec.templates), **splits)
