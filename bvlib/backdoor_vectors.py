"""Backdoor Vector experiments: inject / remove by scaling, similarity and transfer between attacks.

An `Attack` names one BadNets variant (task, trigger, target, seed). Its BV is
θ_backdoored − θ_clean, both fine-tuned from θ0 on the same task with the same seed and schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from bvlib.attacks.badnets import Poison
from bvlib.errors import BVLibError
from bvlib.weights import Weights, apply_vector, backdoor_vector, cosine_matrix


@dataclass(frozen=True)
class Attack:
    """One BadNets attack: `poison` applied while fine-tuning on `task` with `seed`."""

    task: str
    poison: Poison
    seed: int = 0
    label: str = ""
    group: str = ""  # which variation this attack belongs to (seed, location, target, task)

    @property
    def trigger(self):
        return self.poison.trigger

    @property
    def target(self) -> int:
        return self.poison.target


def clean_model(world, attack: Attack) -> Weights:
    return world.finetune(attack.task, seed=attack.seed)


def backdoored_model(world, attack: Attack) -> Weights:
    return world.finetune(attack.task, poison=attack.poison, seed=attack.seed)


def attack_bv(world, attack: Attack) -> Weights:
    """BV of an attack (both fine-tunes come from the store when they exist)."""
    return backdoor_vector(backdoored_model(world, attack), clean_model(world, attack))


def scale_sweep(world, attack: Attack, scales: Sequence[float], mode: str = "inject") -> list[dict]:
    """CA and ASR of θ_clean + λ·BV ("inject") or θ_backdoored − λ·BV ("remove") for each λ."""
    if mode not in ("inject", "remove"):
        raise BVLibError(f"mode must be 'inject' or 'remove', got '{mode}'")
    bv = attack_bv(world, attack)
    start, sign = (
        (clean_model(world, attack), 1.0) if mode == "inject" else (backdoored_model(world, attack), -1.0)
    )
    rows = []
    for lam in scales:
        r = world.evaluate(attack.task, apply_vector(start, bv, sign * lam), attack.trigger, attack.target)
        rows.append(
            {"task": attack.task, "mode": mode, "scale": float(lam), "acc": r["acc"], "asr": r["asr"]}
        )
    return rows


def top_mass(vector: Weights, share: float = 0.01) -> float:
    """Share of the squared norm held by the largest `share` of coordinates (1.0 = perfectly sparse)."""
    sq = vector.flat.float().pow(2)
    k = max(1, int(share * sq.numel()))
    return float(sq.topk(k).values.sum() / sq.sum().clamp_min(1e-30))


def vector_stats(world, attack: Attack) -> dict:
    """Norms and sparsity of an attack's BV next to its task vector τ = θ_clean − θ0."""
    tau = clean_model(world, attack) - world.base_weights
    bv = attack_bv(world, attack)
    cos = float(cosine_matrix([tau, bv])[0, 1])
    return {
        "task": attack.task,
        "tau_norm": tau.norm(),
        "bv_norm": bv.norm(),
        "bv_over_tau": bv.norm() / max(tau.norm(), 1e-30),
        "tau_top1pct_mass": top_mass(tau),
        "bv_top1pct_mass": top_mass(bv),
        "cos_bv_tau": cos,
    }


