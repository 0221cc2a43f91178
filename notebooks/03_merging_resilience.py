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
# combines several BVs of one attack, keeps the coordinates whose sign they all agree on and **sums** them
# there, and the attacker injects θ_clean + β·SBV. The paper calls it the first attack to *leverage*
# merging, one that "combines multiple attacks into a single one" and surpasses prior attacks (BadMerging).
#
# **How the claims are judged here (stated before any number).**
# - *Which attack an SBV is made of* is the experimenter's choice, so three families are built: BadNets
#   BVs of three seeds, BadNets BVs of the same trigger at three token-aligned corners, and BadMerging BVs
#   (θ_BadMerging − θ_clean) of three seeds.
# - *A longer vector survives merging better whatever it is made of*, and it costs the attacker's own
#   model clean accuracy. So every attack is swept in β and compared **at equal cost**: the ASR after
#   merging is read off each β curve (by linear interpolation) where the attacker model's own clean
#   accuracy is `ca_budget` below the clean model's, or at the largest cost both curves reach.
# - *The magnitude control*: each SBV is compared with **one BV of the same attack, scaled** by β. An SBV
#   that only beats an unscaled BV has shown that longer vectors survive, not that sign selection helps.
# - *The merges*: task arithmetic (λ validated on the clean merge, chapter 00) and TIES (trimming and
#   sign election, where a sign-consistent vector can gain) with the disjoint mean at its validated λ;
#   BadMerging's own convention (TIES with a disjoint *sum* × 0.3) is judged for the comparison with
#   BadMerging.
# - *Replication*: every claim is a mean over the attacked tasks (of different kinds) × seed sets, with a
#   95% bootstrap interval (over those replicates and over test images). **holds**: the whole interval
#   above the threshold; **fails**: the whole interval below; **inconclusive** otherwise, or with fewer
#   than three replicates. Thresholds: an SBV "survives better" when its ASR at equal cost is higher
#   (threshold 0 points); merging "weakens" an attack when it lowers its ASR by more than 5 points.

# %% tags=["parameters"]
preset = "cpu"  # cpu (default), smoke (tests), gpu, paper
attacked_tasks = []  # tasks attacked in turn (replicates), empty for the first three tasks of the preset
seed_sets = [[0, 1, 2]]  # each replicate's seeds: the single BV uses the first, an SBV combines all
tasks = []  # tasks merged, empty for every task of the preset
methods = ["task_arithmetic", "ties", "dare", "tall", "consensus", "tsv", "iso_c"]
families = ["BadNets", "BadNets locations", "BadMerging"]  # the attacks SBVs are built from
betas = [0.25, 0.5, 1.0, 1.5, 2.0]  # injection coefficients of the attacker, swept (and 0, the clean model)
ca_budget = 0.02  # the attacker cost (clean accuracy lost by its own model) at which attacks are compared

# %%
import warnings

warnings.filterwarnings("ignore")  # before the imports: import-time warnings of libraries are noise here

import matplotlib.pyplot as plt
import pandas as pd

from bvlib import BVLibError
from bvlib.book import Claim, claims_frame, judged_claim, page_setup, record
from bvlib.merging import METHODS
from bvlib.scenes import MERGES, AttackedScene, at_cost, matched_cost
from bvlib.stats import Rate
from bvlib.world import World

page_setup()

world = World(preset, progress=False)
unknown = [m for m in methods if m not in METHODS]
if unknown:
    raise BVLibError(f"unknown merging method {unknown}; choose from {sorted(METHODS)}")
bad = [f for f in families if f not in AttackedScene.FAMILIES]
if bad:
    raise BVLibError(f"unknown attack family {bad}; choose from {', '.join(AttackedScene.FAMILIES)}")
attacked_list = [world.check_task(t) for t in (attacked_tasks or world.task_names[:3])]
scenes = {t: AttackedScene(world, t, tasks or None) for t in attacked_list}
scene = scenes[attacked_list[0]]
lams = {m: world.merge_params(m).get("lam") for m in ("task_arithmetic", "ties")}
replicates = f"{len(attacked_list)} tasks × {len(seed_sets)} seed set{'s' if len(seed_sets) > 1 else ''}"
print(
    f"preset {world.name}: merging {len(scene.names)} tasks ({', '.join(scene.names)}); attacked in turn: "
    f"{', '.join(attacked_list)}; "
    f"seed sets {seed_sets}"
)
print(f"validated λ: task arithmetic {lams['task_arithmetic']:g}, TIES {lams['ties']:g}")

# %% [markdown]
# ## Every merging method × every attack (attacked task: the first, β = 1)
# Each attack replaces the attacked task's clean task vector by its own: BadNets is the backdoored
# fine-tune (θ_clean + 1·BV); SBV and the mean BV are injected into the clean model; BadMerging is its own
# fine-tune. The ASR is each attack's own trigger's on the attacked task after the merge.

