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
#   attacker's own (*known*: an oracle), or one reverse-engineered from the merged model for every
#   candidate target class, searched over the four corners, the centre and two sizes (*unknown*).
# - **DAM** (defense-aware merging, as its reference code runs it): one concrete mask over the task
#   vectors' coordinates, learnt on unlabeled images to keep the merge's predictions confident on clean
#   images and on images with adversarial perturbations; before each mask step the merging weights are
#   reset to λ and take one step, as in the reference's AdaMerging variants.
#
# **How the claims are judged here (stated before any number).**
# - *The defender knows nothing of the attack.* Its square is white, in the **top-left** corner and two
#   thirds of the attacks' patch size (the attacks sit bottom-right); its target is the **last class** of
#   its task (the attacks aim at class 0); it injects into **its own task** (the last merged task). Four
#   variants are judged apart, each saying what it assumes: the defender injects into the *attacked
#   task* (it knows which one), uses the *attack's corner and size*, the *attacker's target* (oracle), or
#   controls no task and injects into **every merged task** (one −BV per task, each aimed at that task's
#   last class; here trained from θ0 on each task's training images with the world's recipe, as every BV
#   of the book is). The last is set against placebos of as many vectors, each of the norm of the BV it
#   stands in for (zero and random).
# - *Placebos*: every IBVS result is set against three vectors with no backdoor in them, merged through
#   the same path at the same strength and norm: a **zero** vector (what one more merged task does by
#   itself), a **random** vector and a **seed divergence** (two clean fine-tunes of the defender's task
#   that differ only in their seed). IBVS *holds* only where it beats the strongest placebo.
# - *Attacks that survive merging*: BadNets, an SBV of three BadNets seed BVs (β = 1) and BadMerging, on
#   each attacked task, merged by task arithmetic and TIES at their validated λ; a merge whose undefended
#   ASR is below `survives` was already defended by merging and is left out.
# - *Thresholds*: a defense "lowers" the ASR when it takes more than 5 points off it (IBVS; DAM: 2 points,
#   the low end of what its paper reports); IBVS "costs little" when the mean clean accuracy over the
#   merged tasks falls by less than `ca_cost`. Each statistic is a mean over the attacked tasks × seed
#   sets (every task pooling its surviving merges) with a 95% bootstrap interval; **holds** / **fails**
#   when the interval lies entirely on one side of the threshold, **inconclusive** otherwise or with fewer
#   than three replicates.

# %% tags=["parameters"]
preset = "cpu"  # cpu (default), smoke (tests), gpu, paper
attacked_tasks = []  # tasks attacked in turn (the replicates), empty for the first three tasks of the preset
seed_sets = [[0, 1, 2]]  # seeds of each replicate: BadNets and BadMerging use the first, the SBV combines all
defender_task = ""  # the task of the defender, empty for the last task merged
tasks = []  # tasks merged, empty for every task of the preset
methods = ["task_arithmetic", "ties", "dare", "tall", "consensus", "tsv", "iso_c"]  # grid of the first task
judged_methods = ["task_arithmetic", "ties"]  # merges the claims are judged after
attacks = ["BadNets", "SBV", "BadMerging"]
ibvs_strength = 1.0  # strength of the −BV of the defender inside the merge (1: the merge's own scale)
ibvs_strengths = [0.0, 1.0, 2.0, 4.0]  # strengths swept with sweep_method
defender_variants = True  # also judge the variants that assume something (task, corner and size, target)
sweep_method = "task_arithmetic"  # merging method of the IBVS sweep and of the unknown-trigger TBAR
tbar_steps = 100  # fine-tuning steps of the TBAR trigger task
tbar_unknown = ["BadMerging"]  # attacks TBAR also meets with a reverse-engineered trigger (slow search)
tbar_trigger_steps = 40  # optimisation steps of the reverse-engineered patch at its best placement
dam_steps = 100  # DAM steps (the 1000-2000 of the reference at 20x its learning rates)
dam_all_tasks = False  # judge DAM on every attacked task and seed set (else on the first attacked task only)
survives = 0.2  # an attack whose undefended ASR after merging is below this was already removed by merging
ca_cost = 0.03  # IBVS costs little when it lowers the mean clean accuracy by less than this

# %%
import warnings

warnings.filterwarnings("ignore")  # before the imports: import-time warnings of libraries are noise here

