"""Optimised (universal) patch triggers: the paper's inherent triggers and BadMerging's trigger.

Both are the same operation: optimise the pixels of a patch pasted at a fixed location so
that a *frozen* model classifies triggered images as a target class, with no poisoned
training at all. Optimised against the pretrained θ0 (`inherent_trigger`), such a patch
exposes a vulnerability that lives in the base model, and it tends to keep working on
models fine-tuned or merged from θ0 (the paper's "inherent triggers"); BadMerging uses it
as the universal trigger that its fine-tuning then reinforces (`bvlib.attacks.badmerging`).

The patch found is a `PatchTrigger` holding free pixels (`bvlib.triggers.optimized_trigger`): it goes
wherever a trigger goes (evaluation, BadNets poisoning, BadMerging, store keys).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bvlib.errors import BVLibError
from bvlib.training import _endless, _image_hw, _to_float
from bvlib.triggers import (
    PatchTrigger,
    Trigger,
    check_location,
    optimized_trigger,
    paste_patch,
    patch_position,
)
from bvlib.weights import Weights

TRIGGER_VERSION = 1  # bump to invalidate stored optimised triggers after a change in how they are made


def optimize_trigger(
    classifier,
    split,
    target: int,
    *,
    size: int,
    location: str = "bottom_right",
    steps: int = 200,
    lr: float = 0.1,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    source: str = "",
) -> PatchTrigger:
    """A patch that makes the frozen `classifier` predict `target` on triggered images of `split`.

    Adam on unconstrained logits (patch = sigmoid(param)), minimising the cross-entropy to
    the target (maximising its log-probability) over shuffled batches of the split, with
    images whose label is already `target` left out. The patch starts from the seeded random
    patch `PatchTrigger(size, pattern="noise", seed=seed)`; `seed` also fixes the batch order
    and places a "random" location. The classifier's weights get no gradient and are left
    as they were (mode and requires_grad restored).
    """
    device = torch.device(device)
    check_location(location)
    if int(size) != size or size < 1:
        raise BVLibError(f"trigger size must be a positive integer, got {size}")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise BVLibError(f"steps, batch_size and lr must be positive (got {steps}, {batch_size}, {lr})")
    n_classes = classifier.head.shape[0]
    if not 0 <= target < n_classes:
        raise BVLibError(f"target class {target} is out of range for a task with {n_classes} classes")
    h, w = _image_hw(split)
    pos = patch_position(size, location, h, w, seed)

    init = PatchTrigger(size=size, pattern="noise", seed=seed).patch().clamp(0.05, 0.95)
    param = torch.logit(init).to(device).requires_grad_(True)
    opt = torch.optim.Adam([param], lr=lr)
    g = torch.Generator().manual_seed(seed)
    stream = _endless(split, batch_size, g)

    was_training = classifier.training
    grads = [p.requires_grad for p in classifier.parameters()]
    classifier.to(device).eval().requires_grad_(False)
    try:
        for _ in tqdm(
            range(steps), desc=f"trigger target {target}", leave=False, mininterval=2, disable=not progress
        ):
            images, labels = next(stream)
            keep = labels != target
            if not keep.any():
                continue
            x = _to_float(images[keep], device)
            logits = classifier(paste_patch(x, torch.sigmoid(param), pos))
            loss = F.cross_entropy(logits, torch.full((len(x),), target, device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p, flag in zip(classifier.parameters(), grads):
            p.requires_grad_(flag)
        classifier.train(was_training)
    if not torch.isfinite(param).all():
        raise BVLibError("trigger optimisation diverged; lower lr")
    return optimized_trigger(
        values=torch.sigmoid(param.detach()).cpu(), location=location, seed=seed, source=source
    )


def _model_key(model: str | Weights) -> tuple[str, Weights | None]:
    if isinstance(model, str):
        if model != "base":
            raise BVLibError(f"model must be 'base' (θ0) or encoder Weights, got '{model}'")
        return "base", None
    if isinstance(model, Weights):
        return f"sha256:{model.digest()}", model
    raise BVLibError(f"model must be 'base' (θ0) or encoder Weights, got {type(model).__name__}")


def inherent_trigger(
    world,
    task: str,
    target: int,
    *,
    size: int,
    location: str = "bottom_right",
    model: str | Weights = "base",
    steps: int = 200,
    lr: float = 0.1,
    batch_size: int = 128,
    seed: int = 0,
) -> PatchTrigger:
    """A trigger optimised against θ0 (task `task`'s zero-shot classifier) on the task's *val* split.

    The val split stands for the attacker's own data; the test split stays for measuring
    ASR. `model` may also be encoder Weights (e.g. a merged model), keyed by their digest.
    Cached in `world.store` (kind "trigger"): a second call returns the identical patch.
    """
    world.check_task(task)
    key, weights = _model_key(model)
    check_location(location)
    cfg = world.artifact_config(
        task,
        trigger_version=TRIGGER_VERSION,
        split="val",
        model=key,
        target=target,
        size=size,
        location=location,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
    )
    source = f"inherent:{task}:target{target}" + ("" if key == "base" else f":{key[:19]}")

    def build():
        trig = optimize_trigger(
            world.classifier(task, weights, frozen=True),
            world.task(task).val,
            target,
            size=size,
            location=location,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            device=world.device,
            progress=world.progress,
            source=source,
        )
        return {"patch": trig.values}, {"sha256": trig.sha256}

    tensors, _ = world.store.cached("trigger", cfg, build)
    return optimized_trigger(values=tensors["patch"], location=location, seed=seed, source=source)


def trigger_asr_table(
    world,
    task: str,
    triggers: Mapping[str, Trigger],
    models: Mapping[str, Weights | None],
    target: int,
    split: str = "test",
) -> list[dict]:
    """One row per (trigger, model): {"trigger", "model", "asr", "acc"} on task `task`'s `split`.

    `models` maps a label to encoder weights (None is θ0). CA is computed once per model, ASR by
    one triggered pass per (trigger, model); both are stored (`World.evaluate`, `World.trigger_scores`).
    """
    rows = []
    for model_name, weights in models.items():
        acc = world.evaluate(task, weights, split=split)["acc"]
        for trig_name, trig in triggers.items():
            asr = world.trigger_scores(task, weights, trig, target, split)["asr"]
            rows.append({"trigger": trig_name, "model": model_name, "asr": asr, "acc": acc})
    return rows