# %%
first = seed_sets[0]
attacks = {
    "BadNets": scene.badnets(first[0]),
    "mean BV": scene.mean_bv(first),
    "SBV": scene.sbv(first),
    "BadMerging": scene.badmerging(first[0]),
}
sbv_vec = attacks["SBV"].tau - scene.tau[scene.attacked]
print(
    f"SBV keeps {float((sbv_vec.flat != 0).float().mean()):.1%} of coordinates; injected norms: "
    + ", ".join(f"{k} {a.injected_norm:.2f}" for k, a in attacks.items())
)
alone = pd.DataFrame({name: scene.alone(a) for name, a in attacks.items()}).T
alone.style.format("{:.1%}")

# %%
rows = []
clean_ta = scene.judge(scene.merge(None, "task_arithmetic"), attacks["BadNets"])
variants = [(m, m, {}) for m in methods] + [("ties (sum, λ 0.3)", "ties", {"disjoint": "sum", "lam": 0.3})]
for attack_name, attack in attacks.items():
    for label, method, params in variants:
        r = scene.judge(scene.merge(attack, method, **params), attack)
        rows.append(
            {
                "attack": attack_name,
                "method": label,
                "mean CA": r["mean_acc"],
                "attacked CA": r["attacked_acc"],
                "ASR": r["asr"],
            }
        )
grid = pd.DataFrame(rows)
order = [v[0] for v in variants]
asr = grid.pivot(index="method", columns="attack", values="ASR").loc[order]
ca = grid.pivot(index="method", columns="attack", values="mean CA").loc[order]

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
asr.plot.bar(ax=axes[0], rot=30)
axes[0].set_title(f"ASR on {scene.attacked} after merging {len(scene.names)} models")
axes[0].set_ylim(0, 1.02)
ca.plot.bar(ax=axes[1], rot=30, legend=False)
axes[1].axhline(clean_ta["mean_acc"], color="k", ls="--", lw=1, label="clean merge (TA)")
axes[1].set_title("mean clean accuracy over the merged tasks")
axes[1].set_ylim(0, 1.02)
for ax in axes:
    ax.grid(axis="y", alpha=0.3)
fig.tight_layout()
plt.show()
pd.concat({"ASR": asr, "mean CA": ca}, axis=1).style.format("{:.1%}")

# %% [markdown]
# ## The SBV families against their magnitude control, swept in β
# For every attacked task, seed set, family and β: θ_clean + β·V with V one BV of the family ("BV", the
# magnitude control; for BadMerging at β = 1 the BadMerging model itself) or the family's SBV ("SBV"). The
# attacker's cost is the clean model's accuracy minus its own; the ASR is read after each merge.

# %%
sweep = []
for t, sc in scenes.items():
    for r, seeds in enumerate(seed_sets):
        for family in families:
            for kind in ("BV", "SBV"):
                sweep += [
                    row | {"replicate": f"{t}/{r}"} for row in sc.beta_sweep(family, kind, betas, seeds)
                ]
