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
# # Defenses: IBVS, TBAR and DAM
#
# **Claim (paper, §6).** *Injection Backdoor Vector Subtraction* (IBVS) defends a merge without knowing
# anything about the attack: the defender implants its **own** backdoor (a small white square, on a task
# it controls), takes that Backdoor Vector and subtracts it, scaled, from the merged model. The paper
# finds that this lowers the ASR of unknown attacks at a small cost in clean accuracy.
#
# Next to it, two defenses of the related work, each an operation on the merge (see `bvlib.defenses`):
# - **TBAR** (trigger task-vector unlearning): fine-tune the merged model on triggered images labelled
#   with the target class, take that "trigger task vector" and negate it. It needs the trigger: the
#   attacker's own (*known*), or one reverse-engineered from the merged model for every candidate target
#   class (*unknown*: the class whose patch works best is the suspect).
# - **DAM** (defense-aware merging, simplified): learn on unlabeled images a task-shared mask and a
#   backdoor-detection mask over the task vectors (the latter against adversarial input patches), and
#   merge only what both keep. DAM is a merging method of its own, so it has one row per attack.
#
# The scene is the one of the merging chapter: n tasks merged, one of them (the *attacked* task)
# replaced by an attacked model (BadNets, SBV or BadMerging). The defender knows which task is its own,
# never which one is attacked, except where a defense is said to know the attack.

# %% tags=["parameters"]
preset = "cpu"  # cpu (default), smoke (tests), gpu, paper
attacked_task = ""  # task of the attacker, empty for the first task of the preset
defender_task = ""  # task on which the defender injects its own backdoor, empty for the last task
tasks = []  # tasks merged, empty for every task of the preset
methods = ["task_arithmetic", "ties", "dare", "tall", "consensus", "tsv", "iso_c"]
attacks = ["BadNets", "SBV", "BadMerging"]
sbv_seeds = [0, 1, 2]  # seeds of the BVs combined into the SBV
ibvs_strength = 1.0  # scale of the subtracted defender BV in the main grid
ibvs_size = 0  # side of the defender white square in px, 0 for the preset patch size
ibvs_strengths = [0.0, 0.5, 1.0, 2.0, 3.0]  # strengths swept with sweep_method
ibvs_sizes = [2, 4, 8]  # defender trigger sides in px swept with sweep_method
sweep_method = "task_arithmetic"  # merging method of the two IBVS sweeps and of the unknown-trigger TBAR
tbar_steps = 100  # fine-tuning steps of the TBAR trigger task
tbar_unknown = True  # also run TBAR with a reverse-engineered trigger, slower
tbar_trigger_steps = 50  # optimisation steps of each reverse-engineered patch
dam_steps = 10  # DAM rounds
dam_attack_steps = 1  # steps of the adversarial patch per DAM round, warm-started from round to round

# %%
import warnings

warnings.filterwarnings("ignore")  # before the imports: import-time warnings of libraries are noise here

import matplotlib.pyplot as plt
import pandas as pd

from bvlib import BVLibError
from bvlib.backdoor_vectors import Attack, attack_bv, backdoored_model, clean_model
from bvlib.book import record
from bvlib.defenses import dam, ibvs_trigger, ibvs_vector, merge_with_ibvs, tbar
from bvlib.merging import METHODS, merge, sparse_backdoor_vector
from bvlib.world import World

world = World(preset, progress=False)
attacked = world.check_task(attacked_task or world.task_names[0])
names = [world.check_task(t) for t in (tasks or world.task_names)]
if attacked not in names:
    names = [attacked] + names
defender = world.check_task(defender_task or names[-1])
unknown = [m for m in methods + [sweep_method] if m not in METHODS]
if unknown:
    raise BVLibError(f"unknown merging method {unknown}; choose from {sorted(METHODS)}")
bad = [a for a in attacks if a not in ("BadNets", "SBV", "BadMerging")]
if bad:
    raise BVLibError(f"unknown attack {bad}; choose from BadNets, SBV, BadMerging")
poison = world.badnets()
theta0 = world.base_weights
tau = {t: world.finetune(t) - theta0 for t in names}  # clean task vectors
print(f"preset {world.name}: merging {len(names)} tasks ({', '.join(names)}); attacker on {attacked}, defender on {defender}")

# %% [markdown]
# ## The attacks and the defender's Backdoor Vector
# The attacks are those of the merging chapter (same store entries, so nothing is trained twice). The
# defender's BV is a white square of the preset's patch size in the bottom-right corner, target class 0,
# trained on the defender's own task with the preset's BadNets recipe: the defender's trigger differs
# from the attacker's checkerboard in pattern, and lives on another task (its class 0 is a class of the
# defender's task, unrelated to the attacker's target class).

# %%
seed_attacks = [Attack(attacked, poison, s) for s in sbv_seeds]
attack_vectors = {}
if "BadNets" in attacks:
    attack_vectors["BadNets"] = (backdoored_model(world, seed_attacks[0]) - theta0, poison.trigger, poison.target)
