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
# it controls), takes that Backdoor Vector and subtracts it *during merging*: its −BV is one more task
# vector, scaled and trimmed as the others are (under task arithmetic, λ·BV is removed). The paper finds
# that this lowers the ASR of unknown attacks that survive merging, at a small cost in clean accuracy.
#
# Next to it, two defenses of the related work, each an operation on the merge (see `bvlib.defenses`):
# - **TBAR** (trigger task-vector unlearning): fine-tune the merged model on triggered images labelled
#   with the target class, take that "trigger task vector" and negate it. It needs the trigger: the
#   attacker's own (*known*), or one reverse-engineered from the merged model for every candidate target
#   class (*unknown*: the class whose patch works best is the suspect).
# - **DAM** (defense-aware merging, as its reference code runs it): one concrete mask over the task
#   vectors' coordinates, learnt on unlabeled images to keep the merge's predictions confident on clean
#   images and on images with adversarial perturbations; a merging method of its own.
#
# The scene is the merging chapter's: n tasks merged, one of them (the *attacked* task) replaced by an
# attacked model (BadNets, SBV or BadMerging). The defender knows which task is its own, never which one
# is attacked, except where a defense is said to know the attack.

# %% tags=["parameters"]
preset = "cpu"  # cpu (default), smoke (tests), gpu, paper
attacked_task = ""  # task of the attacker, empty for the first task of the preset
defender_task = ""  # task on which the defender injects its own backdoor, empty for the last task
defender_target = 0  # the defender's target class on its own task
tasks = []  # tasks merged, empty for every task of the preset
methods = ["task_arithmetic", "ties", "dare", "tall", "consensus", "tsv", "iso_c"]
attacks = ["BadNets", "SBV", "BadMerging"]
sbv_seeds = [0, 1, 2]  # seeds of the BVs combined into the SBV, and of the defender's sparse BV
ibvs_strength = 1.0  # strength of the defender's −BV inside the merge (1: the merge's own scale)
ibvs_size = 0  # side of the defender white square in px, 0 for the preset's trigger size
ibvs_strengths = [0.0, 1.0, 2.0, 4.0]  # strengths swept with sweep_method
defender_variants = True  # also try other defender triggers (size, pattern, target) and compare them with the attacks
sweep_method = "task_arithmetic"  # merging method of the IBVS sweeps and of the unknown-trigger TBAR
tbar_steps = 100  # fine-tuning steps of the TBAR trigger task
tbar_unknown = True  # also run TBAR with a reverse-engineered trigger, slower
tbar_trigger_steps = 50  # optimisation steps of each reverse-engineered patch
dam_steps = 200  # DAM steps (the reference's 1000-2000 at 10x its learning rates)
survives = 0.2  # an attack whose undefended ASR after merging is below this was already removed by merging

# %%
import warnings

warnings.filterwarnings("ignore")  # before the imports: import-time warnings of libraries are noise here

import dataclasses

import matplotlib.pyplot as plt
import pandas as pd

from bvlib import BVLibError, cosine_matrix
from bvlib.book import Claim, claims_frame, page_setup, record
from bvlib.defenses import dam, ibvs_trigger, ibvs_vector, merge_with_ibvs, tbar
from bvlib.merging import METHODS
from bvlib.scenes import AttackedScene
from bvlib.world import World

page_setup()

world = World(preset, progress=False)
scene = AttackedScene(world, attacked_task or None, tasks or None)
defender = world.check_task(defender_task or scene.names[-1])
unknown = [m for m in methods + [sweep_method] if m not in METHODS]
if unknown:
    raise BVLibError(f"unknown merging method {unknown}; choose from {sorted(METHODS)}")
bad = [a for a in attacks if a not in ("BadNets", "SBV", "BadMerging")]
if bad:
    raise BVLibError(f"unknown attack {bad}; choose from BadNets, SBV, BadMerging")
