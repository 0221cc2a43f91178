"""BadMerging (Zhang et al., CCS 2024): a backdoor built to survive model merging (on-task).

Two stages, as in the paper:
1. a universal trigger optimised against the *pretrained* θ0 for the target class
   (`bvlib.attacks.inherent.inherent_trigger`);
2. fine-tuning of the adversary's task model with clean cross-entropy plus
   `loss_weight` × a *feature-interpolation* backdoor loss: the features of triggered images
   are mixed with the features the model had before fine-tuning (θ0),
   f = α·f_θ(x ⊕ t) + (1 − α)·f_θ0(x ⊕ t), α ~ U(interp_min, 1) once per batch, on the raw
   (unnormalised) encoder outputs as the authors' code mixes them, and the mix must still be
   classified as the target. A merge scales the adversary's task
   vector down (θ0 + λ·τ + …), which moves its features toward θ0's; training on the whole
   segment between the two keeps the backdoor alive at the small λ that merging uses.

`BadMergingPoison` has the poison interface (`trigger`, `target`, `config()`,
`make_loss(classifier, seed)`), so `World.finetune(task, poison=...)` trains and caches it
like any poisoned fine-tune; `badmerging_finetune` is that call.

Defaults follow the authors' implementation: triggered copies of half of each batch as
extra samples (rate 0.5, their 64 of 128), backdoor loss weight 5 (their alpha 5, as in
DESIGN.md), α ~ U(0.2, 1).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bvlib.attacks.badnets import LossFn
from bvlib.attacks.inherent import inherent_trigger
from bvlib.errors import BVLibError
from bvlib.triggers import Trigger
from bvlib.weights import Weights


def feature_interpolation_loss(
    features: torch.Tensor,
    reference_features: torch.Tensor,
    head: torch.Tensor,
    logit_scale: float,
    target: int,
    alpha: float,
) -> torch.Tensor:
    """Cross-entropy to `target` of the zero-shot logits of normalize(α·features + (1 − α)·reference).

    `features` and `reference_features` are the raw encoder outputs (BadMerging's code mixes those; a
    mix of normalised ones weighs the two models' features equally whatever their lengths). At α = 1
    this is the plain cross-entropy of the triggered images to the target.
    """
    mixed = F.normalize(alpha * features + (1 - alpha) * reference_features, dim=-1)
    logits = logit_scale * mixed @ head.T
    return F.cross_entropy(
        logits, torch.full((len(features),), target, device=features.device, dtype=torch.long)
    )


@dataclass(frozen=True)
class BadMergingPoison:
    """On-task BadMerging: `trigger` (ideally universal, from θ0) and `target` (a class of the task).

    Each batch of n clean images gets round(rate·n) triggered copies as extra samples; the
    loss is CE(clean) + loss_weight · feature_interpolation_loss(triggered, α ~ U(interp_min, 1)).
    """

    trigger: Trigger
    target: int = 0
    rate: float = 0.5
    loss_weight: float = 5.0
    interp_min: float = 0.2

    def __post_init__(self):
        if not 0.0 < self.rate <= 1.0:
            raise BVLibError(f"poison rate must be in (0, 1], got {self.rate}")
        if not 0.0 <= self.interp_min <= 1.0:
            raise BVLibError(f"interp_min must be in [0, 1], got {self.interp_min}")
        if self.loss_weight < 0:
            raise BVLibError(f"loss_weight must be >= 0, got {self.loss_weight}")

    def config(self) -> dict:
        return {
            "attack": "badmerging",
            "trigger": self.trigger.config(),
            "target": self.target,
            "rate": self.rate,
            "loss_weight": self.loss_weight,
            "interp_min": self.interp_min,
            "mix": "raw features",
        }

    def make_loss(self, classifier, seed: int = 0) -> LossFn:
        """The BadMerging loss; `classifier` as it is before training is the interpolation reference (θ0)."""
        reference = copy.deepcopy(classifier).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(seed)

        def loss(classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            n, k = len(x), max(1, round(self.rate * len(x)))
            xt = self.trigger.apply(x[:k])
            feats = classifier.features(torch.cat([x, xt]), normalize=False)
            clean = F.cross_entropy(
                classifier.logit_scale * F.normalize(feats[:n], dim=-1) @ classifier.head.T, y
            )
            with torch.no_grad():
                ref = reference.features(xt, normalize=False)
            alpha = self.interp_min + (1 - self.interp_min) * float(torch.rand((), generator=g))
            backdoor = feature_interpolation_loss(
                feats[n:], ref, classifier.head, classifier.logit_scale, self.target, alpha
            )
            return clean + self.loss_weight * backdoor

        return loss


def badmerging_poison(
    world,
    task: str,
    target: int | None = None,
    *,
    size: int | None = None,
    location: str | None = None,
    trigger_options: Mapping | None = None,
    **fields,
) -> BadMergingPoison:
    """BadMerging on task `task` with its universal trigger optimised against θ0 (cached).

    target, size and location default to the preset's BadNets attack, so both attacks are
    compared at the same trigger size; `trigger_options` go to `inherent_trigger` (steps, lr,
    batch_size, seed); `fields` set BadMergingPoison's other fields (rate, loss_weight, interp_min).
    """
    spec = world.preset.badnets
    target = spec["target"] if target is None else target
    trig = inherent_trigger(
        world,
        task,
        target,
        size=size or spec["trigger"]["size"],
        location=location or spec["trigger"].get("location", "bottom_right"),
        **dict(trigger_options or {}),
    )
    return BadMergingPoison(trigger=trig, target=target, **fields)


def badmerging_finetune(
    world, task: str, poison: BadMergingPoison, seed: int = 0, **train_overrides
) -> Weights:
    """The adversary's BadMerging model for `task`, from the store when it was made before.

    The store key is World.finetune's: base, task, data, train config and
    `poison.config()` (which carries "attack": "badmerging" and the trigger's digest).
    """
    if not isinstance(poison, BadMergingPoison):
        raise BVLibError(
            f"badmerging_finetune needs a BadMergingPoison, got {type(poison).__name__}; use World.finetune "
            "for BadNets"
        )
    return world.finetune(task, poison=poison, seed=seed, **train_overrides)
