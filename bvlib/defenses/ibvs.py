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
PLACEBOS = ("zero", "random", "seed divergence")


def ibvs_trigger(world, size: int | None = None, location: str = "top_left") -> PatchTrigger:
    """The defender's fixed trigger: a solid white square in the top-left corner, by default two
    thirds of the side of the preset's patch triggers (4 px where they are 6 px on 32 px; 15 px
    where they are 22 px on 224 px).

    The defender knows nothing of the attack, so its square shares by construction neither the
    corner nor the size of the preset's attacks (bottom-right, full size); `size` and `location`
    give the variants (the attack's own corner and size is the optimistic case).
    """
    preset_size = world.badnets().trigger.size
    return PatchTrigger(
        size=size or max(1, round(2 * preset_size / 3)),
        location=location,
        pattern="solid",
        color=(1.0, 1.0, 1.0),
    )


def defender_target(world, task: str) -> int:
    """The defender's target class, chosen without knowing the attacker's: the last class of its task
    (the presets' attacks aim at class 0; passing the attacker's target is the oracle variant)."""
    return world.task(world.check_task(task)).n_classes - 1


def placebo_vector(
    world, kind: str, like: Weights, task: str | None = None, seeds: Sequence[int] = (0, 1), seed: int = 0
) -> Weights:
    """A vector with no backdoor in it, merged in the IBVS BV's place to tell IBVS from its side effects.

    - "zero": the zero vector: what one more merged task does by itself (mean-type merges dilute);
    - "random": a random direction (seeded Gaussian) with the norm of `like` (the defender's BV);
    - "seed divergence": θ_clean(seeds[1]) − θ_clean(seeds[0]) on `task` (default: the world's last),
      the part of every BV that two training runs put there, rescaled to the norm of `like`.
    Merged with `merge_with_ibvs` at the same strength as the BV it stands in for.
    """
    if not isinstance(like, Weights):
        raise BVLibError(f"like must be Weights (the defender's BV), got {type(like).__name__}")
    if kind == "zero":
        return Weights(like.flat.new_zeros(like.flat.shape), like.layout)
    if kind == "random":
        import torch

        g = torch.Generator().manual_seed(seed)
        v = torch.randn(like.flat.shape, generator=g, dtype=torch.float32).to(
            like.flat.device, like.flat.dtype
        )
    elif kind == "seed divergence":
        task = world.check_task(task if task is not None else world.task_names[-1])
        if len(seeds) != 2 or seeds[0] == seeds[1]:
            raise BVLibError(f"seed divergence needs two different seeds, got {list(seeds)}")
        v = (world.finetune(task, seed=seeds[1]) - world.finetune(task, seed=seeds[0])).flat
    else:
        raise BVLibError(f"unknown placebo '{kind}'; choose one of: {', '.join(PLACEBOS)}")
    return Weights(v * (like.norm() / max(float(v.float().norm()), 1e-30)), like.layout)


def ibvs_vector(
    world,
    task: str | None = None,
    *,
    trigger: PatchTrigger | None = None,
    target: int = 0,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    **train_overrides,
) -> Weights:
    """The defender's injection Backdoor Vector: BV = θ_backdoored − θ_clean on the defender's task.

    `task` is the defender's task (default: the world's first); both fine-tunes start from θ0 with
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
        return backdoor_vector(
            world.finetune(task, poison=poison, seed=s, **train_overrides),
            world.finetune(task, seed=s, **train_overrides),
        )

    if seeds is None or len(seeds) == 1:
        return one(seed if seeds is None else seeds[0])
    return sparse_backdoor_vector([one(s) for s in seeds], combine="rescale")


def ibvs_vectors(
    world, tasks: Sequence[str], *, trigger: PatchTrigger | None = None, seed: int = 0, **train_overrides
) -> list[Weights]:
    """The defender's BV on each of `tasks` (its square in every model it merges, each aimed at that
    task's `defender_target`), for a defender that controls no task of its own: merged with
    `merge_with_ibvs` as one −BV per task."""
    return [
        ibvs_vector(world, t, trigger=trigger, target=defender_target(world, t), seed=seed, **train_overrides)
        for t in tasks
    ]


def merge_with_ibvs(
    task_vectors: Sequence[Weights] | Mapping[str, Weights],
    method: str,
    ibvs_bv: Weights | Sequence[Weights],
    strength: float = 1.0,
    **merge_params,
) -> Weights:
    """The merge with the defender's BV subtracted at the merge's own scale: merge(τ_1..τ_K, −strength·BV).

    The defender's −BV enters the merge as one more task vector, so it gets what every task vector
    gets: task arithmetic scales it by λ (subtracting 1·BV after a λ = 0.3 merge would remove ~3× what
    any attacker's vector keeps), TIES trims it and lets it vote in the sign election, DARE drops and
    rescales it. A list of BVs (a defender that injected its trigger into several merged tasks) enters
    as that many more task vectors. strength = 0 is the plain merge.
    """
    vectors = _vector_list(task_vectors)
    if isinstance(ibvs_bv, Weights):
        bvs = [ibvs_bv]
    elif isinstance(ibvs_bv, (list, tuple)) and ibvs_bv and all(isinstance(b, Weights) for b in ibvs_bv):
        bvs = list(ibvs_bv)
    else:
        raise BVLibError(
            "ibvs_bv must be Weights (a Backdoor Vector) or a non-empty list of them, got "
            f"{type(ibvs_bv).__name__}"
        )
    for bv in bvs:
        vectors[0].layout.check_same(bv.layout, "task vectors and the IBVS BV")
    strength = _real("strength", strength, 0)
    if strength == 0:
        return merge(vectors, method, **merge_params)
    return merge(vectors + [-strength * bv for bv in bvs], method, **merge_params)