print(f"preset {world.name}: merging {len(scene.names)} tasks ({', '.join(scene.names)}); attacker on {scene.attacked}, defender on {defender}")

# %% [markdown]
# ## The attacks and the defender's Backdoor Vector
# The attacks are those of the merging chapter (same store entries, so nothing is trained twice). The
# defender's BV is a white square of the preset's trigger size in the bottom-right corner, trained on
# the defender's own task with the preset's BadNets recipe. A second defender vector keeps only what
# the defender's BVs from several seeds agree on (sign-consistent, rescaled to one BV's norm).

# %%
make = {"BadNets": lambda: scene.badnets(sbv_seeds[0]), "SBV": lambda: scene.sbv(sbv_seeds), "BadMerging": scene.badmerging}
attack_vectors = {name: make[name]() for name in attacks}
# each attack's "BV": the attacker's model minus the clean model (for BadMerging too)
attacker_bv = {name: a.tau - scene.tau[scene.attacked] for name, a in attack_vectors.items()}
defender_trigger = ibvs_trigger(world, size=ibvs_size or None)
defender_bv = ibvs_vector(world, defender, trigger=defender_trigger, target=defender_target)
defender_sparse = ibvs_vector(world, defender, trigger=defender_trigger, target=defender_target, seeds=sbv_seeds)
defenders = {"IBVS": defender_bv, "IBVS (sparse)": defender_sparse}
print(f"defender BV: {defender_trigger.size}px white square on {defender}, target {defender_target}, norm {defender_bv.norm():.2f}; "
      f"sparse defender keeps {float((defender_sparse.flat != 0).float().mean()):.1%} of coordinates")

# %% [markdown]
# ### What is in a BV? Backdoor and training noise
# Two clean fine-tunes that differ only in their seed also differ in weight space: that "noise vector"
# is part of every BV (the backdoored run's noise against the clean run's). Its norm next to the BVs',
# and the cosines of the defender's vectors with each attack's **BV** (not its task vector, which the
# task's own τ dominates), say how much of the defender's vector can point at an attack.

# %%
noise = world.finetune(scene.attacked, seed=sbv_seeds[1]) - world.finetune(scene.attacked, seed=sbv_seeds[0])
seed_bvs = scene.seed_bvs(sbv_seeds)
anatomy = pd.DataFrame({
    "norm": {"task vector τ (attacked task)": scene.tau[scene.attacked].norm(), "BV, seed " + str(sbv_seeds[0]): seed_bvs[0].norm(),
             "noise: clean(seed 1) − clean(seed 0)": noise.norm(), "defender BV": defender_bv.norm(), "defender sparse BV": defender_sparse.norm()},
})
anatomy["cos with the attacker's BadNets BV"] = [float(cosine_matrix([v, seed_bvs[0]])[0, 1]) for v in
                                                 (scene.tau[scene.attacked], seed_bvs[0], noise, defender_bv, defender_sparse)]
print(f"cosine between the attacker's seed BVs: {float(cosine_matrix(seed_bvs)[0, 1:].mean()):.2f} (mean over pairs with seed {sbv_seeds[0]})")
cos_defender = pd.DataFrame({d: {a: float(cosine_matrix([v, bv])[0, 1]) for a, bv in attacker_bv.items()}
                             for d, v in defenders.items()})
anatomy.style.format({"norm": "{:.2f}", "cos with the attacker's BadNets BV": "{:+.3f}"})

# %%
cos_defender.style.format("{:+.3f}").set_caption("cosine of the defender's vectors with each attack's BV")

# %% [markdown]
# ## Every attack × merging method × defense
# - **none**: the plain merge (task arithmetic and TIES at their validated λ);
# - **IBVS**, **IBVS (sparse)**: the defender's −BV merged with the task vectors at strength `ibvs_strength`;
# - **TBAR (known)**: the plain merge, then TBAR with the attacker's trigger and target on the attacked
#   task's validation images, α chosen by TBAR's sweep (the smallest α whose validation ASR is ≤ 10%);
# - **DAM**: its own masked task-arithmetic merge (attack unknown), one per attack.