import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bvlib import BVLibError, cosine_matrix
from bvlib.book import Claim, claims_frame, judged_claim, page_setup, record
from bvlib.defenses import (
    PLACEBOS,
    dam,
    defender_target,
    ibvs_trigger,
    ibvs_vector,
    ibvs_vectors,
    merge_with_ibvs,
    placebo_vector,
    tbar,
)
from bvlib.merging import METHODS
from bvlib.scenes import AttackedScene
from bvlib.stats import Rate
from bvlib.world import World

page_setup()

world = World(preset, progress=False)
attacked_list = [world.check_task(t) for t in (attacked_tasks or world.task_names[:3])]
scenes = {t: AttackedScene(world, t, tasks or None) for t in attacked_list}
scene = scenes[attacked_list[0]]
defender = world.check_task(defender_task or scene.names[-1])
unknown = [m for m in methods + judged_methods + [sweep_method] if m not in METHODS]
if unknown:
    raise BVLibError(f"unknown merging method {unknown}; choose from {sorted(METHODS)}")
bad = [a for a in attacks if a not in ("BadNets", "SBV", "BadMerging")]
if bad:
    raise BVLibError(f"unknown attack {bad}; choose from BadNets, SBV, BadMerging")
if defender in attacked_list:
    raise BVLibError(
        f"the defender's own task '{defender}' is among the attacked tasks {attacked_list}: choose another "
        "defender_task"
    )
replicates = f"{len(attacked_list)} tasks × {len(seed_sets)} seed set{'s' if len(seed_sets) > 1 else ''}"
print(
    f"preset {world.name}: merging {len(scene.names)} tasks ({', '.join(scene.names)}); attacked in turn: "
    f"{', '.join(attacked_list)}; "
    f"defender on {defender}"
)

# %% [markdown]
# ## The attacks and the defender's vectors
# The attacks are those of the merging chapter (same store entries, so nothing is trained twice). The
# defender's BV is its white square trained into its own task with the preset's BadNets recipe; the
# placebos have that BV's norm.


# %%
def attack_vectors(sc: AttackedScene, seeds: list[int]) -> dict:
    make = {
        "BadNets": lambda: sc.badnets(seeds[0]),
        "SBV": lambda: sc.sbv(seeds),
        "BadMerging": lambda: sc.badmerging(seeds[0]),
    }
    return {name: make[name]() for name in attacks}


all_attacks = {
    (t, r): attack_vectors(sc, seeds) for t, sc in scenes.items() for r, seeds in enumerate(seed_sets)
}
first_attacks = all_attacks[(scene.attacked, 0)]
square = ibvs_trigger(world)
own_target = defender_target(world, defender)
defender_bv = ibvs_vector(world, defender, trigger=square, target=own_target)
placebos = {p: placebo_vector(world, p, defender_bv, task=defender, seeds=(0, 1)) for p in PLACEBOS}
attack_square = dataclasses.replace(
    square, size=world.badnets().trigger.size, location=world.badnets().trigger.location
)
variants = {}  # name: (what it assumes, {attacked task: BV})
if defender_variants:
    variants = {
        "IBVS on the attacked task": (
            "knows which task is attacked",
            {
                t: ibvs_vector(world, t, trigger=square, target=defender_target(world, t))
                for t in attacked_list
            },
        ),
        "IBVS with the attack's corner and size": (
            "its square where and as large as the attacks' patches",
            dict.fromkeys(
                attacked_list, ibvs_vector(world, defender, trigger=attack_square, target=own_target)
            ),
        ),
        "IBVS with the attacker's target (oracle)": (
            "knows the attacked task and the attacker's target",
            {t: ibvs_vector(world, t, trigger=square, target=world.badnets().target) for t in attacked_list},
        ),
        "IBVS on every merged task": (
            "controls no task: injects its square into each merged task",
            {t: ibvs_vectors(world, scenes[t].names, trigger=square) for t in attacked_list},
        ),
    }
