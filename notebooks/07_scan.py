# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Is this checkpoint backdoored? A pre-merge scan and its error rates
#
# A practitioner about to merge fine-tunes downloaded from a hub asks one question first: is any of
# them backdoored? `bvlib scan` answers it for one file. For every class of the task it searches the
# best patch (TBAR's unknown-trigger search: the four corners and the centre, two sizes, nothing told;
# each placement screened with 2 steps and scored on the first 128 validation images, the best one
# refined) and measures its attack success rate on all the task's validation images. A patch that
# fools the model is only evidence where it does more than the **base** allows: this paper's point is
# that strong attacks lean on triggers the pretrained model θ0 already has (chapter 04). So the same
# search runs on θ0, and the score reads each class's **excess** (candidate ASR − θ0 ASR): the anomaly
# index of Neural Cleanse, (x − median) / (1.4826 · MAD) over the classes, for the class with the
# largest excess. The same index on the raw ASR (no θ0 correction) and the task vector's top-1% mass (a
# weight-space cue that needs no data) are the two scores it is compared with.
#
# **How it is measured (stated before any number).** Clean fine-tunes and attacked models of the mini
# world are scanned as files would be: BadNets (several seeds and tasks), BadMerging, and an SBV of
# three BadNets seed BVs injected at β = 1. For each score: the ROC curve over the models, its AUC,
# and the detection rate at a 5% false-positive rate (with ten clean models: none of them flagged),
# each with a 95% bootstrap interval over models. The threshold `bvlib scan` uses by default is the
# one measured here for the corrected score (`bvlib.defenses.scan.SCAN_CALIBRATION`).

# %% tags=["parameters"]
preset = "cpu"  # cpu (default), smoke (tests), gpu
scan_tasks = []  # tasks whose fine-tunes are scanned, empty for every task with 3 to 10 classes
seeded_tasks = ["mnist", "fashion"]  # tasks whose clean and BadNets seeds 1 and 2 are scanned too
attacked_extra = ["BadMerging", "SBV"]  # attacks on the seeded tasks beside BadNets
steps = 10  # search steps of the best placement of each class (each screened with 2 on 128 val images)
fpr = 0.05  # the false-positive rate detection is read at

# %%
import warnings

warnings.filterwarnings("ignore")  # before the imports: import-time warnings of libraries are noise here

import matplotlib.pyplot as plt
import pandas as pd

from bvlib import BVLibError
from bvlib.book import page_setup, record
from bvlib.defenses.scan import SEARCH, roc, scan
from bvlib.scenes import AttackedScene
from bvlib.world import World

page_setup()

world = World(preset, progress=False)
tasks = [world.check_task(t) for t in scan_tasks] or [
    t for t in world.task_names if 3 <= world.task(t).n_classes <= 10
]
bad = [a for a in attacked_extra if a not in ("BadMerging", "SBV")]
if bad:
    raise BVLibError(f"unknown attack {bad}; choose from BadMerging, SBV")
search = SEARCH | {"steps": steps}
theta0 = world.base_weights
models = []  # (task, kind, label, encoder weights)
seeded = [world.check_task(t) for t in seeded_tasks if t in tasks]
for t in tasks:
    for seed in [0, 1, 2] if t in seeded else [0]:
        models.append((t, "clean", f"clean seed {seed}", world.finetune(t, seed=seed)))
        models.append((t, "BadNets", f"BadNets seed {seed}", world.finetune(t, world.badnets(), seed=seed)))
    if t in seeded:
        scene = AttackedScene(world, t)
        if "BadMerging" in attacked_extra:
            models.append((t, "BadMerging", "BadMerging seed 0", theta0 + scene.badmerging(0).tau))
        if "SBV" in attacked_extra:
            models.append((t, "SBV", "SBV β 1", theta0 + scene.sbv((0, 1, 2)).tau))
n_clean = sum(kind == "clean" for _, kind, _, _ in models)
print(f"preset {world.name}: {len(models)} models on {', '.join(tasks)} ({n_clean} clean); search {search}")