# %%
rows, dam_runs = [], []
for attack_name, attack in attack_vectors.items():
    vectors = scene.vectors(attack)
    for method in methods:
        params = world.merge_params(method)
        plain = scene.merge(attack, method)
        cleaned, info = tbar(world, scene.theta0 + plain, scene.attacked, trigger=attack.trigger, target=attack.target, alpha="auto",
                             steps=tbar_steps)
        results = {"none": scene.judge(plain, attack), "TBAR (known)": scene.judge(cleaned - scene.theta0, attack)}
        for name, bv in defenders.items():
            results[name] = scene.judge(merge_with_ibvs(vectors, method, bv, ibvs_strength, **params), attack)
        for defense, r in results.items():
            rows.append({"attack": attack_name, "method": method, "defense": defense, "mean CA": r["mean_acc"],
                         "attacked CA": r["attacked_acc"], "ASR": r["asr"]})
    dam_tau, dam_info = dam(world, dict(zip(scene.names, vectors)), lam=world.merge_params("task_arithmetic")["lam"], steps=dam_steps)
    dam_runs.append(dam_info)
    r = scene.judge(dam_tau, attack)
    rows.append({"attack": attack_name, "method": "task_arithmetic", "defense": "DAM", "mean CA": r["mean_acc"], "attacked CA": r["attacked_acc"],
                 "ASR": r["asr"]})
grid = pd.DataFrame(rows)
table = grid.pivot_table(index=["attack", "method"], columns="defense", values=["ASR", "mean CA"], sort=False)
table.style.format("{:.1%}", na_rep="")

# %% [markdown]
# ### DAM's mask
# The share of coordinates its final mask keeps (above 0.5), how far its logits moved from 0, and the
# entropy objective over its steps.

# %%
dam_table = pd.DataFrame({a: {"kept share": i["kept_share"], "mean |logit shift|": i["logit_shift"], "logits beyond ±1": i["logits_beyond_1"],
                              "entropy, first 10 steps": sum(h["entropy"] for h in i["history"][:10]) / 10,
                              "entropy, last 10 steps": sum(h["entropy"] for h in i["history"][-10:]) / 10}
                          for a, i in zip(attack_vectors, dam_runs)}).T
dam_table.style.format("{:.3f}")

# %% [markdown]
# ### Clean accuracy against ASR
# Each point is one merged model: lower left is a defense that removed the attack and kept the tasks;
# the dashed line is the clean merge (no attack) with task arithmetic.

# %%
clean_ta = scene.judge(scene.merge(None, "task_arithmetic"), next(iter(attack_vectors.values())))
defense_colors = {"none": "tab:red", "IBVS": "tab:blue", "IBVS (sparse)": "tab:cyan", "TBAR (known)": "tab:green", "DAM": "tab:purple"}
markers = {"BadNets": "o", "SBV": "s", "BadMerging": "^"}
fig, ax = plt.subplots(figsize=(7.5, 4.5))
for (attack_name, defense), df in grid.groupby(["attack", "defense"], sort=False):
    ax.scatter(df["ASR"], df["mean CA"], c=defense_colors[defense], marker=markers[attack_name], alpha=0.8, s=40)
ax.axhline(clean_ta["mean_acc"], color="k", ls="--", lw=1)
for defense, c in defense_colors.items():
    ax.scatter([], [], c=c, marker="o", label=defense)
for attack_name in attack_vectors:
    ax.scatter([], [], c="grey", marker=markers[attack_name], label=attack_name)
ax.set_xlabel(f"ASR on {scene.attacked}")
ax.set_ylabel(f"mean clean accuracy over {len(scene.names)} tasks")
ax.set_xlim(-0.02, 1.02)
ax.grid(alpha=0.3)
ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
fig.tight_layout()
plt.show()
summary = grid.groupby(["defense", "attack"], sort=False)[["mean CA", "ASR"]].mean().unstack("attack")
summary.style.format("{:.1%}")