# placebos of as many vectors, each with the norm of the BV it stands in for (no seed divergence: it would
# need a second clean fine-tune of every task)
count_matched = {
    name: {
        p: {
            t: [placebo_vector(world, p, bv, seed=i) for i, bv in enumerate(bvs)]
            for t, bvs in by_task.items()
        }
        for p in ("zero", "random")
    }
    for name, (_, by_task) in variants.items()
    if isinstance(next(iter(by_task.values())), list)
}
print(
    f"defender: {square.size}px white square at {square.location} on {defender}, target {own_target}; BV "
    f"norm {defender_bv.norm():.2f}"
)
first_bv = {
    name: a.tau - scene.tau[scene.attacked] for name, a in first_attacks.items()
}  # each attack's BV (BadMerging's too)
vectors = {
    "defender BV": defender_bv,
    **{f"placebo: {p}": v for p, v in placebos.items()},
    **{
        v: bvs[scene.attacked]
        if v not in count_matched
        else sum(bvs[scene.attacked][1:], bvs[scene.attacked][0])
        for v, (_, bvs) in variants.items()
    },
}
anatomy = pd.DataFrame(
    {
        name: {
            "norm": v.norm(),
            **{f"cos {a} BV": float(cosine_matrix([v, bv])[0, 1]) for a, bv in first_bv.items()},
        }
        for name, v in vectors.items()
    }
).T
anatomy.style.format("{:+.3f}").format({"norm": "{:.2f}"}).set_caption(
    f"the defender's vectors against the attacks' BVs on {scene.attacked}"
)

# %% [markdown]
# ## Every attack × merging method (first attacked task)
# - **none**: the plain merge; **IBVS**: the defender's −BV merged with the task vectors at strength
#   `ibvs_strength`;
# - **TBAR (known, oracle)**: the plain merge, then TBAR with the attacker's trigger and target on the
#   attacked task's validation images, α by TBAR's sweep (the smallest α whose val ASR is ≤ 10%);
#   after the judged merges only;
# - **DAM**: its own masked task-arithmetic merge, and its **untrained-mask control** (the same merge
#   through the mask at logits 0: its expectation is plain task arithmetic).

# %%
rows, dam_runs = [], {}
lam_ta = world.merge_params("task_arithmetic")["lam"]
for attack_name, attack in first_attacks.items():
    vecs = scene.vectors(attack)
    for method in methods:
        params = world.merge_params(method)
        plain = scene.merge(attack, method)
        results = {
            "none": scene.judge(plain, attack),
            "IBVS": scene.judge(merge_with_ibvs(vecs, method, defender_bv, ibvs_strength, **params), attack),
        }
        if method in judged_methods:
            cleaned, _ = tbar(
                world,
                scene.theta0 + plain,
                scene.attacked,
                trigger=attack.trigger,
                target=attack.target,
                alpha="auto",
                steps=tbar_steps,
            )
            results["TBAR (known, oracle)"] = scene.judge(cleaned - scene.theta0, attack)
        for defense, r in results.items():
            rows.append(
                {
                    "attack": attack_name,
                    "method": method,
                    "defense": defense,
                    "mean CA": r["mean_acc"],
                    "attacked CA": r["attacked_acc"],
                    "ASR": r["asr"],
                }
            )
    taus = dict(zip(scene.names, vecs))
    dam_runs[attack_name] = dam(world, taus, lam=lam_ta, steps=dam_steps)
    for defense, (tau, _) in {
        "DAM": dam_runs[attack_name],
        "DAM, untrained mask": dam(world, taus, lam=lam_ta, steps=0),
        "DAM, untrained sample": dam(world, taus, lam=lam_ta, steps=0, final="sample"),
    }.items():
        r = scene.judge(tau, attack)
        rows.append(
            {
                "attack": attack_name,
                "method": "task_arithmetic",
                "defense": defense,
                "mean CA": r["mean_acc"],
                "attacked CA": r["attacked_acc"],
                "ASR": r["asr"],
            }
        )
grid = pd.DataFrame(rows)
table = grid.pivot_table(index=["attack", "method"], columns="defense", values=["ASR", "mean CA"], sort=False)
table.style.format("{:.1%}", na_rep="")

# %% [markdown]
# ### DAM's mask
# How far its logits moved from 0, the share of coordinates its learnt mask favours (logit > 0), how
# far one step moves the merging weights, and the entropy objective over its steps. "DAM, untrained
# sample" is one concrete sample at logits 0: a random drop of about half the coordinates, rescaled.

# %%
dam_table = pd.DataFrame(
    {
        a: {
            "mean |logit shift|": i["logit_shift"],
            "logits beyond ±1": i["logits_beyond_1"],
            "kept share": i["kept_share"],
            "merging-weight step": i["lam_step"],
            "entropy, first 10 steps": sum(h["entropy"] for h in i["history"][:10])
            / max(1, len(i["history"][:10])),
            "entropy, last 10 steps": sum(h["entropy"] for h in i["history"][-10:])
            / max(1, len(i["history"][-10:])),
        }
        for a, (_, i) in dam_runs.items()
    }
).T
dam_table.style.format("{:.3f}")

