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
# # Backdoor Vectors: inject and remove by scaling
#
# **Claim (paper, §3).** A backdoor behaves like a task vector. With
# BV = θ<sub>backdoored</sub> − θ<sub>clean</sub>, adding λ·BV to the
# clean model injects the backdoor: the attack success rate (ASR) rises sharply with λ while clean
# accuracy (CA) stays flat. Subtracting it from the backdoored model removes the backdoor.
#
# Here: for each task, a clean and a BadNets-backdoored fine-tune from the same θ0 with the same seed,
# their BV, and a sweep of λ in both directions.

# %% tags=["parameters"]
preset = "cpu"  # cpu (default), smoke (tests), gpu, paper
tasks = []  # tasks to sweep, empty for every task of the preset
scales = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]  # λ values
trigger_size = None  # BadNets patch side in pixels, None for the preset default
target = None  # BadNets target class, None for the preset default

# %%
import warnings

warnings.filterwarnings("ignore")  # before the imports: import-time warnings of libraries are noise here

import matplotlib.pyplot as plt
import pandas as pd

from bvlib.backdoor_vectors import Attack, scale_sweep, vector_stats
from bvlib.book import Claim, claims_frame, page_setup, record
from bvlib.world import World

page_setup()

world = World(preset, progress=False)
over = {}
if trigger_size is not None:
    over["trigger"] = {"size": int(trigger_size)}
if target is not None:
    over["target"] = int(target)
poison = world.badnets(**over)
names = list(tasks) or world.task_names
attacks = [Attack(world.check_task(t), poison) for t in names]
for a in attacks:
    a.trigger.check_fits(*world.task(a.task).test.images.shape[-2:])
print(
    f"preset {world.name}; BadNets {poison.trigger.size}px {poison.trigger.location}, target "
    f"{poison.target}; tasks: {', '.join(names)}"
)

# %%
rows = []
for a in attacks:
    rows += scale_sweep(world, a, scales, "inject") + scale_sweep(world, a, scales, "remove")
sweep = pd.DataFrame(rows)
mean = sweep.groupby(["mode", "scale"])[["acc", "asr"]].mean().reset_index()

# %% [markdown]
# ## Injection and removal
# Thin lines: single tasks; thick: the mean over tasks.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
titles = {
    "inject": r"inject: $\theta_{clean} + \lambda\,BV$",
    "remove": r"remove: $\theta_{backdoored} - \lambda\,BV$",
}
for ax, mode in zip(axes, ["inject", "remove"]):
    for _, df in sweep[sweep["mode"] == mode].groupby("task"):
        ax.plot(df["scale"], df["asr"], color="tab:red", alpha=0.25, lw=1)
        ax.plot(df["scale"], df["acc"], color="tab:blue", alpha=0.25, lw=1)
    m = mean[mean["mode"] == mode]
    ax.plot(m["scale"], m["asr"], color="tab:red", lw=3, marker="o", label="ASR")
    ax.plot(m["scale"], m["acc"], color="tab:blue", lw=3, marker="o", label="clean accuracy")
    ax.set_title(titles[mode])
    ax.set_xlabel(r"$\lambda$")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("rate")
axes[0].legend()
fig.tight_layout()
plt.show()

# %%
table = mean.pivot(index="scale", columns="mode", values=["acc", "asr"])
table.columns = [f"{m} {v}" for v, m in table.columns]
table[["inject acc", "inject asr", "remove acc", "remove asr"]].style.format("{:.1%}")

# %% [markdown]
# ## How big and how sparse is a BV?
# The BV next to the task vector τ = θ_clean − θ0 of the same task: norms, the share of squared norm held
# by the largest 1% of coordinates (1.0 would be perfectly sparse; a random dense vector holds ≈ 1–5%),
# and their cosine similarity.

# %%
stats = pd.DataFrame([vector_stats(world, a) for a in attacks]).set_index("task")
stats.style.format(
    {
        "tau_norm": "{:.3f}",
        "bv_norm": "{:.3f}",
        "bv_over_tau": "{:.2f}",
        "tau_top1pct_mass": "{:.1%}",
        "bv_top1pct_mass": "{:.1%}",
        "cos_bv_tau": "{:.2f}",
    }
)

# %% [markdown]
# ## Does the mini world agree with the paper?

# %%
inj = mean[mean["mode"] == "inject"].set_index("scale")
rem = mean[mean["mode"] == "remove"].set_index("scale")
s0, s1 = min(scales), 1.0 if 1.0 in inj.index else max(scales)
claims = [
    Claim(
        "adding the BV to a clean model injects the backdoor",
        "ASR rises to about 100%",
        f"mean ASR {inj.loc[s0, 'asr']:.0%} → {inj.loc[s1, 'asr']:.0%} (λ={s1:g})",
        inj.loc[s1, "asr"] - inj.loc[s0, "asr"] >= 0.5,
    ),
    Claim(
        "clean accuracy stays flat while the BV is injected",
        "unchanged",
        f"{inj.loc[s1, 'acc'] - inj.loc[s0, 'acc']:+.1%} at λ={s1:g}",
        abs(inj.loc[s1, "acc"] - inj.loc[s0, "acc"]) <= 0.03,
    ),
    Claim(
        "subtracting the BV from the backdoored model removes the backdoor",
        "ASR falls to about the clean level",
        f"mean ASR {rem.loc[s0, 'asr']:.0%} → {rem.loc[s1, 'asr']:.0%}",
        rem.loc[s0, "asr"] - rem.loc[s1, "asr"] >= 0.5,
    ),
    Claim(
        "a BV is smaller than the task vector",
        "‖BV‖ < ‖τ‖",
        f"mean ‖BV‖/‖τ‖ {stats['bv_over_tau'].mean():.2f}",
        stats["bv_over_tau"].mean() < 1.0,
    ),
]
record(
    "01_backdoor_vectors",
    {
        "preset": world.name,
        "asr_inject_0": inj.loc[s0, "asr"],
        "asr_inject_1": inj.loc[s1, "asr"],
        "acc_inject_0": inj.loc[s0, "acc"],
        "acc_inject_1": inj.loc[s1, "acc"],
        "asr_remove_1": rem.loc[s1, "asr"],
        "bv_over_tau": stats["bv_over_tau"].mean(),
    },
    claims,
)
claims_frame(claims)
