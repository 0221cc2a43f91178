"""A pre-merge scan: is this one fine-tuned checkpoint backdoored?

For each class of its task, the best patch a search finds on the candidate (TBAR's unknown-trigger
search, `search_patches`: told neither where the patch sits nor its size) is set against what the
same search finds on the base θ0. The paper's point is that strong attacks lean on the base's own
*inherent* triggers, so a patch that fools the candidate is only evidence where it does more than
the base allows: the per-class *excess* (candidate ASR − θ0 ASR, on val) is what the score reads.
The score is Neural Cleanse's anomaly index on the high side: (x − median) / (1.4826 · MAD) over the
classes, for the class with the largest excess. Weight-space cues of the task vector come beside it.

The default threshold and the error rates printed with it are measured in the book (chapter 07: the
mini world's clean and attacked fine-tunes, an ROC curve); `SCAN_CALIBRATION` holds them.
"""

from __future__ import annotations

import numpy as np
import torch

from bvlib.defenses.common import _check_weights
from bvlib.defenses.tbar import search_patches
from bvlib.weights import Weights

MAD_SCALE = 1.4826  # MAD of a normal sample → its standard deviation (as Neural Cleanse uses it)
MAD_FLOOR = 0.02  # 2 ASR points: the spread below which classes count as equal (no division by ~0)
SEARCH = {"steps": 10, "screen_steps": 2, "batch_size": 32, "screen_images": 128}  # 10 screened, 1 refined
SCAN_CALIBRATION = {  # measured by chapter 07 on the cpu preset; `bvlib scan` prints these
    "threshold": 1.91,
    "measured": "chapter 07 of the cpu book: 24 models (10 clean), AUC 0.97 [0.89, 1.00], "
    "detection 93% [79%, 100%] at 5% false positives",
}


def anomaly_index(values) -> np.ndarray:
    """(x − median) / (1.4826 · MAD) per entry, the MAD floored at `MAD_FLOOR`."""
    x = np.asarray(values, dtype=float)
    med = np.median(x)
    mad = MAD_SCALE * np.median(np.abs(x - med))
    return (x - med) / max(mad, MAD_FLOOR)


def top_mass(vector: Weights, share: float = 0.01) -> float:
    """Share of the squared norm in the largest `share` of the coordinates (`bvlib inspect`'s TopMass)."""
    from bvlib.checkpoints import TopMass

    top = TopMass(vector.flat.numel(), share)
    top.add(vector.flat)
    return top.share()


