"""DAM (Defense-Aware Merging; Yang et al., ICLR 2025), as FusionBench's "safe concrete task arithmetic"
runs it: one concrete mask shared by the task vectors, learnt on unlabeled images."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

from bvlib.data import Split
from bvlib.defenses.common import _check_weights, _image_side, _pos_int
from bvlib.errors import BVLibError
from bvlib.merging import _real
from bvlib.training import _to_float
from bvlib.triggers import digest
from bvlib.weights import Weights, stack

DAM_VERSION = 4  # bump to invalidate stored DAM merges after a change in how they are made


# DAM ------------------------------------------------------------------------------------------
def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the predicted class distributions (AdaMerging's unlabeled objective)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def _segment_mean(mask: torch.Tensor, numels: list[int], counts: torch.Tensor) -> torch.Tensor:
    """[D] -> [D]: each coordinate's tensor-wise mean of `mask` (deterministic, unlike index_add_ on CPU)."""
    means = torch.stack([chunk.mean() for chunk in mask.split(numels)])
    return means.repeat_interleave(counts)


def dam(
    world,
    task_vectors: Mapping[str, Weights],
    *,
    lam: float = 0.3,
    steps: int = 100,
    lr: float = 2e-2,
    temperature: float = 0.5,
    init: float = 0.0,
    batch_size: int = 16,
    adv_lr: float = 2e-3,
    adv_weight: float = 0.1,
    adapt_lam: bool = True,
    final: str = "expectation",
    seed: int = 0,
    progress: bool = False,
) -> tuple[Weights, dict]:
    """Defense-Aware Merging (Yang et al., ICLR 2025) as its reference code runs it on task arithmetic.

    `task_vectors` maps task names of the world to their task vectors τ_t (any may be backdoored; the
    defender does not know which). One mask m over the D coordinates, shared by every τ_t, is a
    concrete (relaxed Bernoulli) variable with logits starting at `init` (0) and `temperature` 0.5;
    each sampled mask is divided by its mean inside every parameter tensor, and the merge is
    θ(m) = θ0 + Σ_t λ_t · m ⊙ τ_t. Each of `steps` steps, on batches of `batch_size` unlabeled val
    images per task (labels are never read):

    0. merging weights (`adapt_lam`, the reference's AdaMerging variants): the λ_t are reset to `lam`
       and take one Adam step (`lr`) on the merge's entropy on clean images, the mask fixed;
    1. perturbation: one Adam step (`adv_lr`) on a per-task universal additive perturbation δ_t (the
       whole image, starting at 0) that maximises the cross-entropy of the merge's predictions on x + δ_t
       against its own predictions on x;
    2. mask: one Adam step (`lr`) on Σ_t H(x) + `adv_weight` · H(clip(x + δ_t)), H the entropy of the
       merge's predictions, through a freshly sampled mask.

    The final merge is θ0 + lam · m ⊙ Σ_t τ_t with m the learnt mask's expectation, sigmoid(logits)
    (`final="expectation"`), or one seeded sample of the concrete mask (`final="sample"`, as the
    reference forms it), either divided by its tensor-wise means. `steps=0` is the untrained-mask
    control: the expectation at logits 0 is plain task arithmetic, a sample is a random DARE-like
    drop, so a DAM result is read against the same merge through the untrained mask. The reference runs
    1000-2000 steps at lr 1e-3 (adv_lr 1e-4) on ViT-B-32; the
    mini world runs 10-20× fewer steps at 20× the rates, so the logits can move as far (on the cpu
    world's BadMerging merge, 100 steps at 2e-2 and 200 at 1e-2 left the ASR within 0.5 points, the
    mean CA within 0.3 and the mean logit shift at 0.41 and 0.39).

    Returns (τ_merged, info): info holds the final mask's share of coordinates above 0.5 ("kept_share"),
    how far the logits moved (mean |logit − init|, share beyond ±1), the perturbations' norms and the
    loss history. Cached in `world.store` (kind "dam") under the digest of Σ τ_t, the tasks' data and
    every parameter: a re-run of a chapter loads it.
    """
    if not isinstance(task_vectors, Mapping) or not task_vectors:
        raise BVLibError("task_vectors must be a non-empty dict {task name: task vector}")
    names = [world.check_task(t) for t in task_vectors]
    for t in names:
        _check_weights(world, task_vectors[t], f"task vector of '{t}'")
    lam, init = _real("lam", lam), _real("init", init)
    lr, adv_lr = _real("lr", lr, 0, lo_open=True), _real("adv_lr", adv_lr, 0)
    temperature, adv_weight = (
        _real("temperature", temperature, 0, lo_open=True),
        _real("adv_weight", adv_weight, 0),
    )
    steps, batch_size = _pos_int("steps", steps, lo=0), _pos_int("batch_size", batch_size)
    if final not in ("expectation", "sample"):
        raise BVLibError(f"final must be 'expectation' or 'sample', got {final!r}")

    dev, layout = world.device, world.layout
    vectors = stack(
        [task_vectors[t].to(dev) for t in names]
    )  # the mask is shared: the final merge needs only Σ τ_t
    params = {
        "lam": lam,
        "steps": steps,
        "lr": lr,
        "temperature": temperature,
        "init": init,
        "batch_size": batch_size,
        "adv_lr": adv_lr,
        "adv_weight": adv_weight,
        "adapt_lam": bool(adapt_lam),
        "final": final,
        "seed": seed,
    }
    key = world.artifact_config(
        names, dam_version=DAM_VERSION, split="val", vectors=f"sha256:{digest(vectors)}", **params
    )

    def build():
        out, info = _run_dam(world, names, vectors, progress=progress, **params)
        return {"flat": out, "mask": info.pop("mask")}, info

    tensors, info = world.store.cached("dam", key, build)
    return Weights(tensors["flat"].to(dev), layout), info | {"mask": tensors["mask"]}


