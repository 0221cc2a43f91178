"""The experiment set-up that the merging and defenses chapters share: one attacked task among clean ones.

    scene = AttackedScene(world, "mnist")          # the world's tasks, mnist's τ replaced by an attacker's
    attack = scene.sbv(seeds=(0, 1, 2), beta=1.0)   # or scene.badnets(), scene.mean_bv(...), scene.badmerging()
    tau = scene.merge(attack, "ties")               # λ validated on the clean merge (World.merge_params)
    scene.judge(tau, attack)                        # mean CA over the tasks, the attacked task's CA, ASR

Every model comes from the world's store, so two chapters that build the same attack train it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    def _seed_attacks(self, seeds: Sequence[int]) -> list[Attack]:
        if not seeds:
            raise BVLibError("need at least one seed")
        return [Attack(self.attacked, self.poison, s) for s in seeds]

    def _injected(self, name: str, vector: Weights, beta: float, seed: int) -> AttackVector:
        clean = clean_model(self.world, Attack(self.attacked, self.poison, seed))
        return AttackVector(name, clean + beta * vector - self.theta0, self.poison.trigger, self.poison.target, beta * vector.norm())

    def badnets(self, seed: int = 0) -> AttackVector:
        """The backdoored fine-tune itself (= θ_clean + 1·BV)."""
        a = self._seed_attacks([seed])[0]
        bd = backdoored_model(self.world, a) - self.theta0
        return AttackVector("BadNets", bd, a.trigger, a.target, attack_bv(self.world, a).norm())

    def bv(self, beta: float = 1.0, seed: int = 0) -> AttackVector:
        """θ_clean + β·BV: one BV, scaled by the attacker."""
        return self._injected("BV", attack_bv(self.world, self._seed_attacks([seed])[0]), beta, seed)

    def seed_bvs(self, seeds: Sequence[int] = (0, 1, 2)) -> list[Weights]:
        return [attack_bv(self.world, a) for a in self._seed_attacks(seeds)]

    def mean_bv(self, seeds: Sequence[int] = (0, 1, 2), beta: float = 1.0) -> AttackVector:
        """θ_clean + β·mean(BVs): the same BVs as the SBV, without sign selection."""
        bvs = self.seed_bvs(seeds)
        return self._injected("mean BV", sum(bvs[1:], bvs[0]) / len(bvs), beta, seeds[0])

    def sbv(self, seeds: Sequence[int] = (0, 1, 2), beta: float = 1.0, combine: str = "sum", agreement: float = 1.0) -> AttackVector:
        """θ_clean + β·SBV, the SBV combined from the BVs of `seeds` (see `sparse_backdoor_vector`)."""
        vector = sparse_backdoor_vector(self.seed_bvs(seeds), combine=combine, agreement=agreement)
        return self._injected("SBV", vector, beta, seeds[0])

    def badmerging(self) -> AttackVector:
        """BadMerging: a universal trigger optimised against θ0, and its feature-interpolation fine-tune."""
        from bvlib.attacks.badmerging import badmerging_finetune, badmerging_poison

        bm = badmerging_poison(self.world, self.attacked)
        return AttackVector("BadMerging", badmerging_finetune(self.world, self.attacked, bm) - self.theta0, bm.trigger, bm.target)

    # merging and judging ------------------------------------------------------------------------
    def vectors(self, attack: AttackVector | None) -> list[Weights]:
        """The task vectors handed to the merger (the clean ones when `attack` is None)."""
        return [attack.tau if attack is not None and t == self.attacked else self.tau[t] for t in self.names]

    def merge(self, attack: AttackVector | None, method: str, **params) -> Weights:
        """τ_merged of the scene; the method's validated λ unless `params` say otherwise."""
        return merge(self.vectors(attack), method, **(self.world.merge_params(method) | params))

    def judge(self, tau_merged: Weights, attack: AttackVector, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Mean CA over `tasks` (default: the scene's), the attacked task's CA and the attack's ASR there."""
        return self.world.evaluate_merged(self.theta0 + tau_merged, list(tasks or self.names), self.attacked, attack.trigger, attack.target)

    def alone(self, attack: AttackVector) -> dict[str, float]:
        """The attacker's own model on the attacked task: its CA and ASR before any merging."""
        return self.world.evaluate(self.attacked, self.theta0 + attack.tau, attack.trigger, attack.target)