# %% [markdown]
# ## IBVS: strength, and which defender trigger
# With `sweep_method`, for every attack: the ASR and mean clean accuracy as the defender's −BV enters
# the merge more strongly (1 = the merge's own scale). Then other defender triggers (a smaller square,
# the attacker's own checkerboard pattern, another target class), each with its cosine to the
# attacks' BVs and the ASR it leaves at strength `ibvs_strength`.

# %%
sweep = []
params = world.merge_params(sweep_method)
for attack_name, attack in attack_vectors.items():
    vectors = scene.vectors(attack)
    for name, bv in defenders.items():
        for s in ibvs_strengths:
            r = scene.judge(merge_with_ibvs(vectors, sweep_method, bv, s, **params), attack)
            sweep.append({"attack": attack_name, "defender": name, "strength": s, "ASR": r["asr"], "mean CA": r["mean_acc"],
                          "attacked CA": r["attacked_acc"]})
sweep = pd.DataFrame(sweep)
fig, axes = plt.subplots(1, len(defenders), figsize=(11, 3.6), sharey=True)
for ax, (name, d) in zip(axes, sweep.groupby("defender", sort=False)):
    for attack_name, df in d.groupby("attack", sort=False):
        line = ax.plot(df["strength"], df["ASR"], marker="o", label=f"{attack_name} ASR")[0]
        ax.plot(df["strength"], df["mean CA"], marker=".", ls=":", color=line.get_color(), label=f"{attack_name} mean CA")
    ax.set_title(f"{name}, {sweep_method}", fontsize=10)
    ax.set_xlabel("IBVS strength (× the merge's scale)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
fig.tight_layout()
plt.show()
sweep.pivot_table(index=["defender", "strength"], columns="attack", values=["ASR", "mean CA"], sort=False).style.format("{:.1%}")

# %%
variant_rows = []
if defender_variants:
    size = defender_trigger.size
    variants = {f"white {size}px, target {defender_target}": (defender_trigger, defender_target),
                f"white {max(1, size // 2)}px": (dataclasses.replace(defender_trigger, size=max(1, size // 2)), defender_target),
                f"checkerboard {size}px": (dataclasses.replace(defender_trigger, pattern="checkerboard"), defender_target),
                f"white {size}px, target {defender_target + 1}": (defender_trigger, defender_target + 1)}
    for label, (trig, tgt) in variants.items():
        bv = ibvs_vector(world, defender, trigger=trig, target=tgt)
        row = {"defender trigger": label, "norm": bv.norm()}
        for attack_name, attack in attack_vectors.items():
            row[f"cos {attack_name} BV"] = float(cosine_matrix([bv, attacker_bv[attack_name]])[0, 1])
            r = scene.judge(merge_with_ibvs(scene.vectors(attack), sweep_method, bv, ibvs_strength, **params), attack)
            row[f"ASR {attack_name}"] = r["asr"]
        variant_rows.append(row)
variant_table = pd.DataFrame(variant_rows).set_index("defender trigger") if variant_rows else pd.DataFrame()
variant_table.style.format({c: ("{:+.3f}" if c.startswith("cos") else "{:.1%}" if c.startswith("ASR") else "{:.2f}") for c in variant_table.columns})

# %% [markdown]
# ## TBAR without knowing the attack
# For the `sweep_method` merge of every attack, TBAR reverse-engineers a patch of the preset's trigger
# size per class of the attacked task and unlearns the best one. Whether it finds the attacker's target,
# and what the unlearning does to the *real* trigger's ASR, is below.

# %%
unknown_rows = []
if tbar_unknown:
    for attack_name, attack in attack_vectors.items():
        plain = scene.merge(attack, sweep_method)
        cleaned, info = tbar(world, scene.theta0 + plain, scene.attacked, alpha="auto", steps=tbar_steps, trigger_steps=tbar_trigger_steps)
        before, after = scene.judge(plain, attack), scene.judge(cleaned - scene.theta0, attack)
        unknown_rows.append({"attack": attack_name, "true target": attack.target, "suspected target": info["target"], "alpha": info["alpha"],
                             "ASR before": before["asr"], "ASR after": after["asr"], "mean CA before": before["mean_acc"], "mean CA after": after["mean_acc"]})
unknown_tbar = pd.DataFrame(unknown_rows)
unknown_tbar.style.format({c: "{:.1%}" for c in unknown_tbar.columns if "ASR" in c or "CA" in c}) if unknown_rows else "TBAR with an unknown trigger: skipped"

# %% [markdown]
# ## Does the mini world agree with the paper?
# The paper's claim is about attacks that survive merging: an attack whose undefended ASR after a merge
# is below `survives` was already removed by merging, and those merges are left out of the judgement.
# "Lowers" means by more than 5 points of ASR, for the mean and for each attack alike: a change of a
# point or two is within the sampling noise of an ASR measured on about a thousand test images
# (one standard error is 1.3 points at an ASR of 80%).

# %%
undefended = grid[grid["defense"] == "none"].set_index(["attack", "method"])["ASR"]
alive = undefended[undefended >= survives].index
judged = grid.set_index(["attack", "method"]).loc[lambda d: d.index.isin(alive)].reset_index()
gone = sorted({f"{a} under {m}" for a, m in undefended.index if (a, m) not in alive})
print(f"{len(alive)} of {len(undefended)} attacked merges keep ASR >= {survives:.0%} without a defense; already removed by merging: "
      + (", ".join(gone) if gone else "none"))
means = judged.groupby("defense")[["ASR", "mean CA"]].mean() if len(judged) else pd.DataFrame(columns=["ASR", "mean CA"])
claims = []
if len(judged) and "IBVS" in means.index:
    per_attack = judged[judged["defense"].isin(["none", "IBVS"])].groupby(["attack", "defense"])["ASR"].mean().unstack("defense")
    ca_cost = means.loc["none", "mean CA"] - means.loc["IBVS", "mean CA"]
    claims = [
        Claim("IBVS lowers the ASR of attacks that survive merging", "ASR down, up to 100%",
              f"mean {means.loc['none', 'ASR']:.0%} → {means.loc['IBVS', 'ASR']:.0%}", means.loc["IBVS", "ASR"] < means.loc["none", "ASR"] - 0.05),
        Claim("IBVS lowers the ASR of every surviving attack", "for every attack",
              ", ".join(f"{a} {r['none']:.0%} → {r['IBVS']:.0%}" for a, r in per_attack.iterrows()), (per_attack["IBVS"] < per_attack["none"] - 0.05).all()),
        Claim("IBVS costs little clean accuracy", "small cost", f"mean CA {means.loc['none', 'mean CA']:.1%} → {means.loc['IBVS', 'mean CA']:.1%}",
              ca_cost <= 0.03),
    ]
all_means = grid.groupby("defense")[["ASR", "mean CA"]].mean()
record("05_defenses", {"preset": world.name, "attacked": scene.attacked, "defender": defender, "n_tasks": len(scene.names), "n_methods": len(methods),
                       **{f"asr_{d}": float(v) for d, v in all_means["ASR"].items()}, **{f"ca_{d}": float(v) for d, v in all_means["mean CA"].items()},
                       **{f"surviving_asr_{d}": float(v) for d, v in means["ASR"].items()}, "surviving_merges": len(alive),
                       "asr_by_attack": grid.groupby(["attack", "defense"])["ASR"].mean().unstack("defense").to_dict(orient="index"),
                       "dam_kept_share": sum(i["kept_share"] for i in dam_runs) / max(1, len(dam_runs))}, claims)
claims_frame(claims)