# %% [markdown]
# ### Clean accuracy against ASR
# Each point is one merged model: lower left is a defense that removed the attack and kept the tasks;
# the dashed line is the clean merge (no attack) with task arithmetic.

# %%
clean_ta = scene.judge(scene.merge(None, "task_arithmetic"), next(iter(first_attacks.values())))
defense_colors = {
    "none": "tab:red",
    "IBVS": "tab:blue",
    "TBAR (known, oracle)": "tab:green",
    "DAM": "tab:purple",
    "DAM, untrained mask": "tab:pink",
    "DAM, untrained sample": "tab:gray",
}
markers = {"BadNets": "o", "SBV": "s", "BadMerging": "^"}
fig, ax = plt.subplots(figsize=(7.5, 4.5))
for (attack_name, defense), df in grid.groupby(["attack", "defense"], sort=False):
    ax.scatter(
        df["ASR"], df["mean CA"], c=defense_colors[defense], marker=markers[attack_name], alpha=0.8, s=40
    )
ax.axhline(clean_ta["mean_acc"], color="k", ls="--", lw=1)
for defense, c in defense_colors.items():
    ax.scatter([], [], c=c, marker="o", label=defense)
for attack_name in first_attacks:
    ax.scatter([], [], c="grey", marker=markers[attack_name], label=attack_name)
ax.set_xlabel(f"ASR on {scene.attacked}")
ax.set_ylabel(f"mean clean accuracy over {len(scene.names)} tasks")
ax.set_xlim(-0.02, 1.02)
ax.grid(alpha=0.3)
ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## IBVS against its placebos, on every attacked task
# For every attacked task × seed set, attack and judged merge: the undefended ASR, the ASR with IBVS
# (and its variants), and with each placebo in IBVS's place. Mean clean accuracy for the plain merge
# and IBVS.

# %%
judged_rows = []
for (t, r), avs in all_attacks.items():
    sc = scenes[t]
    for attack_name, attack in avs.items():
        n_asr = world.judged_counts(t, attack.target)["asr"]
        vecs = sc.vectors(attack)
        for method in judged_methods:
            params = world.merge_params(method)
            none = sc.judge(sc.merge(attack, method), attack)
            ibvs = sc.judge(merge_with_ibvs(vecs, method, defender_bv, ibvs_strength, **params), attack)
            row = {
                "attacked task": t,
                "replicate": r,
                "attack": attack_name,
                "method": method,
                "n_asr": n_asr,
                "n_ca": sum(world.judged_counts(x)["acc"] for x in sc.names),
                "none": none["asr"],
                "IBVS": ibvs["asr"],
                "mean CA none": none["mean_acc"],
                "mean CA IBVS": ibvs["mean_acc"],
            }
            others = {f"placebo: {p}": v for p, v in placebos.items()} | {
                name: bvs[t] for name, (_, bvs) in variants.items()
            }
            others |= {
                f"{name}, placebo: {p}": by_task[t]
                for name, ps in count_matched.items()
                for p, by_task in ps.items()
            }
            for name, v in others.items():  # the ASR alone: one triggered pass
                tau = merge_with_ibvs(vecs, method, v, ibvs_strength, **params)
                row[name] = world.trigger_scores(t, sc.theta0 + tau, attack.trigger, attack.target)["asr"]
            judged_rows.append(row)
judged_grid = pd.DataFrame(judged_rows)
alive = judged_grid[judged_grid["none"] >= survives]
asr_cols = [
    "none",
    "IBVS",
    *[f"placebo: {p}" for p in placebos],
    *variants,
    *[f"{name}, placebo: {p}" for name, ps in count_matched.items() for p in ps],
]
print(f"{len(alive)} of {len(judged_grid)} attacked merges keep ASR >= {survives:.0%} without a defense")
fig, ax = plt.subplots(figsize=(10, 3.6))
means = (
    alive.groupby("attacked task", sort=False)[asr_cols].mean()
    if len(alive)
    else pd.DataFrame(columns=asr_cols)
)
means.T.plot.bar(ax=ax, rot=20, width=0.8)
ax.set_ylabel("ASR of surviving attacks")
ax.set_ylim(0, 1)
ax.set_title("mean over surviving attacks and judged merges, per attacked task", fontsize=10)
ax.grid(axis="y", alpha=0.3)
ax.legend(title="attacked task", fontsize=8)
fig.tight_layout()
plt.show()
judged_grid.drop(columns=["n_asr", "n_ca", "replicate"]).style.format(
    {c: "{:.1%}" for c in asr_cols + ["mean CA none", "mean CA IBVS"]}
).hide(axis="index")

