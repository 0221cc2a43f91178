"""Defenses against backdoors in model merging, each one operation on the merge.

- **IBVS** (Injection Backdoor Vector Subtraction; the paper's defense). The defender, knowing nothing
  of the attack, implants its *own* backdoor (a small white square) in a task it controls, takes that
  Backdoor Vector BV = θ_backdoored − θ_clean, and subtracts it *during* merging, at the merge's own
  scale: `ibvs_vector` makes the BV, `merge_with_ibvs` merges −strength·BV as one more task vector.
- **TBAR** (backdoor unlearning by linear task decomposition, 2025). The trigger's task vector is
  estimated by fine-tuning the suspect model on triggered images labelled with the target class and
  negated: θ_clean ≈ θ − α·τ_trigger. The trigger is known, or reverse-engineered per candidate
  target class (the suspected target is the one whose reverse-engineered trigger works best): `tbar`.
- **DAM** (Defense-Aware Merging; Yang et al., ICLR 2025, as its reference code in FusionBench's
  "safe concrete task arithmetic" runs it): one per-coordinate concrete mask shared by the task
  vectors, learnt on unlabeled images with an entropy objective on clean images and on images with
  per-task universal adversarial perturbations: `dam`.

All three work on flat `Weights`; merges are merged *task vectors* τ_merged (add θ0 for a model), as
`bvlib.merging.merge` returns.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

from bvlib.data import Split, iterate_batches
from bvlib.errors import BVLibError
from bvlib.evaluation import attack_success_rate
from bvlib.merging import _real, merge, sparse_backdoor_vector
from bvlib.training import TrainConfig, _autocast, _to_float, finetune
from bvlib.trigger_optimization import inherent_trigger
from bvlib.triggers import PatchTrigger, Trigger, check_location, digest
from bvlib.weights import Layout, Weights, apply_vector, backdoor_vector, stack

TBAR_VERSION = 1  # bump to invalidate stored TBAR trigger-task fine-tunes after a change in how they are made
ALPHA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0)  # TBAR's alpha="auto" sweep


# input checks ---------------------------------------------------------------------------------
def _check_weights(world, weights, what: str = "weights") -> Weights:
    if not isinstance(weights, Weights):
        raise BVLibError(f"{what} must be Weights (a flat encoder vector), got {type(weights).__name__}")
    world.layout.check_same(weights.layout, f"{what} and the world's encoder")
    return weights.check_finite(what)


def _pos_int(name: str, value, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise BVLibError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _check_target(world, task: str, target) -> int:
    n = world.task(task).n_classes
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < n:
        raise BVLibError(f"target class {target!r} is out of range for task '{task}' with {n} classes")
    return target


def _vector_list(vectors, what: str = "task vectors") -> list[Weights]:
    if isinstance(vectors, Mapping):
        vectors = list(vectors.values())
    if isinstance(vectors, Weights) or not isinstance(vectors, Sequence):
        raise BVLibError(f"expected a list (or dict) of Weights as {what}, got {type(vectors).__name__}")
    if not vectors:
        raise BVLibError(f"need at least one of the {what} to merge, got none")
    if not all(isinstance(v, Weights) for v in vectors):
        raise BVLibError(f"every one of the {what} must be Weights")
    return list(vectors)


def _image_side(world) -> int:
    return int(world.preset["data"]["image_size"])


# IBVS -----------------------------------------------------------------------------------------
def ibvs_trigger(world, size: int | None = None, location: str = "bottom_right") -> PatchTrigger:
    """The defender's fixed trigger: a solid white square, by default of the preset's patch size.

    The size follows the preset's convention for patch triggers (4 px on 32 px in the mini world,
    22 px on 224 px = 1% of the image at paper scale), not anything known about an attack.
    """
    return PatchTrigger(size=size or world.badnets().trigger.size, location=location, pattern="solid", color=(1.0, 1.0, 1.0))


def ibvs_vector(world, task: str | None = None, *, trigger: PatchTrigger | None = None, target: int = 0, seed: int = 0,
                seeds: Sequence[int] | None = None, **train_overrides) -> Weights:
    """The defender's injection Backdoor Vector: BV = θ_backdoored − θ_clean on the defender's task.

    `task` is the defender's own task (default: the world's first); both fine-tunes start from θ0 with
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
        return backdoor_vector(world.finetune(task, poison=poison, seed=s, **train_overrides), world.finetune(task, seed=s, **train_overrides))

    if seeds is None or len(seeds) == 1:
        return one(seed if seeds is None else seeds[0])
    return sparse_backdoor_vector([one(s) for s in seeds], combine="rescale")


