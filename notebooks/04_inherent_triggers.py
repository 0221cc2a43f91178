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
# # Inherent triggers: the vulnerability is in the base model
#
# **Claim (paper, §6).** The strongest attacks on model merging (BadMerging among them) do not only
# plant a backdoor: they use a trigger *optimised against the pretrained model θ0*, an adversarial patch
# that already pushes θ0 towards the target class with no poisoned training at all. Such an
# **inherent trigger** keeps working on clean fine-tuned and clean merged models, because every one of
# them is θ0 plus small task vectors. That is why backdoors built on it survive merging.
#
# Here: a patch optimised against θ0 for the target class on one task's validation images (the
# attacker's data), measured on the test images of θ0, of a clean fine-tuned model and of a clean merge
# of all tasks, next to a random patch of the same size and place. The headline size is the preset's
# trigger (6 px: 0.75 of a token's side, as the paper's 22 px is of ViT-B-32's 32 px tokens); an 8 px
# patch (a whole token) is the extra.

# %% tags=["parameters"]
preset = "cpu"  # cpu (default), smoke (tests), gpu, paper
tasks = []  # tasks to attack one at a time, empty for every task of the preset
target = 0  # target class
sizes = []  # patch sides in px, empty for the preset's trigger size (the headline) and then 8 px
location = "bottom_right"
steps = 200  # optimisation steps of each trigger
batch_size = 64  # val images per optimisation step (128 moved the ASR on θ0 by under a point)
merge_lam = 0.0  # task arithmetic coefficient of the clean merge, 0 for the validated one (chapter 00)

# %%
import warnings

warnings.filterwarnings("ignore")  # before the imports: import-time warnings of libraries are noise here

import matplotlib.pyplot as plt
import pandas as pd

from bvlib.attacks.inherent import inherent_trigger, trigger_asr_table
from bvlib.book import Claim, claims_frame, page_setup, record
from bvlib.merging import merge
from bvlib.triggers import PatchTrigger
from bvlib.world import World

page_setup()

world = World(preset, progress=False)
names = [world.check_task(t) for t in (tasks or world.task_names)]
sizes = list(sizes) or list(dict.fromkeys([world.badnets().trigger.size, 8]))
merge_lam = merge_lam or world.merge_params("task_arithmetic")["lam"]
theta0 = world.base_weights
clean = {t: world.finetune(t) for t in world.task_names}
merged = theta0 + merge([clean[t] - theta0 for t in world.task_names], "task_arithmetic", lam=merge_lam)
print(f"preset {world.name}: triggers for target class {target} on {', '.join(names)}; sizes {sizes}")

# %%
rows = []
examples = {}
for task in names:
    models = {"θ0 (base)": None, "clean fine-tune": clean[task], f"clean merge (TA, λ={merge_lam})": merged}
    for size in sizes:
        optimised = inherent_trigger(
            world, task, target, size=size, location=location, steps=steps, batch_size=batch_size
        )
        random = PatchTrigger(size=size, location=location, pattern="noise", seed=1)
        examples[(task, size)] = optimised
        for r in trigger_asr_table(
            world, task, {"inherent (optimised on θ0)": optimised, "random patch": random}, models, target
        ):
            rows.append({"task": task, "size": size, **r})
table = pd.DataFrame(rows)
mean = table.groupby(["size", "model", "trigger"], sort=False)["asr"].mean().unstack("trigger")
mean.style.format("{:.1%}")

# %% [markdown]
# ## ASR of the optimised trigger and of a random patch, averaged over tasks

# %%
fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 3.6), sharey=True, squeeze=False)
for ax, size in zip(axes[0], sizes):
    mean.loc[size].plot.bar(ax=ax, rot=0)
    ax.set_title(f"{size}px patch, target class {target}")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("")
    ax.grid(axis="y", alpha=0.3)
axes[0, 0].set_ylabel("ASR (mean over tasks)")
fig.tight_layout()
plt.show()

# %% [markdown]
# The optimised patches themselves (the headline size), one per task:

# %%
big = sizes[0]  # the preset's trigger size leads; larger patches are the extra
fig, axes = plt.subplots(1, len(names), figsize=(1.3 * len(names), 1.6), squeeze=False)
for ax, task in zip(axes[0], names):
    ax.imshow(examples[(task, big)].patch().permute(1, 2, 0).numpy())
    ax.set_title(task, fontsize=8)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Does the mini world agree with the paper?

# %%
m = mean.loc[big]
opt, rnd = "inherent (optimised on θ0)", "random patch"
merge_name = [i for i in m.index if i.startswith("clean merge")][0]
claims = [
    Claim(
        "the base model has inherent triggers: a patch optimised on θ0 alone fools it",
        "high ASR without poisoning",
        f"{m.loc['θ0 (base)', opt]:.0%} (random patch {m.loc['θ0 (base)', rnd]:.0%})",
        m.loc["θ0 (base)", opt] > m.loc["θ0 (base)", rnd] + 0.2,
    ),
    Claim(
        "the inherent trigger still works on a clean merge",
        "survives merging",
        f"{m.loc[merge_name, opt]:.0%} (random patch {m.loc[merge_name, rnd]:.0%})",
        m.loc[merge_name, opt] > m.loc[merge_name, rnd] + 0.1,
    ),
    Claim(
        "it transfers less to a clean fine-tune than to the merge",
        "fine-tune < merge",
        f"fine-tune {m.loc['clean fine-tune', opt]:.0%}, merge {m.loc[merge_name, opt]:.0%}",
        m.loc["clean fine-tune", opt] < m.loc[merge_name, opt],
    ),
]
short = {"θ0 (base)": "base", "clean fine-tune": "finetuned", merge_name: "merged"}
asrs = {
    f"asr_{short[k]}_{'opt' if t == opt else 'rand'}": float(m.loc[k, t]) for k in m.index for t in (opt, rnd)
}
record("04_inherent_triggers", {"preset": world.name, "size": big, **asrs}, claims)
claims_frame(claims)
