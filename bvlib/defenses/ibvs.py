"""IBVS (Injection Backdoor Vector Subtraction; the paper's defense): the defender implants its own
backdoor in a task it controls and merges −strength·BV with the task vectors, at the merge's scale."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from bvlib.attacks.sbv import sparse_backdoor_vector
from bvlib.defenses.common import _check_target, _vector_list
from bvlib.errors import BVLibError
from bvlib.merging import _real, merge
from bvlib.triggers import PatchTrigger
from bvlib.weights import Weights, backdoor_vector


# IBVS -----------------------------------------------------------------------------------------
def ibvs_trigger(world, size: int | None = None, location: str = "bottom_right") -> PatchTrigger:
    """The defender's fixed trigger: a solid white square, by default of the preset's patch size.

    The size follows the preset's convention for patch triggers (4 px on 32 px in the mini world,
    22 px on 224 px = 1% of the image at paper scale), not anything known about an attack.
    """
    return PatchTrigger(size=size or world.badnets().trigger.size, location=location, pattern="solid", color=(1.0, 1.0, 1.0))


def ibvs_vector(world, task: str | None = None, *, trigger: PatchTrigger | None = None, target: int = 0, seed: int = 0,
                seeds: Sequence[int] | None = None, **train_overrides) -> Weights:
    """The defender's injection Backdoor Vector: BV = θ_backdoored − θ_clean on the defender's task.

    `task` is the defender's own task (default: the world's first); both fine-tunes start from θ0 with
    the same seed and schedule (`train_overrides` go to `World.finetune`), the backdoored one with the
    preset's BadNets poisoning recipe (rate, mode, loss weight) but the defender's `trigger` (default
    `ibvs_trigger(world)`, a white square) and `target`. Both come from the store when made before.
    With several `seeds`, the defender keeps only what its seed BVs agree on: their sign-consistent
    combination rescaled to one BV's norm (`sparse_backdoor_vector(combine="rescale")`), which drops
    the divergence of two training runs and keeps the backdoor's direction.
    """
    task = world.check_task(task if task is not None else world.task_names[0])
    trigger = trigger if trigger is not None else ibvs_trigger(world)
    _check_target(world, task, target)
    poison = dataclasses.replace(world.badnets(), trigger=trigger, target=target)

    def one(s: int) -> Weights:
        return backdoor_vector(world.finetune(task, poison=poison, seed=s, **train_overrides), world.finetune(task, seed=s, **train_overrides))

    if seeds is None or len(seeds) == 1:
        return one(seed if seeds is None else seeds[0])
    return sparse_backdoor_vector([one(s) for s in seeds], combine="rescale")


def merge_with_ibvs(task_vectors: Sequence[Weights] | Mapping[str, Weights], method: str, ibvs_bv: Weights, strength: float = 1.0,
                    **merge_params) -> Weights:
    """The merge with the defender's BV subtracted at the merge's own scale: merge(τ_1..τ_K, −strength·BV).

    The defender's −BV enters the merge as one more task vector, so it gets what every task vector
    gets: task arithmetic scales it by λ (subtracting 1·BV after a λ = 0.3 merge would remove ~3× what
    any attacker's vector keeps), TIES trims it and lets it vote in the sign election, DARE drops and
    rescales it. strength = 0 is the plain merge.
    """
    vectors = _vector_list(task_vectors)
    if not isinstance(ibvs_bv, Weights):
        raise BVLibError(f"ibvs_bv must be Weights (a Backdoor Vector), got {type(ibvs_bv).__name__}")
    vectors[0].layout.check_same(ibvs_bv.layout, "task vectors and the IBVS BV")
    strength = _real("strength", strength, 0)
    if strength == 0:
        return merge(vectors, method, **merge_params)
    return merge(vectors + [-strength * ibvs_bv], method, **merge_params)
