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
# # Does the backdoor survive merging?
#
# **Claims (paper, §5).** Merging one backdoored model with clean ones *weakens* a plain attack: its task
# vector is averaged, trimmed or rescaled together with the others. The **Sparse Backdoor Vector (SBV)**
# combines several BVs of one attack (here: the same BadNets attack trained with different seeds),
# keeping only the coordinates whose sign they agree on, and injects that into the clean model. The
# paper finds SBV stronger and more resilient to merging than a single BV and than BadMerging.
#
# Here: n tasks merged, one of them (the *attacked* task) replaced by an attacked model, for every
# merging method: mean clean accuracy (CA) over the tasks, the attacked task's CA and the ASR there.
# Next to SBV we also inject the dense *mean* of the same BVs, to see whether the sign selection
# matters or only the averaging does.

# %% tags=["parameters"]
preset = "cpu"  # cpu (default), smoke (tests), gpu, paper
attacked_task = ""  # task of the attacker, empty for the first task of the preset
tasks = []  # tasks merged, empty for every task of the preset
methods = ["task_arithmetic", "ties", "dare", "tall", "consensus", "tsv", "iso_c"]
sbv_seeds = [0, 1, 2]  # seeds of the BVs combined into the SBV
sbv_agreement = 1.0  # share of BVs that must agree on a sign for a coordinate to be kept
sbv_scale = 1.0  # injection strength of SBV and of the mean BV
lams = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]  # task arithmetic coefficients for the lambda sweep
include_badmerging = True  # BadMerging needs its trigger optimised first, a little slower

# %%
import warnings

warnings.filterwarnings("ignore")  # before the imports: import-time warnings of libraries are noise here

import matplotlib.pyplot as plt
import pandas as pd

from bvlib import BVLibError
from bvlib.backdoor_vectors import Attack, attack_bv, backdoored_model, clean_model
from bvlib.book import record
from bvlib.merging import METHODS, merge, sparse_backdoor_vector
from bvlib.world import World

world = World(preset, progress=False)
attacked = world.check_task(attacked_task or world.task_names[0])
names = [world.check_task(t) for t in (tasks or world.task_names)]
if attacked not in names:
    names = [attacked] + names
unknown = [m for m in methods if m not in METHODS]
if unknown:
    raise BVLibError(f"unknown merging method {unknown}; choose from {sorted(METHODS)}")
poison = world.badnets()
theta0 = world.base_weights
tau = {t: world.finetune(t) - theta0 for t in names}  # clean task vectors
print(f"preset {world.name}: merging {len(names)} tasks ({', '.join(names)}); attacker on {attacked}")

# %% [markdown]
# ## The attacks
# Each attack replaces the attacked task's clean task vector by its own:
# - **BadNets**: the backdoored fine-tune, θ_backdoored − θ0 (= clean + one BV);
# - **SBV**: θ_clean + β·SBV, the SBV combined from the seed BVs;
# - **mean BV**: θ_clean + β·mean(BVs), the same BVs without sign selection;
# - **BadMerging**: fine-tuned with an optimised universal trigger and the feature-interpolation loss.

# %%
seed_attacks = [Attack(attacked, poison, s) for s in sbv_seeds]
bvs = [attack_bv(world, a) for a in seed_attacks]
clean = clean_model(world, seed_attacks[0])
sbv = sparse_backdoor_vector(bvs, agreement=sbv_agreement)
mean_bv = sum(bvs[1:], bvs[0]) / len(bvs)
attacks = {
    "BadNets": (backdoored_model(world, seed_attacks[0]) - theta0, poison.trigger, poison.target),
    "SBV": (clean + sbv_scale * sbv - theta0, poison.trigger, poison.target),
    "mean BV": (clean + sbv_scale * mean_bv - theta0, poison.trigger, poison.target),
}
if include_badmerging:
    from bvlib.badmerging import badmerging_finetune, badmerging_poison

    bm = badmerging_poison(world, attacked)  # universal trigger optimised against θ0, same size and place as BadNets
    attacks["BadMerging"] = (badmerging_finetune(world, attacked, bm) - theta0, bm.trigger, bm.target)
kept = float((sbv.flat != 0).float().mean())
print(f"SBV keeps {kept:.1%} of coordinates; cos(SBV, mean BV) = {float((sbv.flat @ mean_bv.flat) / (sbv.norm() * mean_bv.norm())):.2f}")

# %% [markdown]
# ### Before merging
# Each attacked model alone, on its own task.

# %%
alone = pd.DataFrame({name: world.evaluate(attacked, theta0 + v, trig, tgt) for name, (v, trig, tgt) in attacks.items()}).T
alone.style.format("{:.1%}")

# %% [markdown]
# ## Every merging method × every attack