# %% [markdown]
# ## IBVS: strength
# With `sweep_method`, first attacked task: the ASR and mean clean accuracy as the defender's −BV (and
# each placebo in its place) enters the merge more strongly (1 = the merge's own scale).

# %%
sweep = []
params = world.merge_params(sweep_method)
for attack_name, attack in first_attacks.items():
    vecs = scene.vectors(attack)
    for name, v in {"IBVS": defender_bv, **{f"placebo: {p}": v for p, v in placebos.items()}}.items():
        for s in ibvs_strengths:
            tau = merge_with_ibvs(vecs, sweep_method, v, s, **params)
            r = (
                scene.judge(tau, attack)
                if name == "IBVS"
                else {
                    "asr": world.trigger_scores(
                        scene.attacked, scene.theta0 + tau, attack.trigger, attack.target
                    )["asr"],
                    "mean_acc": np.nan,
                }
            )
            sweep.append(
                {
                    "attack": attack_name,
                    "vector": name,
                    "strength": s,
                    "ASR": r["asr"],
                    "mean CA": r["mean_acc"],
                }
            )
sweep = pd.DataFrame(sweep)
fig, axes = plt.subplots(1, len(first_attacks), figsize=(12, 3.4), sharey=True, squeeze=False)
for ax, (attack_name, d) in zip(axes[0], sweep.groupby("attack", sort=False)):
    for name, df in d.groupby("vector", sort=False):
        ax.plot(df["strength"], df["ASR"], marker="o", ls="-" if name == "IBVS" else ":", label=f"{name} ASR")
    ibvs_ca = d[d["vector"] == "IBVS"]
    ax.plot(ibvs_ca["strength"], ibvs_ca["mean CA"], color="k", marker=".", ls="--", label="IBVS mean CA")
    ax.set_title(f"{attack_name}, {sweep_method}", fontsize=10)
    ax.set_xlabel("strength (× the merge's scale)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
fig.tight_layout()
plt.show()

# %% [markdown]
# ## TBAR without knowing the attack
# For the `sweep_method` merge of each attack of `tbar_unknown` (first attacked task), TBAR reverse-engineers
# a patch per
# class of the attacked task, searched over the four corners, the centre and two sizes, and unlearns the
# best one. Whether it finds the attacker's target, where it put the patch, and what the unlearning does
# to the *real* trigger's ASR, next to TBAR told the trigger (the oracle).

# %%
unknown_rows = []
tbar_unknown = (
    list(first_attacks) if tbar_unknown is True else list(tbar_unknown or [])
)  # true: every attack; false: none
for attack_name, attack in first_attacks.items():
    if attack_name in tbar_unknown:
        plain = scene.merge(attack, sweep_method)
        cleaned, info = tbar(
            world,
            scene.theta0 + plain,
            scene.attacked,
            alpha="auto",
            steps=tbar_steps,
            trigger_steps=tbar_trigger_steps,
        )
        oracle, _ = tbar(
            world,
            scene.theta0 + plain,
            scene.attacked,
            trigger=attack.trigger,
            target=attack.target,
            alpha="auto",
            steps=tbar_steps,
        )
        before, after, told = (
            scene.judge(plain, attack),
            scene.judge(cleaned - scene.theta0, attack),
            scene.judge(oracle - scene.theta0, attack),
        )
        unknown_rows.append(
            {
                "attack": attack_name,
                "true target": attack.target,
                "suspected target": info["target"],
                "patch found": f"{info['trigger']['size']}px {info['trigger']['location']}",
                "alpha": info["alpha"],
                "ASR before": before["asr"],
                "ASR after (unknown)": after["asr"],
                "ASR after (oracle)": told["asr"],
                "mean CA before": before["mean_acc"],
                "mean CA after (unknown)": after["mean_acc"],
            }
        )
unknown_tbar = pd.DataFrame(unknown_rows)
unknown_tbar.style.format(
    {c: "{:.1%}" for c in unknown_tbar.columns if "ASR" in c or "CA" in c}
) if unknown_rows else "TBAR with an unknown trigger: skipped"

# %% [markdown]
# ## Does the mini world agree with the paper?


# %%
def pooled(df: pd.DataFrame, col: str, n_col: str) -> Rate:
    """One replicate's rate: the mean over its surviving merges, on all their images."""
    return Rate(float(df[col].mean()), int(df[n_col].sum()))


def units_of(cols: list[str], n_col: str = "n_asr") -> list[dict]:
    return [
        {c: pooled(d, c, n_col) for c in cols}
        for _, d in alive.groupby(["attacked task", "replicate"], sort=False)
    ]


def judged(
    claim: str, paper: str, units: list[dict], stat, threshold: float, what: str, assumes: str = ""
) -> Claim:
    return judged_claim(
        claim,
        paper,
        units,
        stat,
        threshold,
        what,
        replicates,
        note=assumes,
        empty="no attack survived merging",
    )


placebo_cols = [f"placebo: {p}" for p in placebos]


def beyond_placebos(col: str, against: list[str] = placebo_cols):
    return lambda x: np.min([(x[p] - x[col]).mean(-1) for p in against], axis=0)


claims = [
    judged(
        "IBVS lowers the ASR of attacks that survive merging",
        "ASR down, up to 100%",
        units_of(["none", "IBVS"]),
        lambda x: (x["none"] - x["IBVS"]).mean(-1),
        0.05,
        "ASR none − IBVS",
    ),
    judged(
        "IBVS lowers it more than its placebos (zero, random, seed divergence)",
        "(no placebo in the paper)",
        units_of(["IBVS", *placebo_cols]),
        beyond_placebos("IBVS"),
        0.05,
        "ASR strongest placebo − IBVS",
    ),
    judged(
        "IBVS costs little clean accuracy",
        "small cost",
        units_of(["mean CA none", "mean CA IBVS"], "n_ca"),
        lambda x: ca_cost - (x["mean CA none"] - x["mean CA IBVS"]).mean(-1),
        0.0,
        f"{100 * ca_cost:.0f} points − CA cost",
    ),
]
for name, (assumes, _) in variants.items():
    against = (
        [f"{name}, placebo: {p}" for p in count_matched[name]] if name in count_matched else placebo_cols
    )
    claims.append(
        judged(
            f"{name} lowers the ASR more than the placebos",
            "(not in the paper)",
            units_of([name, *against]),
            beyond_placebos(name, against),
            0.05,
            "ASR strongest placebo − IBVS",
            assumes,
        )
    )
dam_cells = []
for (t, r), avs in all_attacks.items() if dam_all_tasks else [((scene.attacked, 0), first_attacks)]:
    sc = scenes[t]
    for attack_name, attack in avs.items():
        taus = dict(zip(sc.names, sc.vectors(attack)))
        asr = {
            k: world.trigger_scores(
                t, sc.theta0 + dam(world, taus, lam=lam_ta, steps=k)[0], attack.trigger, attack.target
            )["asr"]
            for k in (0, dam_steps)
        }
        dam_cells.append(
            {
                "attacked task": t,
                "replicate": r,
                "attack": attack_name,
                "untrained": asr[0],
                "DAM": asr[dam_steps],
                "n_asr": world.judged_counts(t, attack.target)["asr"],
            }
        )
dam_cells = pd.DataFrame(dam_cells)
dam_alive = dam_cells[dam_cells["untrained"] >= survives]
dam_units = [
    {c: pooled(d, c, "n_asr") for c in ("untrained", "DAM")}
    for _, d in dam_alive.groupby(["attacked task", "replicate"], sort=False)
]
dam_replicates = (
    replicates if dam_all_tasks else "1 task × 1 seed set (DAM judged on the first attacked task only)"
)
if dam_units:
    claims.append(
        judged_claim(
            "DAM lowers the ASR of surviving attacks beyond its untrained mask",
            "ASR −2 to −10 points",
            dam_units,
            lambda x: (x["untrained"] - x["DAM"]).mean(-1),
            0.02,
            "ASR untrained − DAM",
            dam_replicates,
        )
    )
record(
    "05_defenses",
    {
        "preset": world.name,
        "attacked": scene.attacked,
        "attacked_tasks": attacked_list,
        "seed_sets": seed_sets,
        "defender": defender,
        "defender_trigger": square.config(),
        "defender_target": own_target,
        "n_tasks": len(scene.names),
        "n_methods": len(methods),
        "surviving_merges": len(alive),
        "judged_merges": len(judged_grid),
        "surviving_asr": alive[asr_cols].mean().to_dict() if len(alive) else {},
        "asr_by_attack": grid.groupby(["attack", "defense"])["ASR"]
        .mean()
        .unstack("defense")
        .to_dict(orient="index"),
        "dam_logit_shift": float(dam_table["mean |logit shift|"].mean()),
        "tbar_unknown": unknown_tbar.to_dict(orient="records"),
    },
    claims,
)
claims_frame(claims)
