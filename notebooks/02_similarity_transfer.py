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
# # Similarity and transfer of Backdoor Vectors
#
# **Claim (paper, §4).** BVs measure how alike two attacks are. Take one BadNets attack and vary one
# knob at a time: the training seed, the patch location, the target class, the task. The paper finds
# that backdoors **transfer strongly across seeds and patch locations, and weakly across target
# classes and tasks**: the BV of one attack, added to a clean model, makes another attack's trigger
# work when the two differ only in seed or location.
#
# Two matrices over the attacks: the cosine similarity of their BVs, and the transfer matrix
# T<sub>ij</sub> = ASR of attack *i*'s trigger and target on θ<sub>clean,i</sub> + BV<sub>j</sub>.
# A trigger alone already sends a few images to the target class, so transfer is also reported *above
# that floor* (T<sub>ij</sub> minus the ASR of trigger *i* on θ<sub>clean,i</sub>).
#
# Locations come twice. At paper scale two corners' 22 px triggers share most of the pixels inside
# their 32 px tokens; the plain location variants here do so only partly (see chapter 00), so each
# location also gets a variant *aligned* to the reference trigger's offset inside its token. The
# cross-task variations are tasks whose target class is not the reference target's concept (digits'
# class 0 is MNIST's 0: a BV from it would "transfer" because it teaches the same class).
#
# **How the claims are judged (stated before any number).** The paper speaks of groups, so the claims
# compare the **group means** (the mean similarity or transfer between the reference attack and the
# attacks that differ from it in one knob) with the same experiment repeated on `reference_tasks`
# reference tasks of different kinds. "Closer" means the lowest of the seed and aligned-location group
# means is above the highest of the target and task group means; "transfers" means the transfer above
# the clean floor is above 50%. Each statistic is a mean over the reference tasks with a 95% bootstrap
# interval (over tasks and test images); **holds** / **fails** when the interval lies entirely on one
# side of the threshold, **inconclusive** otherwise or with fewer than three tasks. The unaligned corners
# of the mini world are shown beside them (their triggers share few in-token pixels by construction).

# %% tags=["parameters"]
preset = "cpu"  # cpu (default), smoke (tests), gpu, paper
task = "mnist"  # task of the reference attack whose matrices are shown, empty for the preset first task
reference_tasks = []  # tasks the claims are repeated on (replicates), empty for `task` alone
seeds = [0, 1, 2]  # the first one is the reference seed
locations = ["top_left", "center"]  # patch locations other than the reference one
targets = [1, 2]  # target classes other than the reference one
other_tasks = []  # tasks of the cross-task variation, empty for two whose target class is another concept
aligned = True  # add location variants aligned to the reference trigger's offset inside its token

# %%
import warnings

warnings.filterwarnings("ignore")  # before the imports: import-time warnings of libraries are noise here

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bvlib.backdoor_vectors import (
    clean_asr,
    group_means,
    group_rates,
    similarity_matrix,
    transfer_matrix,
    variations,
)
from bvlib.book import Claim, claims_frame, judged_claim, page_setup, record
from bvlib.stats import interval
from bvlib.triggers import in_token_overlap
from bvlib.world import World

page_setup()

world = World(preset, progress=False)
task = world.check_task(task or world.task_names[0])
target = world.badnets().target
reference_list = [world.check_task(t) for t in (reference_tasks or [task])]
if task not in reference_list:
    reference_list = [task, *reference_list]


def attacks_on(ref: str) -> list:
    same_concept = lambda t: world.task(t).classnames[target] == world.task(ref).classnames[target]  # noqa: E731
    others = list(other_tasks) or [t for t in world.task_names if t != ref and not same_concept(t)][:2]
    return variations(
        world,
        ref,
        seeds=seeds,
        locations=locations,
        targets=targets,
        tasks=others,
        aligned_token=world.patch_size if aligned else 0,
    )


attacks = attacks_on(task)
labels = [a.label for a in attacks]
pd.DataFrame(
    [
        {
            "attack": a.label,
            "varies": a.group,
            "task": a.task,
            "seed": a.seed,
            "location": a.trigger.location,
            "target": a.target,
        }
        for a in attacks
    ]
).set_index("attack")