# %%
rows = []
for attack_name, (vec, trig, tgt) in attacks.items():
    vectors = [vec if t == attacked else tau[t] for t in names]
    for method in ["none (clean merge)"] + methods:
        if method.startswith("none"):
            if attack_name != "BadNets":
                continue
            merged = merge([tau[t] for t in names], "task_arithmetic")
        else:
            merged = merge(vectors, method)
        r = world.evaluate_merged(theta0 + merged, names, attacked, trig, tgt)
        rows.append({"attack": attack_name if not method.startswith("none") else "none", "method": method.split(" ")[0] if method.startswith("none") else method,
                     "mean CA": r["mean_acc"], "attacked CA": r["attacked_acc"], "ASR": r["asr"]})
grid = pd.DataFrame(rows)
asr = grid[grid["attack"] != "none"].pivot(index="method", columns="attack", values="ASR").loc[methods]
ca = grid[grid["attack"] != "none"].pivot(index="method", columns="attack", values="mean CA").loc[methods]

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
asr.plot.bar(ax=axes[0], rot=30)
axes[0].set_title(f"ASR on {attacked} after merging {len(names)} models")
axes[0].set_ylim(0, 1.02)
ca.plot.bar(ax=axes[1], rot=30, legend=False)
base_ca = grid[grid["attack"] == "none"]["mean CA"].iloc[0]
axes[1].axhline(base_ca, color="k", ls="--", lw=1, label="clean merge (TA)")
axes[1].set_title("mean clean accuracy over the merged tasks")
axes[1].set_ylim(0, 1.02)
for ax in axes:
    ax.grid(axis="y", alpha=0.3)
fig.tight_layout()
plt.show()
pd.concat({"ASR": asr, "mean CA": ca}, axis=1).style.format("{:.1%}")

# %% [markdown]
# ## ASR against λ (task arithmetic) and against the number of merged models

# %%
lam_rows, n_rows = [], []
others = [t for t in names if t != attacked]
for attack_name, (vec, trig, tgt) in attacks.items():
    vectors = [vec] + [tau[t] for t in others]
    for lam in lams:
        r = world.evaluate_merged(theta0 + merge(vectors, "task_arithmetic", lam=lam), [attacked], attacked, trig, tgt)
        lam_rows.append({"attack": attack_name, "lambda": lam, "ASR": r["asr"]})
    for n in range(1, len(names) + 1):
        r = world.evaluate_merged(theta0 + merge(vectors[:n], "task_arithmetic", lam=1.0 / n), [attacked], attacked, trig, tgt)
        n_rows.append({"attack": attack_name, "models merged": n, "ASR": r["asr"]})
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for name, df in pd.DataFrame(lam_rows).groupby("attack", sort=False):
    axes[0].plot(df["lambda"], df["ASR"], marker="o", label=name)
for name, df in pd.DataFrame(n_rows).groupby("attack", sort=False):
    axes[1].plot(df["models merged"], df["ASR"], marker="o", label=name)
axes[0].set_xlabel("task arithmetic λ")
axes[1].set_xlabel("models merged (averaged: λ = 1/n)")
axes[0].set_ylabel("ASR")
axes[0].legend()
for ax in axes:
    ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Does the mini world agree with the paper?

# %%
single = asr["BadNets"]
checks = {
    f"merging weakens BadNets (ASR alone {alone.loc['BadNets', 'asr']:.0%}, merged mean {single.mean():.0%})": single.mean() < alone.loc["BadNets", "asr"] - 0.05,
    f"SBV beats a single BV after merging (mean ASR {asr['SBV'].mean():.0%} vs {single.mean():.0%})": asr["SBV"].mean() > single.mean(),
    f"SBV beats the dense mean of the same BVs (mean ASR {asr['SBV'].mean():.0%} vs {asr['mean BV'].mean():.0%})": asr["SBV"].mean() > asr["mean BV"].mean(),
}
if "BadMerging" in asr:
    checks[f"SBV beats BadMerging (mean ASR {asr['SBV'].mean():.0%} vs {asr['BadMerging'].mean():.0%})"] = asr["SBV"].mean() > asr["BadMerging"].mean()
record("03_merging_resilience", {"preset": world.name, "attacked": attacked, "n_tasks": len(names),
                                 **{f"asr_{k}": float(v) for k, v in asr.mean().items()}, **{f"ca_{k}": float(v) for k, v in ca.mean().items()},
                                 "alone_asr_badnets": float(alone.loc["BadNets", "asr"]), "claims_held": int(sum(checks.values())), "claims": len(checks)})
pd.DataFrame({"observation": list(checks), "agrees with the paper": ["yes" if v else "NO" for v in checks.values()]}).set_index("observation")