if "SBV" in attacks:
    sbv = sparse_backdoor_vector([attack_bv(world, a) for a in seed_attacks])
    attack_vectors["SBV"] = (clean_model(world, seed_attacks[0]) + sbv - theta0, poison.trigger, poison.target)
if "BadMerging" in attacks:
    from bvlib.badmerging import badmerging_finetune, badmerging_poison

    bm = badmerging_poison(world, attacked)
    attack_vectors["BadMerging"] = (badmerging_finetune(world, attacked, bm) - theta0, bm.trigger, bm.target)

defender_trigger = ibvs_trigger(world, size=ibvs_size or None)
defender_bv = ibvs_vector(world, defender, trigger=defender_trigger)
cos = {name: float(vec.flat @ defender_bv.flat / (vec.norm() * defender_bv.norm())) for name, (vec, _, _) in attack_vectors.items()}
print(f"defender BV: {defender_trigger.size}px white square on {defender}, norm {defender_bv.norm():.3f}; "
      + ", ".join(f"cos with the {k} task vector {v:+.3f}" for k, v in cos.items()))

# %% [markdown]
# ## Every attack × merging method × defense
# - **none**: the plain merge;
# - **IBVS**: the same merge minus `ibvs_strength` × the defender's BV (attack unknown);
# - **TBAR (known)**: the plain merge, then TBAR with the attacker's trigger and target on the attacked
#   task's validation images, α chosen by TBAR's sweep (the smallest α whose validation ASR is ≤ 10%);
# - **DAM**: its own masked task-arithmetic merge (attack unknown), one per attack.

# %%
def judge(tau_merged, trig, tgt):
    return world.evaluate_merged(theta0 + tau_merged, names, attacked, trig, tgt)


rows = []
clean_ta = judge(merge(list(tau.values()), "task_arithmetic"), poison.trigger, poison.target)
for attack_name, (vec, trig, tgt) in attack_vectors.items():
    vectors = [vec if t == attacked else tau[t] for t in names]
    for method in methods:
        plain = merge(vectors, method)
        cleaned, info = tbar(world, theta0 + plain, attacked, trigger=trig, target=tgt, alpha="auto", steps=tbar_steps)
        for defense, r in {"none": judge(plain, trig, tgt),
                           "IBVS": judge(merge_with_ibvs(vectors, method, defender_bv, ibvs_strength), trig, tgt),
                           "TBAR (known)": world.evaluate_merged(cleaned, names, attacked, trig, tgt)}.items():
            rows.append({"attack": attack_name, "method": method, "defense": defense, "mean CA": r["mean_acc"],
                         "attacked CA": r["attacked_acc"], "ASR": r["asr"]})
    dam_tau, dam_info = dam(world, dict(zip(names, vectors)), steps=dam_steps, attack_steps=dam_attack_steps)
    r = judge(dam_tau, trig, tgt)
    rows.append({"attack": attack_name, "method": "dam", "defense": "DAM", "mean CA": r["mean_acc"], "attacked CA": r["attacked_acc"], "ASR": r["asr"]})
grid = pd.DataFrame(rows)
table = grid.pivot_table(index=["attack", "method"], columns="defense", values=["ASR", "mean CA"], sort=False)
table.style.format("{:.1%}", na_rep="")

# %% [markdown]
# ### Clean accuracy against ASR
# Each point is one merged model: lower left is a defense that removed the attack and kept the tasks;
# the dashed line is the clean merge (no attack) with task arithmetic.

# %%
defense_colors = {"none": "tab:red", "IBVS": "tab:blue", "TBAR (known)": "tab:green", "DAM": "tab:purple"}
markers = {"BadNets": "o", "SBV": "s", "BadMerging": "^"}
fig, ax = plt.subplots(figsize=(7.5, 4.5))
for (attack_name, defense), df in grid.groupby(["attack", "defense"], sort=False):
    ax.scatter(df["ASR"], df["mean CA"], c=defense_colors[defense], marker=markers[attack_name], alpha=0.8, s=40)
ax.axhline(clean_ta["mean_acc"], color="k", ls="--", lw=1)
for defense, c in defense_colors.items():
    ax.scatter([], [], c=c, marker="o", label=defense)
for attack_name in attack_vectors:
    ax.scatter([], [], c="grey", marker=markers[attack_name], label=attack_name)
ax.set_xlabel(f"ASR on {attacked}")
ax.set_ylabel(f"mean clean accuracy over {len(names)} tasks")
ax.set_xlim(-0.02, 1.02)
ax.grid(alpha=0.3)
ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
fig.tight_layout()
plt.show()
summary = grid.groupby(["defense", "attack"], sort=False)[["mean CA", "ASR"]].mean().unstack("attack")
summary.style.format("{:.1%}")