def merge_with_ibvs(task_vectors: Sequence[Weights] | Mapping[str, Weights], method: str, ibvs_bv: Weights, strength: float = 1.0,
                    **merge_params) -> Weights:
    """The merge with the defender's BV subtracted at the merge's own scale: merge(τ_1..τ_K, −strength·BV).

    The defender's −BV enters the merge as one more task vector, so it gets what every task vector
    gets: task arithmetic scales it by λ (subtracting 1·BV after a λ = 0.3 merge would remove ~3× what
    any attacker's vector keeps), TIES trims it and lets it vote in the sign election, DARE drops and
    rescales it. strength = 0 is the plain merge.
    """
    vectors = _vector_list(task_vectors)
    if not isinstance(ibvs_bv, Weights):
        raise BVLibError(f"ibvs_bv must be Weights (a Backdoor Vector), got {type(ibvs_bv).__name__}")
    vectors[0].layout.check_same(ibvs_bv.layout, "task vectors and the IBVS BV")
    strength = _real("strength", strength, 0)
    if strength == 0:
        return merge(vectors, method, **merge_params)
    return merge(vectors + [-strength * ibvs_bv], method, **merge_params)


# TBAR -----------------------------------------------------------------------------------------
@torch.no_grad()
def _trigger_scores(classifier, split, trigger: Trigger, target: int, device: torch.device) -> tuple[float, float]:
    """(ASR, mean probability of `target` on the images not labelled `target`) of a trigger on `split`."""
    classifier.to(device).eval()
    preds, probs, labels = [], [], []
    for images, y in iterate_batches(split, 1024, shuffle=False):
        p = classifier(trigger.apply(_to_float(images, device))).float().softmax(-1)
        preds.append(p.argmax(-1).cpu())
        probs.append(p[:, target].cpu())
        labels.append(y)
    preds, probs, labels = torch.cat(preds), torch.cat(probs), torch.cat(labels)
    asr = attack_success_rate(preds, labels, target, "images")
    return asr, float(probs[labels != target].mean())


@torch.no_grad()
def _most_predicted(classifier, split, trigger: Trigger, device: torch.device) -> int:
    counts = torch.zeros(classifier.head.shape[0], device=device)
    classifier.to(device).eval()
    for images, _ in iterate_batches(split, 1024, shuffle=False):
        counts += torch.bincount(classifier(trigger.apply(_to_float(images, device))).argmax(-1), minlength=len(counts))
    return int(counts.argmax())


def suspect_target(world, weights: Weights, task: str, *, targets: Sequence[int] | None = None, size: int | None = None,
                   location: str = "bottom_right", steps: int = 100, seed: int = 0) -> tuple[Trigger, int, dict[int, float]]:
    """Reverse-engineer a patch per candidate target class and pick the one that works best.

    For every class of `targets` (default: all classes of the task) a `size` px patch at `location`
    (default: the preset's patch size) is optimised against the model `weights` on the task's val
    split (`inherent_trigger` with model=weights: cached, keyed by the weights' digest). The suspected
    target is the class whose trigger reaches the highest ASR on val, ties broken by the mean
    probability of the class. Returns (its trigger, the target, {class: ASR on val}).
    """
    world.check_task(task)
    check_location(location)
    size = _pos_int("trigger size", size if size is not None else world.badnets().trigger.size)
    targets = list(range(world.task(task).n_classes)) if targets is None else [_check_target(world, task, t) for t in targets]
    if not targets:
        raise BVLibError("need at least one candidate target class")
    clf = world.classifier(task, weights)
    val = world.task(task).val
    best, scores = None, {}
    for t in tqdm(targets, desc=f"reverse-engineer {task}", leave=False, disable=not world.progress):
        trig = inherent_trigger(world, task, t, size=size, location=location, model=weights, steps=steps, seed=seed)
        asr, prob = _trigger_scores(clf, val, trig, t, world.device)
        scores[t] = asr
        if best is None or (asr, prob) > best[0]:
            best = ((asr, prob), trig, t)
    return best[1], best[2], scores