def variations(
    world,
    task: str,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    locations: Sequence[str] = ("top_left", "center", "random"),
    targets: Sequence[int] = (1, 2),
    tasks: Sequence[str] = (),
    aligned_token: int = 0,
) -> list[Attack]:
    """The reference BadNets attack on `task` and its variations, one knob at a time.

    With `aligned_token` (the encoder's patch size), every location also gets a variant snapped to the
    reference trigger's offset inside its token (group "location, aligned"): at paper scale two corners'
    triggers share most of their in-token pixels, and this is the variation that reproduces that.
    """
    ref = world.badnets()
    loc = ref.trigger.location
    attacks = [Attack(task, ref, seeds[0] if seeds else 0, f"{task} ref", "reference")]
    attacks += [Attack(task, ref, s, f"seed {s}", "seed") for s in seeds[1:]]
    attacks += [
        Attack(task, replace(ref, trigger=replace(ref.trigger, location=lo)), 0, f"at {lo}", "location")
        for lo in locations
        if lo != loc
    ]
    if aligned_token:
        attacks += [
            Attack(
                task,
                replace(ref, trigger=replace(ref.trigger, location=lo, token=aligned_token)),
                0,
                f"at {lo}, aligned",
                "location, aligned",
            )
            for lo in locations
            if lo != loc
        ]
    attacks += [
        Attack(task, replace(ref, target=t), 0, f"target {t}", "target") for t in targets if t != ref.target
    ]
    attacks += [Attack(t, ref, 0, f"task {t}", "task") for t in tasks if t != task]
    for a in attacks:
        world.check_task(a.task)
    return attacks


def transfer_matrix(world, attacks: Sequence[Attack]) -> torch.Tensor:
    """[i, j] = ASR of attack i's trigger and target on θ_clean(i) + BV(j), measured on task i."""
    bvs = [attack_bv(world, a) for a in attacks]
    out = torch.zeros(len(attacks), len(attacks))
    for i, a in enumerate(attacks):
        clean = clean_model(world, a)
        for j, bv in enumerate(bvs):
            out[i, j] = world.trigger_scores(a.task, clean + bv, a.trigger, a.target)[
                "asr"
            ]  # one triggered pass
    return out


def clean_asr(world, attacks: Sequence[Attack]) -> torch.Tensor:
    """[i] = ASR of attack i's trigger and target on θ_clean(i) with no BV: the floor of row i of the
    transfer matrix (a trigger alone moves some images to the target)."""
    return torch.tensor(
        [world.trigger_scores(a.task, clean_model(world, a), a.trigger, a.target)["asr"] for a in attacks]
    )


def similarity_matrix(world, attacks: Sequence[Attack]) -> torch.Tensor:
    """Cosine similarity between the attacks' BVs."""
    return cosine_matrix([attack_bv(world, a) for a in attacks]).cpu()


def group_means(matrix: torch.Tensor, attacks: Sequence[Attack]) -> dict[str, float]:
    """Mean of matrix[ref, j] and matrix[j, ref] over the attacks j of each variation group.

    The reference attack is the first; each group varies one knob away from it.
    """
    out = {}
    for group in dict.fromkeys(a.group for a in attacks[1:]):
        idx = [j for j, a in enumerate(attacks) if a.group == group]
        vals = torch.cat([matrix[0, idx], matrix[idx, 0]])
        out[group] = float(vals.mean())
    return out


def group_rates(
    world, matrix: torch.Tensor, attacks: Sequence[Attack], floor: torch.Tensor | None = None
) -> dict[str, dict]:
    """Per variation group, its transfer pooled over the pairs (reference, j) and (j, reference) of
    the group, as `bvlib.stats.Rate`s on the images behind them: {"transfer": Rate, "floor": Rate}
    (the floor: the rows' triggers on their clean models, `clean_asr`), for intervals over tasks."""
    from bvlib.stats import Rate

    n = [world.judged_counts(a.task, a.target)["asr"] for a in attacks]
    out = {}
    for group in dict.fromkeys(a.group for a in attacks[1:]):
        idx = [j for j, a in enumerate(attacks) if a.group == group]
        pairs = [(0, j) for j in idx] + [(j, 0) for j in idx]
        total = sum(n[i] for i, _ in pairs)
        out[group] = {"transfer": Rate(float(sum(matrix[i, j] for i, j in pairs) / len(pairs)), total)}
        if floor is not None:
            out[group]["floor"] = Rate(float(sum(floor[i] for i, _ in pairs) / len(pairs)), total)
    return out
