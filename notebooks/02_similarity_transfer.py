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

# %% tags=["parameters"]
preset = "cpu"  # cpu (default), smoke (tests), gpu, paper
task = "mnist"  # task of the reference attack, empty for the first task of the preset
seeds = [0, 1, 2]  # the first one is the reference seed
locations = ["top_left", "center", "random"]  # patch locations other than the reference one
targets = [1, 2]  # target classes other than the reference one
other_tasks = []  # tasks for the cross-task variation, empty for two tasks whose target class is another concept
aligned = True  # add location variants aligned to the reference trigger's offset inside its token

# %%
import warnings

warnings.filterwarnings("ignore")  # before the imports: import-time warnings of libraries are noise here

import matplotlib.pyplot as plt
import pandas as pd

from bvlib.backdoor_vectors import clean_asr, group_means, similarity_matrix, transfer_matrix, variations
from bvlib.book import Claim, claims_frame, page_setup, record
from bvlib.world import World

page_setup()

world = World(preset, progress=False)
task = world.check_task(task or world.task_names[0])
target = world.badnets().target
same_concept = lambda t: world.task(t).classnames[target] == world.task(task).classnames[target]  # noqa: E731
others = list(other_tasks) or [t for t in world.task_names if t != task and not same_concept(t)][:2]
attacks = variations(world, task, seeds=seeds, locations=locations, targets=targets, tasks=others,
                     aligned_token=world.patch_size if aligned else 0)
labels = [a.label for a in attacks]
pd.DataFrame([{"attack": a.label, "varies": a.group, "task": a.task, "seed": a.seed, "location": a.trigger.location,
               "target": a.target} for a in attacks]).set_index("attack")

# %%
cos = similarity_matrix(world, attacks)
transfer = transfer_matrix(world, attacks)
floor = clean_asr(world, attacks)
above = (transfer - floor.unsqueeze(1)).clamp_min(0)

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
panels = [(cos, "cosine similarity of BVs", "viridis"), (transfer, "transfer: ASR of row's trigger on θ_clean + column's BV", "magma")]
for ax, (m, title, cmap) in zip(axes, panels):
    im = ax.imshow(m.numpy(), cmap=cmap, vmin=0 if m.min() >= 0 else -1, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w" if m[i, j] < 0.6 else "k")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## By variation
# Each number is the mean over the attacks that differ from the reference in one knob, of the
# similarity (or transfer, both directions) between them and the reference.

# %%
summary = pd.DataFrame({"cosine similarity": group_means(cos, attacks), "transfer ASR": group_means(transfer, attacks),
                        "transfer above the floor": group_means(above, attacks)})
summary.index.name = "varies"
fig, ax = plt.subplots(figsize=(6, 3))
summary.plot.bar(ax=ax, rot=0)
ax.set_ylim(min(0, summary.values.min()), 1)
ax.grid(axis="y", alpha=0.3)
fig.tight_layout()
plt.show()
summary.style.format("{:.2f}")

# %% [markdown]
# ## Does the mini world agree with the paper?

# %%
near = [g for g in ("seed", "location, aligned", "location") if g in summary.index]
far = [g for g in ("target", "task") if g in summary.index]
claims = []
if near and far:
    for col in summary.columns:
        lo_near, hi_far = summary.loc[near, col].min(), summary.loc[far, col].max()
        claims.append(Claim(f"{col}: attacks that differ in seed or location are closer than those that differ in target or task",
                            "seeds, locations > target classes, tasks", f"lowest seed/location {lo_near:.2f}, highest target/task {hi_far:.2f}",
                            lo_near > hi_far))
if "location, aligned" in summary.index and "location" in summary.index:
    a, u = summary.loc["location, aligned", "transfer above the floor"], summary.loc["location", "transfer above the floor"]
    claims.append(Claim("a backdoor transfers across trigger locations (once triggers share their in-token pixels)", "strong transfer",
                        f"aligned {a:.2f}, unaligned {u:.2f} above the clean floor", a >= 0.5))
record("02_similarity_transfer", {"preset": world.name, "task": task, **{f"cos_{g}": v for g, v in summary["cosine similarity"].items()},
                                  **{f"transfer_{g}": v for g, v in summary["transfer ASR"].items()},
                                  **{f"transfer_{g.replace(', ', '_')}_above_floor": v for g, v in summary["transfer above the floor"].items()},
                                  "transfer_location_aligned": summary["transfer above the floor"].get("location, aligned", float("nan")),
                                  "transfer_location_unaligned": summary["transfer above the floor"].get("location", float("nan"))}, claims)
claims_frame(claims)