# %% [markdown]
# ## IBVS: strength and trigger size
# With `sweep_method`, for every attack: the ASR and mean clean accuracy as the defender's BV is
# subtracted more strongly, and as the defender's white square grows (each size is one more pair of
# fine-tunes on the defender's task).

# %%
sweep = []
size_bvs = {s: ibvs_vector(world, defender, trigger=ibvs_trigger(world, size=s)) for s in ibvs_sizes}
for attack_name, (vec, trig, tgt) in attack_vectors.items():
    vectors = [vec if t == attacked else tau[t] for t in names]
    for s in ibvs_strengths:
        r = judge(merge_with_ibvs(vectors, sweep_method, defender_bv, s), trig, tgt)
        sweep.append({"attack": attack_name, "sweep": "strength", "value": s, "ASR": r["asr"], "mean CA": r["mean_acc"]})
    for s, bv in size_bvs.items():
        r = judge(merge_with_ibvs(vectors, sweep_method, bv, ibvs_strength), trig, tgt)
        sweep.append({"attack": attack_name, "sweep": "size", "value": s, "ASR": r["asr"], "mean CA": r["mean_acc"]})
sweep = pd.DataFrame(sweep)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for ax, (kind, xlabel) in zip(axes, [("strength", "IBVS strength"), ("size", f"defender trigger side in px, strength {ibvs_strength:g}")]):
    for attack_name, df in sweep[sweep["sweep"] == kind].groupby("attack", sort=False):
        line = ax.plot(df["value"], df["ASR"], marker="o", label=f"{attack_name} ASR")[0]
        ax.plot(df["value"], df["mean CA"], marker=".", ls=":", color=line.get_color(), label=f"{attack_name} mean CA")
    ax.set_xlabel(xlabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
axes[0].set_ylabel(f"{sweep_method}")
axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
fig.tight_layout()
plt.show()
sweep.pivot_table(index=["sweep", "value"], columns="attack", values=["ASR", "mean CA"], sort=False).style.format("{:.1%}")

# %% [markdown]
# ## TBAR without knowing the attack
# For the `sweep_method` merge of every attack, TBAR reverse-engineers a patch of the preset's patch
# size per class of the attacked task and unlearns the best one. Whether it finds the attacker's target,
# and what the unlearning does to the *real* trigger's ASR, is below.

# %%
unknown_rows = []
if tbar_unknown:
    for attack_name, (vec, trig, tgt) in attack_vectors.items():
        plain = merge([vec if t == attacked else tau[t] for t in names], sweep_method)
        cleaned, info = tbar(world, theta0 + plain, attacked, alpha="auto", steps=tbar_steps, trigger_steps=tbar_trigger_steps)
        before, after = judge(plain, trig, tgt), world.evaluate_merged(cleaned, names, attacked, trig, tgt)
        unknown_rows.append({"attack": attack_name, "true target": tgt, "suspected target": info["target"], "alpha": info["alpha"],
                             "ASR before": before["asr"], "ASR after": after["asr"], "mean CA before": before["mean_acc"], "mean CA after": after["mean_acc"]})
unknown_tbar = pd.DataFrame(unknown_rows)
unknown_tbar.style.format({c: "{:.1%}" for c in unknown_tbar.columns if "ASR" in c or "CA" in c}) if unknown_rows else "TBAR with an unknown trigger: skipped"

# %% [markdown]
# ## Does the mini world agree with the paper?

# %%
means = grid.groupby("defense")[["ASR", "mean CA"]].mean()
per_attack = grid[grid["defense"].isin(["none", "IBVS"])].groupby(["attack", "defense"])["ASR"].mean().unstack("defense")
ca_cost = means.loc["none", "mean CA"] - means.loc["IBVS", "mean CA"]
checks = {
    f"IBVS lowers the ASR of attacks it does not know (mean over attacks and methods {means.loc['none', 'ASR']:.0%} to {means.loc['IBVS', 'ASR']:.0%})":
        means.loc["IBVS", "ASR"] < means.loc["none", "ASR"] - 0.05,
    "IBVS lowers the ASR of every attack (" + ", ".join(f"{a} {r['none']:.0%} to {r['IBVS']:.0%}" for a, r in per_attack.iterrows()) + ")":
        bool((per_attack["IBVS"] < per_attack["none"]).all()),
    f"at a small cost in clean accuracy (mean CA {means.loc['none', 'mean CA']:.1%} to {means.loc['IBVS', 'mean CA']:.1%}, at most 3 points)":
        ca_cost <= 0.03,
}
record("05_defenses", {"preset": world.name, "attacked": attacked, "defender": defender, "n_tasks": len(names), "n_methods": len(methods),
                       **{f"asr_{d}": float(v) for d, v in means["ASR"].items()}, **{f"ca_{d}": float(v) for d, v in means["mean CA"].items()},
                       "claims_held": int(sum(checks.values())), "claims": len(checks)})
pd.DataFrame({"observation": list(checks), "agrees with the paper": ["yes" if v else "NO" for v in checks.values()]}).set_index("observation")