def trigger_task_model(world, weights: Weights, task: str, trigger: Trigger, target: int, *, steps: int, clean_share: float = 0.0,
                       seed: int = 0) -> Weights:
    """θ_after: `weights` fine-tuned on the "trigger task": triggered val images labelled `target`.

    A `clean_share` of each batch may stay clean with its true label (TBAR's mixed clean/triggered
    variant; in the mini world it removed less of the backdoor for the clean accuracy it kept than
    pure triggered data with a smaller α, hence the default 0). The preset's fine-tuning recipe (lr, batch, grad clip,
    warm-up capped at steps / 4) with `steps` steps and no weight decay, so that θ_after − θ holds no
    shrinkage term. Cached in `world.store` (kind "tbar") under the digest of `weights`, the
    trigger, target, clean share, schedule and seed.
    """
    recipe = dict(world.preset["finetune"])
    cfg = TrainConfig(**(recipe | {"steps": steps, "seed": seed, "weight_decay": 0.0, "warmup_steps": min(recipe.get("warmup_steps", 0), steps // 4)}))
    key = world.artifact_config(task, tbar_version=TBAR_VERSION, split="val", weights=f"sha256:{digest(weights.flat)}",
                                trigger=trigger.config(), target=target, clean_share=clean_share, train=cfg.config())

    def loss(classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = len(x) - round(clean_share * len(x))  # triggered images first, then clean ones
        xs = torch.cat([trigger.apply(x[:k]), x[k:]])
        ys = torch.cat([torch.full_like(y[:k], target), y[k:]])
        return F.cross_entropy(classifier(xs), ys)

    def build():
        t = time.perf_counter()
        after = finetune(world.classifier(task, weights), world.task(task).val, cfg, device=world.device, desc=f"tbar {task} target {target}",
                         progress=world.progress, loss_fn=loss)
        return {"flat": after.flat}, {"layout": after.layout.to_json(), "seconds": time.perf_counter() - t}

    tensors, meta = world.store.cached("tbar", key, build)
    return Weights(tensors["flat"], Layout.from_json(meta["layout"])).to(world.device)


def tbar(world, weights: Weights, task: str, *, trigger: Trigger | None = None, target: int | None = None, alpha: float | str = 1.0,
         steps: int | None = None, clean_share: float = 0.0, seed: int = 0, trigger_size: int | None = None, trigger_location: str = "bottom_right",
         trigger_steps: int = 100, auto_asr: float = 0.1) -> tuple[Weights, dict]:
    """TBAR: unlearn a backdoor by negating the estimated trigger task vector, θ − α·τ_trigger.

    `weights` is the suspect encoder (a backdoored fine-tune or a merged model θ0 + τ_merged) and
    `task` the task whose head and *val* split the defender uses (the test split is never touched).
    τ_trigger = θ_after − θ, with θ_after from `trigger_task_model` (`steps` default: the preset's
    fine-tuning steps; `clean_share` of each batch clean, the rest triggered and labelled `target`).

    Known attack: pass the attacker's `trigger` and `target` (with a trigger and no target, the
    class most predicted on triggered val images is taken). Unknown attack (`trigger=None`): a patch
    of `trigger_size` px at `trigger_location` is reverse-engineered for each class (or for `target`
    only) by `suspect_target`, the best one is the suspected attack, and TBAR proceeds with it.

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
    clean_share, auto_asr = _real("clean_share", clean_share, 0, 1, hi_open=True), _real("auto_asr", auto_asr, 0, 1)
    steps = _pos_int("steps", steps if steps is not None else int(world.preset["finetune"]["steps"]))
    if target is not None:
        _check_target(world, task, target)
    weights = weights.to(world.device)
    info: dict = {"task": task, "mode": "known" if trigger is not None else "unknown"}
    if trigger is None:
        trigger, target, info["candidates"] = suspect_target(world, weights, task, targets=None if target is None else [target],
                                                             size=trigger_size, location=trigger_location, steps=_pos_int("trigger_steps", trigger_steps),
                                                             seed=seed)
    else:
        if not hasattr(trigger, "apply") or not hasattr(trigger, "config"):
            raise BVLibError(f"trigger must be a PatchTrigger or an OptimizedTrigger, got {type(trigger).__name__}")
        side = _image_side(world)
        trigger.check_fits(side, side)
        if target is None:
            target = _most_predicted(world.classifier(task, weights), world.task(task).val, trigger, world.device)
            info["target_from"] = "most predicted class on triggered val images"
    tau = trigger_task_model(world, weights, task, trigger, target, steps=steps, clean_share=clean_share, seed=seed) - weights
    if alpha == "auto":
        val = world.task(task).val
        info["val_asr"] = {a: _trigger_scores(world.classifier(task, apply_vector(weights, tau, -a)), val, trigger, target, world.device)[0]
                           for a in ALPHA_GRID}
        alpha = next((a for a in ALPHA_GRID if info["val_asr"][a] <= auto_asr), min(ALPHA_GRID, key=lambda a: (info["val_asr"][a], a)))
    info |= {"trigger": trigger.config(), "target": target, "alpha": alpha, "steps": steps, "clean_share": clean_share, "seed": seed,
             "tau_norm": tau.norm()}
    return apply_vector(weights, tau, -alpha), info


# DAM ------------------------------------------------------------------------------------------
def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the predicted class distributions (AdaMerging's unlabeled objective)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def _segment_mean(mask: torch.Tensor, numels: list[int], counts: torch.Tensor) -> torch.Tensor:
    """[D] -> [D]: each coordinate's tensor-wise mean of `mask` (deterministic, unlike index_add_ on CPU)."""
    means = torch.stack([chunk.mean() for chunk in mask.split(numels)])
    return means.repeat_interleave(counts)


def dam(world, task_vectors: Mapping[str, Weights], *, lam: float = 0.3, steps: int = 200, lr: float = 1e-2,
        temperature: float = 0.5, init: float = 0.0, batch_size: int = 16, adv_lr: float = 1e-3, adv_weight: float = 0.1,
        seed: int = 0, progress: bool = False) -> tuple[Weights, dict]:
    """Defense-Aware Merging (Yang et al., ICLR 2025) as its reference code runs it on task arithmetic.

    `task_vectors` maps task names of the world to their task vectors τ_t (any may be backdoored; the
    defender does not know which). One mask m over the D coordinates, shared by every τ_t, is a
    concrete (relaxed Bernoulli) variable with logits starting at `init` (0) and `temperature` 0.5;
    each sampled mask is divided by its mean inside every parameter tensor, and the merge is
    θ(m) = θ0 + lam · Σ_t m ⊙ τ_t. Each of `steps` steps, on batches of `batch_size` unlabeled val
    images per task (labels are never read):

    1. perturbation: one Adam step (`adv_lr`) on a per-task universal additive perturbation δ_t (the
       whole image, starting at 0) that maximises the cross-entropy of the merge's predictions on x + δ_t
       against its own predictions on x;
    2. mask: one Adam step (`lr`) on Σ_t H(x) + `adv_weight` · H(clip(x + δ_t)), H the entropy of the
       merge's predictions, through a freshly sampled mask.

    The final mask is one more sample of the concrete mask, divided by its tensor-wise means, as the
    reference forms it. The reference runs 1000-2000 steps at lr 1e-3 (adv_lr 1e-4) on ViT-B-32; the
    mini world runs 10× fewer steps at 10× the rates, so the logits can move as far.

    Returns (τ_merged, info): info holds the final mask's share of coordinates above 0.5 ("kept_share"),
    how far the logits moved (mean |logit − init|, share beyond ±1), the perturbations' norms and the
    loss history.
    """
    if not isinstance(task_vectors, Mapping) or not task_vectors:
        raise BVLibError("task_vectors must be a non-empty dict {task name: task vector}")
    names = [world.check_task(t) for t in task_vectors]
    for t in names:
        _check_weights(world, task_vectors[t], f"task vector of '{t}'")
    lam, init = _real("lam", lam), _real("init", init)
    lr, adv_lr = _real("lr", lr, 0, lo_open=True), _real("adv_lr", adv_lr, 0)
    temperature, adv_weight = _real("temperature", temperature, 0, lo_open=True), _real("adv_weight", adv_weight, 0)
    steps, batch_size = _pos_int("steps", steps), _pos_int("batch_size", batch_size)

    dev, layout = world.device, world.layout
    total = stack([task_vectors[t].to(dev) for t in names]).sum(0)  # the mask is shared: only Σ τ_t matters
    theta0 = world.base_weights.flat.to(dev)
    numels, counts = list(layout.numels), torch.tensor(layout.numels, device=dev)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.full_like(total, init, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    side = _image_side(world)
    deltas = torch.zeros(len(names), 3, side, side, device=dev, requires_grad=True)
    opt_adv = torch.optim.Adam([deltas], lr=adv_lr)
    model = world.classifier(names[0]).eval().requires_grad_(False)
    heads = {t: world.head(t) for t in names}

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        """(a relaxed Bernoulli sample of the mask, reparameterised; the same divided by its tensor-wise means)."""
        u = torch.rand(total.shape, generator=gen).to(dev).clamp_(1e-6, 1 - 1e-6)
        m = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
        return m, m / _segment_mean(m, numels, counts).clamp_min(1e-12)

    def forward(flat: torch.Tensor, task: str, x: torch.Tensor) -> torch.Tensor:
        params = {f"encoder.{n}": v for n, v in Weights(flat, layout).state_dict().items()}
        params["head"] = heads[task]
        with _autocast(dev):
            return functional_call(model, params, (x,)).float()

    val = {t: world.task(t).val for t in names}

    def batch(t: str) -> torch.Tensor:
        split = val[t]
        idx = torch.randint(len(split), (batch_size,), generator=gen)
        x = split.images[idx] if isinstance(split, Split) else torch.stack([torch.as_tensor(split[i][0]) for i in idx.tolist()])
        return _to_float(x, dev)

    history = []
    for _ in tqdm(range(steps), desc="DAM", leave=False, disable=not progress):
        flat = theta0 + lam * sample()[1] * total
        # 1. the perturbations against the current merge (mask fixed)
        frozen = flat.detach()
        adv = 0.0
        for k, t in enumerate(names):
            x = batch(t)
            with torch.no_grad():
                own = forward(frozen, t, x).argmax(-1)
            adv = adv - F.cross_entropy(forward(frozen, t, x + deltas[k]), own)
        opt_adv.zero_grad(set_to_none=True)
        adv.backward()
        opt_adv.step()
        # 2. the mask: low entropy on clean images and on perturbed ones
        nat = reg = 0.0
        for k, t in enumerate(names):
            x = batch(t)
            xs = torch.cat([x, (x + deltas[k].detach()).clamp(0, 1)])
            out = forward(flat, t, xs)
            nat, reg = nat + _entropy(out[: len(x)]), reg + _entropy(out[len(x):])
        loss = nat + adv_weight * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"entropy": nat.item() / len(names), "entropy_perturbed": reg.item() / len(names), "adv": -adv.item() / len(names)})

    with torch.no_grad():
        raw, final = sample()
        out = lam * final * total
        moved = (logits - init).abs()
    info = {"tasks": names, "lam": lam, "steps": steps, "lr": lr, "temperature": temperature, "adv_weight": adv_weight, "seed": seed,
            "kept_share": float((raw > 0.5).float().mean()), "logit_shift": float(moved.mean()), "logits_beyond_1": float((moved > 1).float().mean()),
            "delta_norms": {t: float(deltas[k].detach().norm()) for k, t in enumerate(names)}, "mask": final.cpu(), "history": history}
    return Weights(out, layout), info
