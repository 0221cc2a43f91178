"""Defenses against backdoors in model merging, each one operation on the merge.

- **IBVS** (Injection Backdoor Vector Subtraction; Pawlak et al. 2025, the paper's defense). The
  defender, knowing nothing of the attack, implants its *own* backdoor (a small white square) in a
  task it controls, takes that Backdoor Vector BV = θ_backdoored − θ_clean, and subtracts it, scaled,
  from the merge: `ibvs_vector` makes the BV, `merge_with_ibvs` merges with it subtracted.
- **TBAR** (backdoor unlearning by linear task decomposition, 2025). The trigger's task vector is
  estimated by fine-tuning the suspect model on triggered images labelled with the target class and
  negated: θ_clean ≈ θ − α·τ_trigger. The trigger is known, or reverse-engineered per candidate
  target class (the suspected target is the one whose reverse-engineered trigger works best): `tbar`.
- **DAM** (Defense-Aware Merging; Yang et al., ICLR 2025). Two masks over the task vectors are learnt
  on unlabeled data: a task-shared mask (keep what agrees with each task's own model) and a
  backdoor-detection mask (remove what makes the merge sensitive to adversarial input perturbations):
  `dam`, a simplified version documented there.

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
from bvlib.merging import _real, merge
from bvlib.training import TrainConfig, _autocast, _to_float, finetune
from bvlib.trigger_optimization import Trigger, _digest, inherent_trigger
from bvlib.triggers import PatchTrigger, check_location, paste_patch, patch_position
from bvlib.weights import Layout, Weights, apply_vector, backdoor_vector, stack
from bvlib.world import VERSION

TBAR_VERSION = 1  # bump to invalidate stored TBAR trigger-task fine-tunes after a change in how they are made
IBVS_APPLY = ("merged", "per_task")
DAM_PERTURB = ("patch", "pgd")
DAM_GRANULARITY = ("coordinate", "tensor")
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
                **train_overrides) -> Weights:
    """The defender's injection Backdoor Vector: BV = θ_backdoored − θ_clean on the defender's task.

    `task` is the defender's own task (default: the world's first); both fine-tunes start from θ0 with
    the same seed and schedule (`train_overrides` go to `World.finetune`), the backdoored one with the
    preset's BadNets poisoning recipe (rate, mode, loss weight) but the defender's `trigger` (default
    `ibvs_trigger(world)`, a white square) and `target`. Both come from the store when made before.
    """
    task = world.check_task(task if task is not None else world.task_names[0])
    trigger = trigger if trigger is not None else ibvs_trigger(world)
    _check_target(world, task, target)
    poison = dataclasses.replace(world.badnets(), trigger=trigger, target=target)
    return backdoor_vector(world.finetune(task, poison=poison, seed=seed, **train_overrides), world.finetune(task, seed=seed, **train_overrides))


def merge_with_ibvs(task_vectors: Sequence[Weights] | Mapping[str, Weights], method: str, ibvs_bv: Weights, strength: float = 1.0, *,
                    apply: str = "merged", **merge_params) -> Weights:
    """Merged task vector with the defender's BV subtracted: merge(τ's) − strength · BV.

    apply="merged" (default) is what the paper describes: subtract the injected BV from the merged
    vector, after `method` (with `merge_params`) has merged the task vectors. apply="per_task"
    subtracts it from every task vector before merging instead (under task arithmetic that is
    lam · K · strength · BV in total, and TIES/DARE then trim or drop its coordinates with the rest).
    """
    vectors = _vector_list(task_vectors)
    if not isinstance(ibvs_bv, Weights):
        raise BVLibError(f"ibvs_bv must be Weights (a Backdoor Vector), got {type(ibvs_bv).__name__}")
    vectors[0].layout.check_same(ibvs_bv.layout, "task vectors and the IBVS BV")
    strength = _real("strength", strength, 0)
    if apply not in IBVS_APPLY:
        raise BVLibError(f"apply must be one of: {', '.join(IBVS_APPLY)}; got {apply!r}")
    if apply == "per_task":
        return merge([v - strength * ibvs_bv for v in vectors], method, **merge_params)
    return merge(vectors, method, **merge_params) - strength * ibvs_bv


# TBAR -----------------------------------------------------------------------------------------
@torch.no_grad()
def _trigger_scores(classifier, split, trigger: Trigger, target: int, device: torch.device) -> tuple[float, float]:
    """(ASR, mean probability of `target`) of a trigger on the images of `split` not labelled `target`."""
    classifier.to(device).eval()
    hits, prob, n = 0.0, 0.0, 0
    for images, labels in iterate_batches(split, 1024, shuffle=False):
        keep = labels != target
        if not keep.any():
            continue
        p = classifier(trigger.apply(_to_float(images[keep], device))).float().softmax(-1)
        hits += float((p.argmax(-1) == target).sum())
        prob += float(p[:, target].sum())
        n += int(keep.sum())
    if n == 0:
        raise BVLibError(f"no images outside target class {target}: the trigger cannot be scored")
    return hits / n, prob / n


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
    key = {"version": VERSION, "tbar_version": TBAR_VERSION, "base": world.base_key, "task": task, "data": world.preset["data"], "split": "val",
           "weights": f"sha256:{_digest(weights.flat)}", "trigger": trigger.config(), "target": target, "clean_share": clean_share,
           "train": cfg.config()}

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
def _kl(teacher_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student), mean over the batch."""
    return F.kl_div(logits.float().log_softmax(-1), teacher_probs, reduction="batchmean")


