"""Evaluation: clean accuracy (CA) and attack success rate (ASR), batched, on any device."""

from __future__ import annotations

import torch

from bvlib.data import iterate_batches
from bvlib.errors import BVLibError
from bvlib.triggers import PatchTrigger


@torch.no_grad()
def predict(classifier, split, trigger: PatchTrigger | None = None, batch_size: int = 1024,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, true labels) over a split, optionally with a trigger pasted on."""
    classifier.to(device).eval()
    preds, labels = [], []
    for images, y in iterate_batches(split, batch_size, shuffle=False):
        x = images.to(device).float().div_(255)
        if trigger is not None:
            x = trigger.apply(x)
        preds.append(classifier(x).argmax(dim=1).cpu())
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def evaluate(classifier, split, trigger: PatchTrigger | None = None, target: int | None = None,
             batch_size: int = 1024, device: torch.device | str = "cpu") -> dict[str, float]:
    """{"acc": CA} plus, with a trigger and target, {"asr": ASR}.

    ASR is the share of triggered images whose true label is NOT the target that are
    classified as the target.
    """
    preds, labels = predict(classifier, split, batch_size=batch_size, device=device)
    result = {"acc": float((preds == labels).float().mean())}
    if trigger is not None:
        if target is None:
            raise BVLibError("ASR needs the target class as well as the trigger")
        keep = labels != target
        if not keep.any():
            raise BVLibError(f"no test images outside target class {target}: ASR is undefined")
        tpreds, _ = predict(classifier, split, trigger=trigger, batch_size=batch_size, device=device)
        result["asr"] = float((tpreds[keep] == target).float().mean())
    return result
