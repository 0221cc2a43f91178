"""Evaluation: clean accuracy (CA) and attack success rate (ASR), batched, on any device."""

from __future__ import annotations

import torch

from bvlib.data import iterate_batches, outside
from bvlib.errors import BVLibError
from bvlib.triggers import PatchTrigger


def eval_batch_size(device: torch.device | str) -> int:
    """Images per forward pass when judging: 128 on a CPU, where a batch's activations then stay in
    cache (the mini world's eight test passes run 1.5x faster than at 1024, with the same
    predictions: `benchmarks/bench_eval.py`); 1024 on a GPU."""
    return 128 if torch.device(device).type == "cpu" else 1024


def _logits(
    classifier, split, trigger: PatchTrigger | None, batch_size: int | None, device: torch.device | str
):
    """(float logits, true labels) batch by batch over a split, optionally with a trigger pasted on."""
    classifier.to(device).eval()
    for images, y in iterate_batches(split, batch_size or eval_batch_size(device), shuffle=False):
        x = images.to(device).float().div_(255)
        yield classifier(x if trigger is None else trigger.apply(x)).float(), y


@torch.no_grad()
def predict(
    classifier,
    split,
    trigger: PatchTrigger | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, true labels) over a split, optionally with a trigger pasted on."""
    preds, labels = [], []
    for logits, y in _logits(classifier, split, trigger, batch_size, device):
        preds.append(logits.argmax(dim=1).cpu())
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


@torch.no_grad()
def trigger_scores(
    classifier,
    split,
    trigger: PatchTrigger,
    target: int,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """{"asr": ASR of `trigger` for `target`, "target_prob": the mean probability of `target` on the
    triggered images not labelled `target`}, from one pass over the triggered split."""
    kept = outside(split, target)
    if len(kept) == 0:
        raise BVLibError(f"no images outside target class {target}: ASR is undefined")
    preds, probs, labels = [], [], []
    for logits, y in _logits(classifier, kept, trigger, batch_size, device):
        preds.append(logits.argmax(dim=1).cpu())
        probs.append(logits.softmax(-1)[:, target].cpu())
        labels.append(y)
    preds, probs, labels = torch.cat(preds), torch.cat(probs), torch.cat(labels)
    return {
        "asr": attack_success_rate(preds, labels, target, "images"),
        "target_prob": float(probs[labels != target].mean()),
    }


def attack_success_rate(
    triggered_preds: torch.Tensor, labels: torch.Tensor, target: int, what: str = "test images"
) -> float:
    """ASR, the one definition every module uses: the share of triggered images whose true label is
    NOT the target that are classified as the target."""
    keep = labels != target
    if not keep.any():
        raise BVLibError(f"no {what} outside target class {target}: ASR is undefined")
    return float((triggered_preds[keep] == target).float().mean())


def evaluate(
    classifier,
    split,
    trigger: PatchTrigger | None = None,
    target: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """{"acc": CA} plus, with a trigger and target, {"asr": ASR}.

    ASR as `attack_success_rate`.
    """
    preds, labels = predict(classifier, split, batch_size=batch_size, device=device)
    result = {"acc": float((preds == labels).float().mean())}
    if trigger is not None:
        if target is None:
            raise BVLibError("ASR needs the target class as well as the trigger")
        if not (labels != target).any():  # before the second pass
            raise BVLibError(f"no test images outside target class {target}: ASR is undefined")
        tpreds, tlabels = predict(
            classifier, outside(split, target), trigger=trigger, batch_size=batch_size, device=device
        )
        result["asr"] = attack_success_rate(tpreds, tlabels, target)
    return result