def dam(world, task_vectors: Mapping[str, Weights], *, lam: float = 0.3, steps: int = 30, alpha: float = 1.0, perturb: str = "patch",
        granularity: str = "tensor", lr: float = 0.1, init: float = 2.0, batch_size: int = 64, n_images: int = 256,
        attack_steps: int = 5, patch_size: int | None = None, patch_location: str = "bottom_right", eps: float = 8 / 255, seed: int = 0,
        progress: bool = False) -> tuple[Weights, dict]:
    """Defense-Aware Merging (Yang et al., ICLR 2025), simplified: two masks learnt on unlabeled val images.

    `task_vectors` maps task names of the world to their task vectors τ_t (any may be backdoored; the
    defender does not know which). Each τ_t gets two masks, logits relaxed through a sigmoid while
    training (one logit per parameter tensor, granularity="tensor", or per coordinate, "coordinate"):
    m_shared_t (keep, init logit +init) and m_backdoor_t (remove, init logit −init). The relaxed merge
    θ(m) = θ0 + lam · Σ_t m_shared_t ⊙ (1 − m_backdoor_t) ⊙ τ_t runs through the encoder with
    `torch.func.functional_call`, so gradients reach the logits. Each of `steps` rounds, on a batch
    of each task's unlabeled val images (labels are never read):

    1. perturbation: against the current merge, per task, maximise L_safe_t (below) over a universal
       patch (perturb="patch": `patch_size` px at `patch_location`, Adam on its pixels, warm-started
       round to round) or a per-image L∞ PGD perturbation of radius `eps` (perturb="pgd"), with
       `attack_steps` steps;
    2. task-shared mask: one Adam step on L_perf = mean_t KL(p_t(x) ‖ p_merged,t(x)), where p_t is
       task t's own fine-tuned model θ0 + τ_t (the agreement objective, without labels);
    3. backdoor-detection mask: one Adam step on L_perf + alpha · L_safe, L_safe = mean_t
       KL(p_t(x) ‖ p_merged,t(x ⊕ δ_t)): coordinates whose removal keeps the merge's predictions
       unchanged under the adversarial perturbation are pushed out.

    At the end both masks are thresholded at 0.5 and the merge is
    τ_merged = lam · Σ_t m_shared_t ⊙ (1 − m_backdoor_t) ⊙ τ_t (add θ0 for the model).

    Simplifications of the paper, plainly: DAM's meta-learning (inner/outer updates with its
    mask-specific regularisers and schedules) becomes one alternating Adam step per mask per round;
    the masks are relaxed by a plain sigmoid and thresholded once at the end (no straight-through or
    annealing); the perturbation is a single universal patch per task or a few PGD steps, not the
    paper's adversarial procedure; both losses use the individual models' predictions as soft
    targets on unlabeled val images. The default patch location is the presets' trigger corner.
    The default granularity is "tensor": per-coordinate masks cost 6 × K × D floats with Adam (too
    much at paper scale), and on the smoke world their thresholded masks kept ~95% of everything and
    did not lower the ASR, while per-tensor masks did.

    Returns (τ_merged, info): info holds the binary masks ("shared_mask", "backdoor_mask", float
    [K, units] in {0, 1}, rows in `info["tasks"]` order), per-task kept and backdoor-removed shares
    of coordinates, and the loss history.
    """
    if not isinstance(task_vectors, Mapping) or not task_vectors:
        raise BVLibError("task_vectors must be a non-empty dict {task name: task vector}")
    names = [world.check_task(t) for t in task_vectors]
    for t in names:
        _check_weights(world, task_vectors[t], f"task vector of '{t}'")
    if perturb not in DAM_PERTURB:
        raise BVLibError(f"perturb must be one of: {', '.join(DAM_PERTURB)}; got {perturb!r}")
    if granularity not in DAM_GRANULARITY:
        raise BVLibError(f"granularity must be one of: {', '.join(DAM_GRANULARITY)}; got {granularity!r}")
    lam, alpha = _real("lam", lam), _real("alpha", alpha, 0)
    lr, init, eps = _real("lr", lr, 0, lo_open=True), _real("init", init), _real("eps", eps, 0, 1)
    steps, batch_size, n_images = _pos_int("steps", steps), _pos_int("batch_size", batch_size), _pos_int("n_images", n_images)
    attack_steps = _pos_int("attack_steps", attack_steps)
    check_location(patch_location)
    side = _image_side(world)
    patch_size = _pos_int("patch_size", patch_size if patch_size is not None else max(1, side // 8))
    patch_pos = patch_position(patch_size, patch_location, side, side, seed)

    dev = world.device
    layout = world.layout
    taus = stack([task_vectors[t].to(dev) for t in names])  # [K, D]
    theta0 = world.base_weights.flat.to(dev)
    K, D = taus.shape
    if granularity == "tensor":
        seg = torch.repeat_interleave(torch.arange(len(layout.names), device=dev), torch.tensor(layout.numels, device=dev))
        expand = lambda m: m[:, seg]  # [K, tensors] -> [K, D]
        units = len(layout.names)
    else:
        expand = lambda m: m
        units = D
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    shared_logits = torch.full((K, units), init, device=dev, requires_grad=True)
    backdoor_logits = torch.full((K, units), -init, device=dev, requires_grad=True)
    opt_shared = torch.optim.Adam([shared_logits], lr=lr)
    opt_backdoor = torch.optim.Adam([backdoor_logits], lr=lr)

    model = world.classifier(names[0]).eval().requires_grad_(False)
    heads = {t: world.head(t) for t in names}

    def forward(flat: torch.Tensor, task: str, x: torch.Tensor) -> torch.Tensor:
        params = {f"encoder.{n}": v for n, v in Weights(flat, layout).state_dict().items()}
        params["head"] = heads[task]
        with _autocast(dev):
            return functional_call(model, params, (x,)).float()

    def merged(ms: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
        return theta0 + lam * (expand(ms * (1 - mb)) * taus).sum(0)

    # unlabeled data: up to n_images val images per task, and the individual models' soft predictions on them
    images, teacher = {}, {}
    with torch.no_grad():
        for k, t in enumerate(names):
            val = world.task(t).val
            idx = torch.randperm(len(val), generator=gen)[:n_images]
            x = val.images[idx] if isinstance(val, Split) else torch.stack([torch.as_tensor(val[i][0]) for i in idx.tolist()])
            images[t] = x.to(dev)
            own = theta0 + taus[k]
            teacher[t] = torch.cat([forward(own, t, _to_float(b, dev)).softmax(-1) for b in images[t].split(1024)])
    patches = {t: torch.logit(PatchTrigger(size=patch_size, pattern="noise", seed=seed + k).patch(dev).clamp(0.05, 0.95)).requires_grad_(True)
               for k, t in enumerate(names)}
    opt_patch = torch.optim.Adam(list(patches.values()), lr=0.1)

    def perturbed(t: str, x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        if perturb == "patch":
            return paste_patch(x, torch.sigmoid(patches[t]), patch_pos)
        return (x + delta).clamp(0, 1)

    history = []
    for _ in tqdm(range(steps), desc="DAM", leave=False, disable=not progress):
        batch = {}
        for t in names:
            pick = torch.randint(len(images[t]), (min(batch_size, len(images[t])),), generator=gen)
            batch[t] = (_to_float(images[t][pick.to(images[t].device)], dev), teacher[t][pick.to(dev)])
        # 1. adversarial perturbation against the current (relaxed) merge
        with torch.no_grad():
            flat = merged(torch.sigmoid(shared_logits), torch.sigmoid(backdoor_logits))
        deltas: dict[str, torch.Tensor | None] = dict.fromkeys(names)
        for _ in range(attack_steps):
            if perturb == "patch":
                loss = -sum(_kl(p, forward(flat, t, perturbed(t, x, None))) for t, (x, p) in batch.items())
                opt_patch.zero_grad(set_to_none=True)
                loss.backward()
                opt_patch.step()
            else:
                for t, (x, p) in batch.items():
                    d = deltas[t] if deltas[t] is not None else torch.zeros_like(x)
                    d.requires_grad_(True)
                    (g,) = torch.autograd.grad(_kl(p, forward(flat, t, (x + d).clamp(0, 1))), d)
                    deltas[t] = (d + 2.5 * eps / attack_steps * g.sign()).clamp(-eps, eps).detach()
        # 2. task-shared mask: agreement with each task's own model
        flat = merged(torch.sigmoid(shared_logits), torch.sigmoid(backdoor_logits).detach())
        perf = sum(_kl(p, forward(flat, t, x)) for t, (x, p) in batch.items()) / K
        opt_shared.zero_grad(set_to_none=True)
        perf.backward()
        opt_shared.step()
        # 3. backdoor-detection mask: agreement, and no prediction change under the perturbation
        flat = merged(torch.sigmoid(shared_logits).detach(), torch.sigmoid(backdoor_logits))
        with torch.no_grad():
            xs = {t: perturbed(t, x, deltas[t]).detach() for t, (x, _) in batch.items()}
        perf2 = sum(_kl(p, forward(flat, t, x)) for t, (x, p) in batch.items()) / K
        safe = sum(_kl(p, forward(flat, t, xs[t])) for t, (_, p) in batch.items()) / K
        opt_backdoor.zero_grad(set_to_none=True)
        (perf2 + alpha * safe).backward()
        opt_backdoor.step()
        history.append({"perf": perf.item(), "safe": safe.item()})

    with torch.no_grad():
        shared = (torch.sigmoid(shared_logits) > 0.5).float()
        backdoor = (torch.sigmoid(backdoor_logits) > 0.5).float()
        keep = expand(shared * (1 - backdoor))
        out = lam * (keep * taus).sum(0)
        removed = expand(shared * backdoor)
    info = {"tasks": names, "granularity": granularity, "perturb": perturb, "lam": lam, "alpha": alpha, "steps": steps, "seed": seed,
            "shared_mask": shared.cpu(), "backdoor_mask": backdoor.cpu(),
            "kept": {t: float(keep[k].mean()) for k, t in enumerate(names)},
            "removed_as_backdoor": {t: float(removed[k].mean()) for k, t in enumerate(names)},
            "history": history}
    return Weights(out, layout), info