def scan(
    world,
    weights: Weights,
    task: str,
    *,
    reference_bv: Weights | None = None,
    threshold: float | None = None,
    steps: int = SEARCH["steps"],
    screen_steps: int | None = SEARCH["screen_steps"],
    batch_size: int = SEARCH["batch_size"],
    screen_images: int | None = SEARCH["screen_images"],
    seed: int = 0,
) -> dict:
    """Scan encoder `weights` fine-tuned on `task` of `world` for a patch backdoor.

    Returns a JSON-able report: per class the candidate's best patch and its val ASR, that patch's ASR
    on θ0, the best ASR the same search reaches on θ0, the excess and its anomaly index; the suspected
    class and score (with and without the θ0 correction); the task vector's norm, top-1% mass and
    cosine with `reference_bv` (a known BV, optional); and the verdict at `threshold` (default:
    `SCAN_CALIBRATION`'s, measured in the book).
    """
    task = world.check_task(task)
    weights = _check_weights(world, weights, "the scanned weights")
    threshold = SCAN_CALIBRATION["threshold"] if threshold is None else float(threshold)
    search = {
        "steps": steps,
        "screen_steps": screen_steps,
        "batch_size": batch_size,
        "screen_images": screen_images,
        "seed": seed,
    }
    found = search_patches(world, weights, task, **search)
    on_base = search_patches(world, None, task, **search)  # the same search on θ0 (cached per task)
    names = world.task(task).classnames
    rows = []
    for t, f in found.items():
        trig = f["trigger"]
        rows.append(
            {
                "class": t,
                "name": names[t],
                "patch": f"{trig.size}px {trig.location}",
                "asr": f["asr"],
                "asr_of_patch_on_base": world.trigger_scores(task, None, trig, t, split="val")["asr"],
                "base_asr": on_base[t]["asr"],
                "excess": f["asr"] - on_base[t]["asr"],
            }
        )
    corrected = anomaly_index([r["excess"] for r in rows])
    plain = anomaly_index([r["asr"] for r in rows])
    for r, c, p in zip(rows, corrected, plain):
        r["index"], r["index_uncorrected"] = float(c), float(p)
    top = max(rows, key=lambda r: (r["index"], r["excess"]))
    tau = weights - world.base_weights
    cues = {"norm": tau.norm(), "top1pct_mass": top_mass(tau)}
    if reference_bv is not None:
        ref = _check_weights(world, reference_bv, "the reference BV")
        cues["cosine_with_reference_bv"] = float(
            torch.nn.functional.cosine_similarity(tau.flat.double(), ref.flat.double(), dim=0)
        )
    flagged = top["index"] >= threshold
    line = (
        f"{task}: {'SUSPICIOUS' if flagged else 'no backdoor found'}: class {top['class']} "
        f"({top['name']}) anomaly index {top['index']:.1f} "
        f"({'≥' if flagged else '<'} threshold {threshold:g}); its {top['patch']} patch reaches "
        f"{top['asr']:.0%} ASR on val, the base {top['base_asr']:.0%}"
    )
    return {
        "task": task,
        "verdict": "suspicious" if flagged else "clean",
        "line": line,
        "suspected_class": top["class"],
        "score": top["index"],
        "score_uncorrected": max(r["index_uncorrected"] for r in rows),
        "threshold": threshold,
        "calibration": dict(SCAN_CALIBRATION),
        "search": search,
        "classes": rows,
        "weights": cues,
    }


def roc(clean_scores, attacked_scores, *, fpr: float = 0.05, n_boot: int = 2000, seed: int = 0) -> dict:
    """How well a score tells attacked models from clean ones (higher = more suspicious).

    Returns the ROC curve (false- and true-positive rates at every threshold), its AUC (the chance that
    an attacked model outscores a clean one, ties half), the threshold that flags no more than `fpr` of
    the clean models (the smallest score above all but that share of them) and the detection rate
    there, each rate with a 95% bootstrap interval over models (clean and attacked resampled apart).
    """
    neg, pos = np.asarray(clean_scores, float), np.asarray(attacked_scores, float)
    if len(neg) < 2 or len(pos) < 2:
        raise ValueError("an ROC needs at least two clean and two attacked models")

    def auc(n: np.ndarray, p: np.ndarray) -> float:
        return float(((p[:, None] > n[None, :]) + 0.5 * (p[:, None] == n[None, :])).mean())

    def at_fpr(n: np.ndarray, p: np.ndarray) -> tuple[float, float]:
        allowed = int(np.floor(fpr * len(n)))  # clean models that may score above the threshold
        above = np.sort(n)[::-1]
        cut = above[allowed]  # flag strictly above the (allowed+1)-th highest clean score
        return float(cut), float((p > cut).mean())

    thresholds = np.unique(np.concatenate([neg, pos, [np.inf]]))[::-1]
    curve = [
        {"threshold": float(t), "fpr": float((neg >= t).mean()), "tpr": float((pos >= t).mean())}
        for t in thresholds
    ]
    rng = np.random.default_rng(seed)
    boots = [
        (auc(n, p), at_fpr(n, p)[1])
        for n, p in ((rng.choice(neg, len(neg)), rng.choice(pos, len(pos))) for _ in range(n_boot))
    ]
    lo, hi = np.percentile(np.array(boots), [2.5, 97.5], axis=0)
    threshold, tpr = at_fpr(neg, pos)
    return {
        "auc": auc(neg, pos),
        "auc_interval": [float(lo[0]), float(hi[0])],
        "fpr": fpr,
        "threshold": threshold,
        "tpr_at_fpr": tpr,
        "tpr_interval": [float(lo[1]), float(hi[1])],
        "n_clean": len(neg),
        "n_attacked": len(pos),
        "curve": curve,
    }