# %% [markdown]
# ## Every model scanned
# The suspected class is the one with the largest anomaly index of the excess; the attacks aim at
# class 0.

# %%
rows = []
for t, kind, label, weights in models:
    r = scan(world, weights, t, **search)
    top = r["classes"][r["suspected_class"]]
    rows.append(
        {
            "task": t,
            "model": label,
            "kind": kind,
            "attacked": kind != "clean",
            "suspected class": r["suspected_class"],
            "its ASR": top["asr"],
            "base ASR": top["base_asr"],
            "score": r["score"],
            "score, no θ0 correction": r["score_uncorrected"],
            "top-1% mass": r["weights"]["top1pct_mass"],
        }
    )
table = pd.DataFrame(rows)
table.style.format(
    {
        "its ASR": "{:.0%}",
        "base ASR": "{:.0%}",
        "score": "{:.1f}",
        "score, no θ0 correction": "{:.1f}",
        "top-1% mass": "{:.3f}",
    }
).hide(axis="index")

# %% [markdown]
# ## ROC curves
# Each score thresholded at every value it takes; the dot is the threshold that flags at most `fpr`
# of the clean models.

# %%
scores = {
    "anomaly index of the excess over θ0 (the scan)": "score",
    "anomaly index of the ASR (no θ0 correction)": "score, no θ0 correction",
    "top-1% mass of the task vector (weights only)": "top-1% mass",
}
curves = {
    name: roc(table.loc[~table["attacked"], col], table.loc[table["attacked"], col], fpr=fpr)
    for name, col in scores.items()
}
fig, ax = plt.subplots(figsize=(6, 5))
for name, c in curves.items():
    ax.step(
        [p["fpr"] for p in c["curve"]],
        [p["tpr"] for p in c["curve"]],
        where="post",
        label=f"{name}: AUC {c['auc']:.2f}",
    )
    ax.scatter([fpr], [c["tpr_at_fpr"]], s=25)
ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
ax.set_xlabel("false-positive rate (clean models flagged)")
ax.set_ylabel("detection rate (attacked models flagged)")
ax.legend(fontsize=7, loc="lower right")
ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()
summary = pd.DataFrame(
    {
        name: {
            "AUC": f"{c['auc']:.2f} [{c['auc_interval'][0]:.2f}, {c['auc_interval'][1]:.2f}]",
            f"detection at {fpr:.0%} FPR": f"{c['tpr_at_fpr']:.0%} [{c['tpr_interval'][0]:.0%}, "
            f"{c['tpr_interval'][1]:.0%}]",
            "threshold": f"{c['threshold']:.2f}",
        }
        for name, c in curves.items()
    }
).T
summary.style.set_caption(f"{len(models)} models, {n_clean} clean")

# %% [markdown]
# ## By attack
# The share of each kind of model the scan flags at the threshold measured above (at most `fpr` of
# the clean models above it), and whether it names the attack's target class (0). This threshold is
# the default of `bvlib scan` (`bvlib.defenses.scan.SCAN_CALIBRATION`, copied from the cpu build).

# %%
main = curves["anomaly index of the excess over θ0 (the scan)"]
table["flagged"] = table["score"] > main["threshold"]
by_kind = table.groupby("kind", sort=False).agg(
    models=("model", "size"),
    flagged=("flagged", "mean"),
    target_named=("suspected class", lambda s: (s == 0).mean()),
)
by_kind.style.format({"flagged": "{:.0%}", "target_named": "{:.0%}"})

# %%
_ = record(
    "07_scan",
    {
        "preset": world.name,
        "tasks": tasks,
        "n_models": len(models),
        "n_clean": n_clean,
        "search": search,
        "fpr": fpr,
        "scores": {name: {k: v for k, v in c.items() if k != "curve"} for name, c in curves.items()},
        "by_kind": by_kind.to_dict(orient="index"),
        "models": table.to_dict(orient="records"),
    },
)
