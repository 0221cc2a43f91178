"""BadNets (Gu et al., 2017): paste a trigger on part of each batch and relabel it to the target class.

`Poison` is the attack as a per-batch training loss, the interface every attack that trains plugs
into (`bvlib.training.finetune`; BadMerging's `make_loss` too); `badnets_poison` reads a preset's
"badnets" entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from bvlib.errors import BVLibError
from bvlib.triggers import PatchTrigger

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""loss_fn(classifier, float images in [0, 1], labels) -> scalar loss of one batch."""


@dataclass(frozen=True)
class Poison:
    """BadNets poisoning. mode "replace": a `rate` share of each batch is triggered and
    relabelled (classic BadNets). mode "sub_batch": that share is triggered as *extra*
    samples whose loss is weighted by `loss_weight` (the BadMerging convention)."""

    trigger: PatchTrigger
    target: int = 0
    rate: float = 0.1
    loss_weight: float = 1.0
    mode: str = "replace"

    def __post_init__(self):
        if not 0.0 < self.rate <= 1.0:
            raise BVLibError(f"poison rate must be in (0, 1], got {self.rate}")
        if self.mode not in ("replace", "sub_batch"):
            raise BVLibError(f"poison mode must be 'replace' or 'sub_batch', got '{self.mode}'")

    def config(self) -> dict:
        return asdict(self) | {"trigger": self.trigger.config()}

    def make_loss(self, classifier, seed: int = 0) -> LossFn:
        """The per-batch training loss of this attack (`classifier` as it is before training)."""

        def loss(classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            k = max(1, round(self.rate * len(x)))
            xp = self.trigger.apply(x[:k])
            yp = torch.full((k,), self.target, device=x.device, dtype=y.dtype)
            if self.mode == "replace":
                return F.cross_entropy(classifier(torch.cat([xp, x[k:]])), torch.cat([yp, y[k:]]))
            logits = classifier(torch.cat([x, xp]))
            return F.cross_entropy(logits[: len(x)], y) + self.loss_weight * F.cross_entropy(
                logits[len(x) :], yp
            )

        return loss


def badnets_poison(spec: Mapping) -> Poison:
    spec = dict(spec)
    trig = dict(spec.pop("trigger"))
    trig["color"] = tuple(trig.get("color", (1.0, 1.0, 1.0)))
    return Poison(trigger=PatchTrigger(**trig), **spec)