sweep = pd.DataFrame(sweep)
sbv_kept = {
    f: float((sc.sbv(seed_sets[0], family=f).tau - sc.tau[t]).flat.ne(0).float().mean())
    for t, sc in list(scenes.items())[:1]
    for f in families
}
print(
    "share of coordinates an SBV keeps (first attacked task): "
    + ", ".join(f"{f} {v:.1%}" for f, v in sbv_kept.items())
)
merges = list(MERGES)
fig, axes = plt.subplots(len(scenes), 2, figsize=(11, 3.3 * len(scenes)), squeeze=False)
colors = dict(zip(families, ("tab:blue", "tab:green", "tab:red")))
for i, t in enumerate(attacked_list):
    df = sweep[(sweep["attacked task"] == t) & (sweep["replicate"] == f"{t}/0")]
    for j, m in enumerate(("TA", "TIES")):
        ax = axes[i, j]
        for (family, kind), d in df.groupby(["family", "kind"], sort=False):
            ax.plot(
                100 * d["cost"],
                d[f"ASR {m}"],
                marker="o" if kind == "BV" else "D",
                ls="-" if kind == "SBV" else ":",
                color=colors[family],
                label=f"{kind} ({family})",
            )
        ax.axvline(100 * ca_budget, color="k", lw=0.8, ls="--")
        ax.set_title(f"{t}: ASR after {m}", fontsize=10)
        ax.set_xlabel("attacker's cost (points of its own clean accuracy)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
axes[0, 1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
fig.tight_layout()
plt.show()
fmt = {c: "{:.1%}" for c in sweep.columns if "ASR" in c or "CA" in c or c == "cost"} | {
    "norm": "{:.2f}",
    "beta": "{:g}",
}
sweep.drop(columns=["n_acc", "n_asr"]).style.format(fmt).hide(axis="index")

# %% [markdown]
# ### At equal cost
# Per replicate and merge: the cost both curves reach (`ca_budget`, or less where one curve never costs
# that much) and each attack's ASR there. "BadMerging" is BadMerging's own BV swept in β (β = 1 is the
# BadMerging model), so "SBV (BadMerging) vs BadMerging, scaled" is both that family's magnitude control
# and the paper's comparison with BadMerging.


# %%
def curve(rep: str, family: str, kind: str) -> list[dict]:
    return sweep[(sweep["replicate"] == rep) & (sweep["family"] == family) & (sweep["kind"] == kind)].to_dict(
        "records"
    )


def control(f: str) -> str:
    return "BadMerging, scaled" if f == "BadMerging" else f"one {f} BV, scaled"


comparisons = {f"SBV ({f}) vs {control(f)}": ((f, "SBV"), (f, "BV")) for f in families}
if "BadMerging" in families and "BadNets" in families:
    comparisons["SBV (BadNets) vs BadMerging, scaled"] = (("BadNets", "SBV"), ("BadMerging", "BV"))
at_cost_rows = []
for rep in sweep["replicate"].unique():
    for name, (a, b) in comparisons.items():
        ca_, cb = curve(rep, *a), curve(rep, *b)
        c = matched_cost(ca_, cb, ca_budget)
        for m in merges:
            col = f"ASR {m}"
            va, vb = (at_cost(ca_, c, col), at_cost(cb, c, col)) if c is not None else (None, None)
            at_cost_rows.append(
                {
                    "comparison": name,
                    "merge": m,
                    "replicate": rep,
                    "cost": c,
                    "ASR of the first": va,
                    "ASR of the second": vb,
                    "n": int(ca_[0]["n_asr"]),
                }
            )
at_cost_table = pd.DataFrame(at_cost_rows)
at_cost_table.style.format(
    {"cost": "{:.1%}", "ASR of the first": "{:.1%}", "ASR of the second": "{:.1%}"}, na_rep="–"
).hide(axis="index")

# %% [markdown]
# ## ASR against λ (task arithmetic), attacked task: the first

# %%
lam_rows = []
for attack_name, attack in attacks.items():
    for lam in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0):
        r = scene.judge(scene.merge(attack, "task_arithmetic", lam=lam), attack, [scene.attacked])
        lam_rows.append({"attack": attack_name, "lambda": lam, "ASR": r["asr"]})
fig, ax = plt.subplots(figsize=(6, 3.4))
for name, df in pd.DataFrame(lam_rows).groupby("attack", sort=False):
    ax.plot(df["lambda"], df["ASR"], marker="o", label=name)
ax.axvline(lams["task_arithmetic"], color="k", lw=0.8, ls="--", label="validated λ")
ax.set_xlabel("task arithmetic λ")
ax.set_ylabel("ASR")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Does the mini world agree with the paper?


# %%
def judged(name: str, paper: str, units: list[dict], threshold: float, what: str) -> Claim:
    """A claim whose statistic is the mean over replicates of (first − second) ASR, above `threshold`."""
    return judged_claim(
        name,
        paper,
        units,
        lambda x: (x["a"] - x["b"]).mean(-1),
        threshold,
        what,
        f"{replicates} ({len(units)} judged)",
        empty="no replicate reached a common cost",
    )


weakens = []
for t, sc in scenes.items():
    for seeds in seed_sets:
        bd = sc.badnets(seeds[0])
        n = world.judged_counts(t, bd.target)["asr"]
        merged = sc.judge(sc.merge(bd, "task_arithmetic"), bd, [t])["asr"]
        weakens.append({"a": Rate(sc.alone(bd)["asr"], n), "b": Rate(merged, n)})
claims = [
    judged(
        "merging weakens a BadNets backdoor (task arithmetic)",
        "ASR drops after merging",
        weakens,
        0.05,
        "ASR alone − merged",
    )
]
judged_merges = {
    "SBV (BadNets) vs BadMerging, scaled": merges,
    "SBV (BadMerging) vs BadMerging, scaled": merges,
}
for name in comparisons:
    for m in judged_merges.get(name, ["TA", "TIES"]):
        d = at_cost_table[(at_cost_table["comparison"] == name) & (at_cost_table["merge"] == m)].dropna(
            subset=["ASR of the first", "ASR of the second"]
        )
        units = [
            {
                "a": Rate(float(r["ASR of the first"]), int(r["n"])),
                "b": Rate(float(r["ASR of the second"]), int(r["n"])),
            }
            for _, r in d.iterrows()
        ]
        first_, second = name.split(" vs ")
        claims.append(
            judged(
                f"at equal cost, {first_} survives {m} better than {second}",
                "SBV surpasses BadMerging"
                if second.startswith("BadMerging")
                else "SBV beats its base attack (unscaled)",
                units,
                0.0,
                "ASR difference",
            )
        )
record(
    "03_merging_resilience",
    {
        "preset": world.name,
        "attacked": scene.attacked,
        "attacked_tasks": attacked_list,
        "seed_sets": seed_sets,
        "n_tasks": len(scene.names),
        "lam_task_arithmetic": lams["task_arithmetic"],
        "lam_ties": lams["ties"],
        **{f"asr_{k}": float(v) for k, v in asr.mean().items()},
        **{f"ca_{k}": float(v) for k, v in ca.mean().items()},
        "sbv_kept": sbv_kept,
        "ca_budget": ca_budget,
        "at_cost": at_cost_table.to_dict(orient="records"),
        "alone_asr_badnets": float(alone.loc["BadNets", "asr"]),
    },
    claims,
)
claims_frame(claims)
