"""Input checks the defenses share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bvlib.errors import BVLibError
from bvlib.weights import Weights


# input checks ---------------------------------------------------------------------------------
def _check_weights(world, weights, what: str = "weights") -> Weights:
    if not isinstance(weights, Weights):
        raise BVLibError(f"{what} must be Weights (a flat encoder vector), got {type(weights).__name__}")
    world.layout.check_same(weights.layout, f"{what} and the world's encoder")
    return weights.check_finite(what)


def _pos_int(name: str, value, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise BVLibError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _check_target(world, task: str, target) -> int:
    n = world.task(task).n_classes
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < n:
        raise BVLibError(f"target class {target!r} is out of range for task '{task}' with {n} classes")
    return target


def _vector_list(vectors, what: str = "task vectors") -> list[Weights]:
    if isinstance(vectors, Mapping):
        vectors = list(vectors.values())
    if isinstance(vectors, Weights) or not isinstance(vectors, Sequence):
        raise BVLibError(f"expected a list (or dict) of Weights as {what}, got {type(vectors).__name__}")
    if not vectors:
        raise BVLibError(f"need at least one of the {what} to merge, got none")
    if not all(isinstance(v, Weights) for v in vectors):
        raise BVLibError(f"every one of the {what} must be Weights")
    return list(vectors)


def _image_side(world) -> int:
    return int(world.preset.data.image_size)