# %%
cos = similarity_matrix(world, attacks)
transfer = transfer_matrix(world, attacks)
floor = clean_asr(world, attacks)
above = (transfer - floor.unsqueeze(1)).clamp_min(0)

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
panels = [
    (cos, "cosine similarity of BVs", "viridis"),
    (transfer, "transfer: ASR of row's trigger on θ_clean + column's BV", "magma"),
]
for ax, (m, title, cmap) in zip(axes, panels):
    im = ax.imshow(m.numpy(), cmap=cmap, vmin=0 if m.min() >= 0 else -1, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j,
                i,
                f"{m[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=6,
                color="w" if m[i, j] < 0.6 else "k",
            )
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## By variation
# Each number is the mean over the attacks that differ from the reference in one knob, of the
# similarity (or transfer, both directions) between them and the reference.

# %%
summary = pd.DataFrame(
    {
        "cosine similarity": group_means(cos, attacks),
        "transfer ASR": group_means(transfer, attacks),
        "transfer above the floor": group_means(above, attacks),
    }
)
summary.index.name = "varies"
fig, ax = plt.subplots(figsize=(6, 3))
summary.plot.bar(ax=ax, rot=0)
ax.set_ylim(min(0, summary.values.min()), 1)
ax.grid(axis="y", alpha=0.3)
fig.tight_layout()
plt.show()
summary.style.format("{:.2f}")

# %% [markdown]
# ## Repeated on every reference task
# The same variations around a reference attack on each of `reference_tasks`; per task and group, the
# mean cosine and the transfer above the floor (both directions with the reference). The bars are the
# means over the tasks with their 95% intervals.

# %%
per_task, units = [], []
for ref in reference_list:
    atk = attacks if ref == task else attacks_on(ref)
    c, tr, fl = (
        (cos, transfer, floor)
        if ref == task
        else (similarity_matrix(world, atk), transfer_matrix(world, atk), clean_asr(world, atk))
    )
    cos_g, rates = group_means(c, atk), group_rates(world, tr, atk, fl)
    units.append({"cos": cos_g, "rates": rates})
    per_task += [
        {
            "reference task": ref,
            "varies": g,
            "cosine similarity": cos_g[g],
            "transfer ASR": r["transfer"].value,
            "floor": r["floor"].value,
            "transfer above the floor": r["transfer"].value - r["floor"].value,
        }
        for g, r in rates.items()
    ]
per_task = pd.DataFrame(per_task)
groups = list(dict.fromkeys(per_task["varies"]))
bars = {}
for g in groups:
    est, lo, hi = interval(
        [{"t": u["rates"][g]["transfer"], "f": u["rates"][g]["floor"]} for u in units],
        lambda x: (x["t"] - x["f"]).mean(-1),
    )
    cest, clo, chi = interval([{"c": u["cos"][g]} for u in units], lambda x: x["c"].mean(-1))
    bars[g] = {
        "cosine similarity": cest,
        "cos lo": clo,
        "cos hi": chi,
        "transfer above the floor": est,
        "lo": lo,
        "hi": hi,
    }