def _run_dam(
    world,
    names: list[str],
    vectors: torch.Tensor,
    *,
    lam,
    steps,
    lr,
    temperature,
    init,
    batch_size,
    adv_lr,
    adv_weight,
    adapt_lam,
    final,
    seed,
    progress,
) -> tuple[torch.Tensor, dict]:
    dev, layout = world.device, world.layout
    total = vectors.sum(0)
    lams = torch.full((len(names),), lam, device=dev, requires_grad=True)
    opt_lam = torch.optim.Adam([lams], lr=lr)
    theta0 = world.base_weights.flat.to(dev)
    numels, counts = list(layout.numels), torch.tensor(layout.numels, device=dev)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.full_like(total, init, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    side = _image_side(world)
    deltas = torch.zeros(len(names), 3, side, side, device=dev, requires_grad=True)
    opt_adv = torch.optim.Adam([deltas], lr=adv_lr)
    model = world.classifier(names[0]).eval().requires_grad_(False)
    heads = [world.head(t) for t in names]
    columns = [0, *accumulate(len(h) for h in heads)]
    all_heads = torch.cat(heads)

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        """(a relaxed Bernoulli sample of the mask, reparameterised; the same divided by its tensor-wise
        means)."""
        u = torch.rand(total.shape, generator=gen).to(dev).clamp_(1e-6, 1 - 1e-6)
        m = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
        return m, m / _segment_mean(m, numels, counts).clamp_min(1e-12)

    def task_logits(flat: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each task's logits on its images, from one pass of the classifier over every task's images
        at once with every task's head (the mask, hence the merged encoder, is shared): a task reads
        its own rows and its own head's columns."""
        params = {f"encoder.{k}": v for k, v in Weights(flat, layout).state_dict().items()} | {
            "head": all_heads
        }
        out = functional_call(model, params, (torch.cat(xs),))
        return [
            rows[:, columns[k] : columns[k + 1]] for k, rows in enumerate(out.split([len(x) for x in xs]))
        ]

    val = {t: world.task(t).val for t in names}

    def batch(t: str) -> torch.Tensor:
        split = val[t]
        idx = torch.randint(len(split), (batch_size,), generator=gen)
        x = (
            split.images[idx]
            if isinstance(split, Split)
            else torch.stack([torch.as_tensor(split[i][0]) for i in idx.tolist()])
        )
        return _to_float(x, dev)

    def weighted() -> torch.Tensor:
        """Σ_t λ_t τ_t (lam · Σ τ_t while the merging weights are not adapted)."""
        return lams @ vectors if adapt_lam else lam * total

    history, lam_moves = [], []
    for _ in tqdm(range(steps), desc="DAM", leave=False, disable=not progress):
        if adapt_lam:  # 0. the merging weights: reset, one step on the clean entropy (mask fixed)
            with torch.no_grad():
                lams.fill_(lam)
                m = sample()[1]
            xs = [batch(t) for t in names]
            h = sum(_entropy(out) for out in task_logits(theta0 + m * (lams @ vectors), xs))
            opt_lam.zero_grad(set_to_none=True)
            h.backward()
            opt_lam.step()
            lam_moves.append(float((lams.detach() - lam).abs().mean()))
        flat = theta0 + sample()[1] * weighted().detach()
        # 1. the perturbations against the current merge (mask fixed)
        frozen = flat.detach()
        xs = [batch(t) for t in names]
        with torch.no_grad():
            own = [out.argmax(-1) for out in task_logits(frozen, xs)]
        perturbed = task_logits(frozen, [x + deltas[k] for k, x in enumerate(xs)])
        adv = -sum(F.cross_entropy(out, y) for out, y in zip(perturbed, own))
        opt_adv.zero_grad(set_to_none=True)
        adv.backward()
        opt_adv.step()
        # 2. the mask: low entropy on clean images and on perturbed ones
        xs = [batch(t) for t in names]
        outs = task_logits(
            flat, [torch.cat([x, (x + deltas[k].detach()).clamp(0, 1)]) for k, x in enumerate(xs)]
        )
        nat = sum(_entropy(out[: len(x)]) for out, x in zip(outs, xs))
        reg = sum(_entropy(out[len(x) :]) for out, x in zip(outs, xs))
        loss = nat + adv_weight * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(
            {
                "entropy": nat.item() / len(names),
                "entropy_perturbed": reg.item() / len(names),
                "adv": -adv.item() / len(names),
            }
        )

    with torch.no_grad():
        if final == "sample":
            raw, mask = sample()
        else:
            raw = torch.sigmoid(logits)
            mask = raw / _segment_mean(raw, numels, counts).clamp_min(1e-12)
        out = lam * mask * total
        moved = (logits - init).abs()
    info = {
        "tasks": names,
        "lam": lam,
        "steps": steps,
        "lr": lr,
        "temperature": temperature,
        "adv_weight": adv_weight,
        "seed": seed,
        "final": final,
        "kept_share": float((raw > 0.5).float().mean()),
        "logit_shift": float(moved.mean()),
        "logits_beyond_1": float((moved > 1).float().mean()),
        "lam_step": sum(lam_moves) / max(1, len(lam_moves)),
        "delta_norms": {t: float(deltas[k].detach().norm()) for k, t in enumerate(names)},
        "mask": mask.cpu(),
        "history": history,
    }
    return out, info
