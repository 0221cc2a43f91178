"""The experiment set-up that the merging and defenses chapters share: one attacked task among clean ones.

    scene = AttackedScene(world, "mnist")          # the world's tasks, mnist's τ replaced by an attacker's
    attack = scene.sbv(seeds=(0, 1, 2), beta=1.0)   # or scene.badnets(), scene.mean_bv(...),
    scene.badmerging()
    attack = scene.sbv(family="BadMerging", beta=0.5)   # an SBV of BadMerging's seed BVs
    control = scene.bv(family="BadMerging", beta=1.5)   # its magnitude control: one BV, scaled
    tau = scene.merge(attack, "ties")               # λ validated on the clean merge (World.merge_params)
    scene.judge(tau, attack)                        # mean CA over the tasks, the attacked task's CA, ASR

Every model comes from the world's store, so two chapters that build the same attack train it once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from bvlib.attacks.sbv import sparse_backdoor_vector
from bvlib.backdoor_vectors import Attack, attack_bv, backdoored_model, clean_model
from bvlib.errors import BVLibError
from bvlib.merging import merge
from bvlib.weights import Weights


@dataclass(frozen=True)
class AttackVector:
    """What an attacker hands to the merger: a task vector for the attacked task, with its trigger."""

    name: str
    tau: Weights  # θ_attacker − θ0
    trigger: object  # a PatchTrigger (drawn or optimised)
    target: int
    injected_norm: float = float("nan")  # norm of the vector added to θ_clean (BV attacks)


MERGES = {  # the merges an attack is judged after (label: method, parameters over the validated ones)
    "TA": ("task_arithmetic", {}),
    "TIES": ("ties", {}),  # disjoint mean at its validated λ, as in the TIES paper
    "TIES sum ×0.3": ("ties", {"disjoint": "sum", "lam": 0.3}),  # BadMerging's evaluation convention
}


class AttackedScene:
    """`tasks` merged (default: every task of the world), the `attacked` one replaced by an attack."""

    def __init__(self, world, attacked: str | None = None, tasks: Sequence[str] | None = None):
        self.world = world
        self.attacked = world.check_task(attacked or world.task_names[0])
        names = [world.check_task(t) for t in (tasks or world.task_names)]
        self.names = names if self.attacked in names else [self.attacked, *names]
        self.theta0 = world.base_weights
        self.tau = {t: world.finetune(t) - self.theta0 for t in self.names}  # clean task vectors
        self.poison = world.badnets()

    # attacks ------------------------------------------------------------------------------------
    # An attack *family* is one base attack whose BVs an SBV combines: "BadNets" (seeds), "BadNets
    # locations" (the BadNets trigger at `LOCATIONS`, token-aligned, all with the first seed: the BVs
    # differ only in where the trigger sits) and "BadMerging" (seeds). Every family is judged with
    # its first member's trigger and target.
    FAMILIES = ("BadNets", "BadNets locations", "BadMerging")
    LOCATIONS = ("bottom_right", "top_left", "center")  # the reference corner first

    def _seed_attacks(self, seeds: Sequence[int]) -> list[Attack]:
        if not seeds:
            raise BVLibError("need at least one seed")
        return [Attack(self.attacked, self.poison, s) for s in seeds]

    def _check_family(self, family: str) -> str:
        if family not in self.FAMILIES:
            raise BVLibError(f"unknown attack family '{family}'; choose one of: {', '.join(self.FAMILIES)}")
        return family

    def _location_attacks(self, seeds: Sequence[int]) -> list[Attack]:
        if not 1 <= len(seeds) <= len(self.LOCATIONS):
            raise BVLibError(
                f"the locations family has {len(self.LOCATIONS)} members: give 1 to {len(self.LOCATIONS)} "
                "seeds"
            )
        token = self.world.patch_size
        out = []
        for loc in self.LOCATIONS[: len(seeds)]:
            trig = (
                self.poison.trigger
                if loc == self.poison.trigger.location
                else dataclasses.replace(self.poison.trigger, location=loc, token=token)
            )
            out.append(Attack(self.attacked, dataclasses.replace(self.poison, trigger=trig), seeds[0]))
        return out

    @cached_property
    def badmerging_poison(self):
        """BadMerging's poison on the attacked task: its universal trigger optimised against θ0 (cached)."""
        from bvlib.attacks.badmerging import badmerging_poison

        return badmerging_poison(self.world, self.attacked)

    def family_bvs(self, family: str = "BadNets", seeds: Sequence[int] = (0, 1, 2)) -> list[Weights]:
        """The BVs θ_attacker − θ_clean of a family's members (both fine-tunes with the member's seed)."""
        if not seeds:
            raise BVLibError("need at least one seed")
        return [self.member_bv(family, seeds, i) for i in range(len(seeds))]

    def member_bv(self, family: str, seeds: Sequence[int], member: int) -> Weights:
        """The BV of member `member` of `family_bvs(family, seeds)` alone (one job of `bvlib.jobs`)."""
        if not 0 <= member < len(seeds):
            raise BVLibError(f"member {member} is out of range for {len(seeds)} seeds")
        if self._check_family(family) == "BadMerging":
            from bvlib.attacks.badmerging import badmerging_finetune

            s = seeds[member]
            return badmerging_finetune(
                self.world, self.attacked, self.badmerging_poison, seed=s
            ) - self.world.finetune(self.attacked, seed=s)
        attacks = (
            self._location_attacks(seeds) if family == "BadNets locations" else self._seed_attacks(seeds)
        )
        return attack_bv(self.world, attacks[member])

    def family_trigger(self, family: str):
        """(trigger, target) an attack of `family` is judged with."""
        if self._check_family(family) == "BadMerging":
            return self.badmerging_poison.trigger, self.badmerging_poison.target
        return self.poison.trigger, self.poison.target

    def _injected(
        self, name: str, vector: Weights, beta: float, seed: int, family: str = "BadNets"
    ) -> AttackVector:
        clean = clean_model(self.world, Attack(self.attacked, self.poison, seed))
        trigger, target = self.family_trigger(family)
        return AttackVector(name, clean + beta * vector - self.theta0, trigger, target, beta * vector.norm())

    def badnets(self, seed: int = 0) -> AttackVector:
        """The backdoored fine-tune itself (= θ_clean + 1·BV)."""
        a = self._seed_attacks([seed])[0]
        bd = backdoored_model(self.world, a) - self.theta0
        return AttackVector("BadNets", bd, a.trigger, a.target, attack_bv(self.world, a).norm())

    def bv(self, beta: float = 1.0, seed: int = 0, family: str = "BadNets") -> AttackVector:
        """θ_clean + β·BV: one BV of `family`, scaled by the attacker (the SBV's magnitude control).
        For "BadMerging" at β = 1 this is the BadMerging model itself."""
        bv = self.family_bvs(family, [seed])[0]
        return self._injected("BV" if family == "BadNets" else f"{family} BV", bv, beta, seed, family)

    def seed_bvs(self, seeds: Sequence[int] = (0, 1, 2)) -> list[Weights]:
        return self.family_bvs("BadNets", seeds)

    def mean_bv(self, seeds: Sequence[int] = (0, 1, 2), beta: float = 1.0) -> AttackVector:
        """θ_clean + β·mean(BVs): the same BVs as the SBV, without sign selection."""
        bvs = self.seed_bvs(seeds)
        return self._injected("mean BV", sum(bvs[1:], bvs[0]) / len(bvs), beta, seeds[0])

    def sbv(
        self,
        seeds: Sequence[int] = (0, 1, 2),
        beta: float = 1.0,
        combine: str = "sum",
        agreement: float = 1.0,
        family: str = "BadNets",
    ) -> AttackVector:
        """θ_clean(seeds[0]) + β·SBV, the SBV combined from the BVs of `family`'s members with `seeds`
        (see `sparse_backdoor_vector`)."""
        vector = sparse_backdoor_vector(self.family_bvs(family, seeds), combine=combine, agreement=agreement)
        return self._injected(
            "SBV" if family == "BadNets" else f"SBV ({family})", vector, beta, seeds[0], family
        )

    def badmerging(self, seed: int = 0) -> AttackVector:
        """BadMerging: a universal trigger optimised against θ0, and its feature-interpolation fine-tune."""
        from bvlib.attacks.badmerging import badmerging_finetune

        bm = self.badmerging_poison
        tau = badmerging_finetune(self.world, self.attacked, bm, seed=seed) - self.theta0
        bv = tau + self.theta0 - self.world.finetune(self.attacked, seed=seed)
        return AttackVector("BadMerging", tau, bm.trigger, bm.target, bv.norm())

    # merging and judging ------------------------------------------------------------------------
    def vectors(self, attack: AttackVector | None) -> list[Weights]:
        """The task vectors handed to the merger (the clean ones when `attack` is None)."""
        return [attack.tau if attack is not None and t == self.attacked else self.tau[t] for t in self.names]

    def merge(self, attack: AttackVector | None, method: str, **params) -> Weights:
        """τ_merged of the scene; the method's validated λ unless `params` say otherwise."""
        return merge(self.vectors(attack), method, **(self.world.merge_params(method) | params))

    def judge(
        self, tau_merged: Weights, attack: AttackVector, tasks: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Mean CA over `tasks` (default: the scene's), the attacked task's CA and the attack's ASR there."""
        return self.world.evaluate_merged(
            self.theta0 + tau_merged, list(tasks or self.names), self.attacked, attack.trigger, attack.target
        )

    def alone(self, attack: AttackVector) -> dict[str, float]:
        """The attacker's own model on the attacked task: its CA and ASR before any merging."""
        return self.world.evaluate(self.attacked, self.theta0 + attack.tau, attack.trigger, attack.target)

    # the attacker's β at equal cost -----------------------------------------------------------------
    def beta_sweep(
        self,
        family: str,
        kind: str,
        betas: Sequence[float],
        seeds: Sequence[int] = (0, 1, 2),
        merges: dict = MERGES,
    ) -> list[dict]:
        """One row per β (β = 0, the clean model, first) of θ_clean + β·V, V one BV of `family` (`kind`
        "BV", the magnitude control) or the SBV of its members with `seeds` ("SBV"): the attacker
        model's own CA and ASR, its cost (the clean model's CA minus its own) and the ASR after each
        merge of `merges`, with the image counts behind them (`n_acc`, `n_asr`)."""
        if kind not in ("BV", "SBV"):
            raise BVLibError(f"kind must be 'BV' or 'SBV', got {kind!r}")
        trigger, target = self.family_trigger(family)
        n = self.world.judged_counts(self.attacked, target)
        clean_acc = self.world.evaluate(self.attacked, self.world.finetune(self.attacked, seed=seeds[0]))[
            "acc"
        ]
        rows = []
        for beta in [0.0, *(b for b in betas if b != 0)]:
            attack = self.bv(beta, seeds[0], family) if kind == "BV" else self.sbv(seeds, beta, family=family)
            own = self.alone(attack)
            row = {
                "attacked task": self.attacked,
                "family": family,
                "kind": kind,
                "beta": float(beta),
                "norm": attack.injected_norm,
                "attacker CA": own["acc"],
                "attacker ASR": own["asr"],
                "cost": clean_acc - own["acc"],
                "n_acc": n["acc"],
                "n_asr": n["asr"],
            }
            for label, (method, params) in merges.items():
                row[f"ASR {label}"] = self.world.trigger_scores(
                    self.attacked, self.theta0 + self.merge(attack, method, **params), trigger, target
                )["asr"]
            rows.append(row)
        return rows


def at_cost(rows: Sequence[dict], cost: float, column: str) -> float | None:
    """`column` (an ASR after a merge) read off a β sweep where the attacker's cost reaches `cost`.

    The sweep's rows are taken in order of β; the cost curve is made non-decreasing (its running
    maximum: a larger β never counts as cheaper), and the value is interpolated linearly between
    the two βs around the point where the curve crosses `cost`. None when no β reaches `cost`.
    """
    rows = sorted(rows, key=lambda r: r["beta"])
    costs, peak = [], float("-inf")
    for r in rows:
        peak = max(peak, r["cost"])
        costs.append(peak)
    for i, c in enumerate(costs):
        if c >= cost:
            if i == 0 or c == costs[i - 1]:
                return rows[i][column]
            w = (cost - costs[i - 1]) / (c - costs[i - 1])
            return rows[i - 1][column] + w * (rows[i][column] - rows[i - 1][column])
    return None


def matched_cost(a: Sequence[dict], b: Sequence[dict], budget: float) -> float | None:
    """The attacker cost at which two β sweeps are compared: `budget`, or less where one of them never
    costs that much (the largest cost both reach); None when they share no cost above 0."""
    reach = min(max(r["cost"] for r in a), max(r["cost"] for r in b), budget)
    return reach if reach > 0 else None