bars = pd.DataFrame(bars).T
fig, ax = plt.subplots(figsize=(7, 3.2))
x = np.arange(len(bars))
ax.bar(
    x - 0.2,
    bars["cosine similarity"],
    0.4,
    yerr=[bars["cosine similarity"] - bars["cos lo"], bars["cos hi"] - bars["cosine similarity"]],
    capsize=3,
    label="cosine similarity",
)
ax.bar(
    x + 0.2,
    bars["transfer above the floor"],
    0.4,
    yerr=[bars["transfer above the floor"] - bars["lo"], bars["hi"] - bars["transfer above the floor"]],
    capsize=3,
    label="transfer above the floor",
)
ax.set_xticks(x, bars.index)
ax.set_title(
    f"mean over {len(reference_list)} reference tasks ({', '.join(reference_list)}), 95% intervals",
    fontsize=10,
)
ax.set_ylim(min(0, float(bars[["cos lo", "lo"]].values.min())), 1)
ax.grid(axis="y", alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
per_task.style.format({c: "{:.2f}" for c in per_task.columns if c not in ("reference task", "varies")}).hide(
    axis="index"
)

# %% [markdown]
# ### Location variants against the pixels they share inside a token
# Each location variant (aligned or not, on every reference task) at the share of the reference
# trigger's in-token pixel offsets it covers too, against its transfer above the floor with the
# reference (both directions): a location "transfers" as far as the encoder sees the same pixels.

# %%
side, token = world.preset.data.image_size, world.patch_size
loc_rows = []
for ref in reference_list:
    atk = attacks if ref == task else attacks_on(ref)
    tr, fl = (transfer, floor) if ref == task else (transfer_matrix(world, atk), clean_asr(world, atk))
    for j, a in enumerate(atk):
        if a.group.startswith("location"):
            loc_rows.append(
                {
                    "reference task": ref,
                    "variant": a.label,
                    "group": a.group,
                    "in-token overlap": in_token_overlap(atk[0].trigger, a.trigger, side, token),
                    "transfer above the floor": float((tr[0, j] - fl[0] + tr[j, 0] - fl[j]) / 2),
                }
            )
loc_table = pd.DataFrame(loc_rows)
fig, ax = plt.subplots(figsize=(5.5, 3.4))
for g, d in loc_table.groupby("group", sort=False):
    ax.scatter(d["in-token overlap"], d["transfer above the floor"], label=g, alpha=0.8)
ax.set_xlabel("share of the reference trigger's in-token pixels covered")
ax.set_ylabel("transfer above the floor")
ax.set_xlim(-0.05, 1.05)
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
loc_table.style.format({"in-token overlap": "{:.2f}", "transfer above the floor": "{:.2f}"}).hide(
    axis="index"
)

# %% [markdown]
# ## Does the mini world agree with the paper?

# %%
near = [g for g in ("seed", "location, aligned") if g in groups]
far = [g for g in ("target", "task") if g in groups]
replicates = f"{len(reference_list)} tasks × 1 seed set"


def judged(
    claim: str, paper: str, cols: dict, stat, threshold: float, what: str, points: bool = True
) -> Claim:
    return judged_claim(
        claim,
        paper,
        [{k: f(u) for k, f in cols.items()} for u in units],
        stat,
        threshold,
        what,
        replicates,
        points=points,
    )


claims = []
if near and far:

    def gap(x, prefix):  # lowest near group minus highest far group, per bootstrap draw
        return np.min([x[f"{prefix}{g}"].mean(-1) for g in near], axis=0) - np.max(
            [x[f"{prefix}{g}"].mean(-1) for g in far], axis=0
        )

    cos_cols = {f"c{g}": (lambda u, g=g: u["cos"][g]) for g in near + far}
    claims.append(
        judged(
            "cosine: attacks that differ in seed or location are closer than those that differ in target or "
            "task",
            "seeds, locations > target classes, tasks",
            cos_cols,
            lambda x: gap(x, "c"),
            0.0,
            "lowest near − highest far group",
            points=False,
        )
    )
    tr_cols = {f"t{g}": (lambda u, g=g: u["rates"][g]["transfer"]) for g in near + far}
    claims.append(
        judged(
            "transfer: a backdoor transfers more across seeds and locations than across targets and tasks",
            "strong vs weak transfer",
            tr_cols,
            lambda x: gap(x, "t"),
            0.0,
            "lowest near − highest far group",
        )
    )
for g, label in (
    ("location, aligned", "once triggers share their in-token pixels"),
    ("location", "the mini world's plain corners"),
):
    if g in groups:
        claims.append(
            judged(
                f"a backdoor transfers across trigger locations ({label})",
                "strong transfer",
                {"t": lambda u, g=g: u["rates"][g]["transfer"], "f": lambda u, g=g: u["rates"][g]["floor"]},
                lambda x: (x["t"] - x["f"]).mean(-1),
                0.5,
                "transfer above the floor",
            )
        )
record(
    "02_similarity_transfer",
    {
        "preset": world.name,
        "task": task,
        "reference_tasks": reference_list,
        **{f"cos_{g}": v for g, v in summary["cosine similarity"].items()},
        **{f"transfer_{g}": v for g, v in summary["transfer ASR"].items()},
        **{
            f"transfer_{g.replace(', ', '_')}_above_floor": v
            for g, v in summary["transfer above the floor"].items()
        },
        "groups_over_tasks": bars.to_dict(orient="index"),
    },
    claims,
)
claims_frame(claims)
