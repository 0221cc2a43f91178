"""TBAR (backdoor unlearning by linear task decomposition, 2025): θ_clean ≈ θ − α·τ_trigger, the trigger
known or reverse-engineered per candidate target class."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bvlib.attacks.inherent import inherent_trigger
from bvlib.data import iterate_batches
from bvlib.defenses.common import _check_target, _check_weights, _image_side, _pos_int
from bvlib.errors import BVLibError
from bvlib.evaluation import eval_batch_size
from bvlib.merging import _real
from bvlib.training import _to_float, finetune
from bvlib.triggers import Trigger, check_location
from bvlib.weights import Layout, Weights, apply_vector

TBAR_VERSION = 1  # bump to invalidate stored TBAR trigger-task fine-tunes after a change in how they are made
ALPHA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0)  # TBAR's alpha="auto" sweep


# TBAR -----------------------------------------------------------------------------------------
@torch.no_grad()
def _most_predicted(classifier, split, trigger: Trigger, device: torch.device) -> int:
    counts = torch.zeros(classifier.head.shape[0], device=device)
    classifier.to(device).eval()
    for images, _ in iterate_batches(split, eval_batch_size(device), shuffle=False):
        counts += torch.bincount(
            classifier(trigger.apply(_to_float(images, device))).argmax(-1), minlength=len(counts)
        )
    return int(counts.argmax())


SEARCH_LOCATIONS = (
    "bottom_right",
    "bottom_left",
    "top_right",
    "top_left",
    "center",
)  # where an unknown trigger is searched


def search_sizes(world) -> tuple[int, ...]:
    """The two patch sides an unknown trigger is searched at: the preset's patch size and half of it."""
    size = world.badnets().trigger.size
    return tuple(dict.fromkeys((size, max(1, size // 2))))


def search_patches(
    world,
    weights: Weights | None,
    task: str,
    *,
    targets: Sequence[int] | None = None,
    size: int | Sequence[int] | None = None,
    location: str | Sequence[str] | None = None,
    steps: int = 100,
    screen_steps: int | None = None,
    batch_size: int = 128,
    screen_images: int | None = None,
    seed: int = 0,
) -> dict[int, dict]:
    """The best patch for each candidate target class of a model, told neither where it sits nor its size.

    For every class of `targets` (default: all classes of the task), a patch is optimised against the
    model `weights` (θ0 if None) on the task's val split (`inherent_trigger`: cached, keyed by the
    weights' digest) at every placement of the search: each `location` (default: the four corners
    and the centre, `SEARCH_LOCATIONS`) × each `size` (default: `search_sizes`, the preset's patch
    size and half of it), `screen_steps` steps each (default steps // 5); the placement whose patch
    reaches the highest val ASR is then optimised for `steps`. A single `size` and `location` make a
    told search (the oracle). `batch_size` images per optimisation step. `screen_images` (default:
    all) scores the screened patches on the first images of val only: most of a search is those
    scores, not the optimisation. Returns {class: {"trigger", "asr", "target_prob"}}, the refined
    patch scored on the whole val split.
    """
    world.check_task(task)
    locations = list(
        SEARCH_LOCATIONS if location is None else [location] if isinstance(location, str) else location
    )
    for loc in locations:
        check_location(loc)
    sizes = list(search_sizes(world) if size is None else [size] if isinstance(size, int) else size)
    sizes = [_pos_int("trigger size", s) for s in sizes]
    placements = [(loc, s) for s in sizes for loc in locations]
    if not placements:
        raise BVLibError("need at least one trigger location and size to search")
    steps = _pos_int("trigger steps", steps)
    screen = (
        steps
        if len(placements) == 1
        else _pos_int("screen steps", screen_steps if screen_steps is not None else max(1, steps // 5))
    )
    targets = (
        list(range(world.task(task).n_classes))
        if targets is None
        else [_check_target(world, task, t) for t in targets]
    )
    if not targets:
        raise BVLibError("need at least one candidate target class")
    model = "base" if weights is None else weights

    def scored(t: int, loc: str, s: int, n: int, images: int | None = None):
        trig = inherent_trigger(
            world, task, t, size=s, location=loc, model=model, steps=n, batch_size=batch_size, seed=seed
        )
        r = world.trigger_scores(task, weights, trig, t, split="val", images=images)
        return (r["asr"], r["target_prob"]), trig

    screened = screen_images if screen < steps else None
    found = {}
    for t in tqdm(targets, desc=f"reverse-engineer {task}", leave=False, disable=not world.progress):
        (score, trig), (loc, s) = max(
            ((scored(t, loc, s, screen, screened), (loc, s)) for loc, s in placements),
            key=lambda x: x[0][0],
        )
        if screen < steps:
            score, trig = scored(t, loc, s, steps)
        found[t] = {"trigger": trig, "asr": score[0], "target_prob": score[1]}
    return found


def suspect_target(
    world,
    weights: Weights,
    task: str,
    **search,
) -> tuple[Trigger, int, dict[int, float]]:
    """The class whose reverse-engineered patch (`search_patches`, same arguments) reaches the highest
    val ASR, ties broken by the mean probability of the class. Returns (its trigger, the target,
    {class: ASR on val})."""
    found = search_patches(world, weights, task, **search)
    target = max(found, key=lambda t: (found[t]["asr"], found[t]["target_prob"]))
    return found[target]["trigger"], target, {t: f["asr"] for t, f in found.items()}


def trigger_task_model(
    world,
    weights: Weights,
    task: str,
    trigger: Trigger,
    target: int,
    *,
    steps: int,
    clean_share: float = 0.0,
    seed: int = 0,
) -> Weights:
    """θ_after: `weights` fine-tuned on the "trigger task": triggered val images labelled `target`.

    A `clean_share` of each batch may stay clean with its true label (TBAR's mixed clean/triggered
    variant; in the mini world it removed less of the backdoor for the clean accuracy it kept than
    pure triggered data with a smaller α, hence the default 0). The preset's fine-tuning recipe (lr, batch,
    grad clip,
    warm-up capped at steps / 4) with `steps` steps and no weight decay, so that θ_after − θ holds no
    shrinkage term. Cached in `world.store` (kind "tbar") under the digest of `weights`, the
    trigger, target, clean share, schedule and seed.
    """
    recipe = world.preset.finetune
    cfg = dataclasses.replace(
        recipe, steps=steps, seed=seed, weight_decay=0.0, warmup_steps=min(recipe.warmup_steps, steps // 4)
    )
    key = world.artifact_config(
        task,
        tbar_version=TBAR_VERSION,
        split="val",
        weights=f"sha256:{weights.digest()}",
        trigger=trigger.config(),
        target=target,
        clean_share=clean_share,
        train=cfg.config(),
    )

    def loss(classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = len(x) - round(clean_share * len(x))  # triggered images first, then clean ones
        xs = torch.cat([trigger.apply(x[:k]), x[k:]])
        ys = torch.cat([torch.full_like(y[:k], target), y[k:]])
        return F.cross_entropy(classifier(xs), ys)

    def build():
        after = finetune(
            world.classifier(task, weights),
            world.task(task).val,
            cfg,
            device=world.device,
            desc=f"tbar {task} target {target}",
            progress=world.progress,
            loss_fn=loss,
        )
        return {"flat": after.flat}, {"layout": after.layout.to_json()}

    tensors, meta = world.store.cached("tbar", key, build)
    return Weights(tensors["flat"], Layout.from_json(meta["layout"])).to(world.device)


def tbar(
    world,
    weights: Weights,
    task: str,
    *,
    trigger: Trigger | None = None,
    target: int | None = None,
    alpha: float | str = 1.0,
    steps: int | None = None,
    clean_share: float = 0.0,
    seed: int = 0,
    trigger_size: int | None = None,
    trigger_location: str | None = None,
    trigger_steps: int = 100,
    screen_steps: int = 3,
    screen_images: int | None = 128,
    search_batch_size: int = 32,
    auto_asr: float = 0.1,
) -> tuple[Weights, dict]:
    """TBAR: unlearn a backdoor by negating the estimated trigger task vector, θ − α·τ_trigger.

    `weights` is the suspect encoder (a backdoored fine-tune or a merged model θ0 + τ_merged) and
    `task` the task whose head and *val* split the defender uses (the test split is never touched).
    τ_trigger = θ_after − θ, with θ_after from `trigger_task_model` (`steps` default: the preset's
    fine-tuning steps; `clean_share` of each batch clean, the rest triggered and labelled `target`).

    Known attack: pass the attacker's `trigger` and `target` (with a trigger and no target, the
    class most predicted on triggered val images is taken). Unknown attack (`trigger=None`): a patch
    is reverse-engineered for each class (or for `target` only) by `suspect_target`, searched over the
    four corners, the centre and two sizes (`trigger_size` / `trigger_location` restrict the search to
    one: a defender told where the trigger is), the best one is the suspected attack, and TBAR
    proceeds with it. Each placement is screened with `screen_steps` steps and scored on the first
    `screen_images` val images (None: all), the best one optimised for `trigger_steps`, each step
    on `search_batch_size` images (measured on three merges of the cpu world against screens of
    `trigger_steps` // 5 steps scored on all of val and batches of 128: the same suspected class
    and placement, its val ASR 1-2 points lower, in a quarter of the time).

    alpha="auto" picks the smallest α of `ALPHA_GRID` whose cleaned model has a val ASR (of the
    trigger used, known or reverse-engineered) at most `auto_asr`, else the α with the lowest val
    ASR: the least negation that does the job, so the least clean accuracy lost. TBAR scales α by
    such a sweep; a fixed α = 1 can overshoot when τ_trigger is long (as in the mini world).

    Returns (cleaned weights, info): info says the mode, trigger config, target, alpha, steps, the
    norm of τ_trigger, for alpha="auto" the val ASR per α, and for an unknown attack each
    candidate class's reverse-engineered val ASR.
    """
    world.check_task(task)
    _check_weights(world, weights, "weights")
    if alpha != "auto":
        alpha = _real("alpha", alpha, 0)
    clean_share, auto_asr = (
        _real("clean_share", clean_share, 0, 1, hi_open=True),
        _real("auto_asr", auto_asr, 0, 1),
    )
    steps = _pos_int("steps", steps if steps is not None else world.preset.finetune.steps)
    if target is not None:
        _check_target(world, task, target)
    weights = weights.to(world.device)
    info: dict = {"task": task, "mode": "known" if trigger is not None else "unknown"}
    if trigger is None:
        trigger, target, info["candidates"] = suspect_target(
            world,
            weights,
            task,
            targets=None if target is None else [target],
            size=trigger_size,
            location=trigger_location,
            steps=_pos_int("trigger_steps", trigger_steps),
            screen_steps=screen_steps,
            screen_images=screen_images,
            batch_size=search_batch_size,
            seed=seed,
        )
    else:
        if not hasattr(trigger, "apply") or not hasattr(trigger, "config"):
            raise BVLibError(f"trigger must be a PatchTrigger, got {type(trigger).__name__}")
        side = _image_side(world)
        trigger.check_fits(side, side)
        if target is None:
            target = _most_predicted(
                world.classifier(task, weights, frozen=True), world.task(task).val, trigger, world.device
            )
            info["target_from"] = "most predicted class on triggered val images"
    tau = (
        trigger_task_model(
            world, weights, task, trigger, target, steps=steps, clean_share=clean_share, seed=seed
        )
        - weights
    )
    if alpha == "auto":
        info["val_asr"] = {
            a: world.trigger_scores(task, apply_vector(weights, tau, -a), trigger, target, split="val")["asr"]
            for a in ALPHA_GRID
        }
        alpha = next(
            (a for a in ALPHA_GRID if info["val_asr"][a] <= auto_asr),
            min(ALPHA_GRID, key=lambda a: (info["val_asr"][a], a)),
        )
    info |= {
        "trigger": trigger.config(),
        "target": target,
        "alpha": alpha,
        "steps": steps,
        "clean_share": clean_share,
        "seed": seed,
        "tau_norm": tau.norm(),
    }
    return apply_vector(weights, tau, -alpha), info
