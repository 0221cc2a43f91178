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
# # Backdoor Vectors: a runnable companion
#
# *Backdoor Vectors: a Task Arithmetic View on Backdoor Attacks and Defenses* (Twardowski, Marczak,
# Dubiński, Pawlak; arXiv 2510.08016, 2025) treats a backdoor attack as a task vector:
#
# > **BV = θ<sub>backdoored</sub> − θ<sub>clean</sub>**
#
# Adding a BV to a clean model injects the backdoor, subtracting it weakens it. With BVs the paper
# measures how similar attacks are and how they transfer, builds a stronger attack that survives model
# merging (the Sparse Backdoor Vector, SBV), traces strong attacks to *inherent triggers* of the base
# model, and proposes a defense that needs no knowledge of the attack (Injection BV Subtraction, IBVS).
#
# This book re-runs those findings with `bvlib`. Each chapter is a parameterised notebook executed by
# papermill; the numbers below are read from the executed chapters, not typed by hand.

# %% tags=["parameters"]
preset = "cpu"

# %% tags=["remove-input"]
from IPython.display import HTML, Markdown, display

from bvlib.book import claims_frame, recorded

results = recorded()
world = results.get("00_world")
lines = []
if world:
    lines.append(
        f"**The world** (preset `{world['preset']}`, {world['n_tasks']} tasks, [chapter](00_world)): "
        f"zero-shot {world['mean_zeroshot_acc']:.1%}, "
        f"clean fine-tunes {world['mean_clean_acc']:.1%}, BadNets ASR {world['mean_backdoor_asr']:.1%} at "
        "clean accuracy "
        f"{world['mean_backdoor_clean_acc']:.1%}; task arithmetic over the clean task vectors "
        f"{world.get('ta_mean_acc', float('nan')):.1%} "
        f"(normalized {world.get('ta_normalized_acc', float('nan')):.2f}; paper scale 0.77)."
    )
rows = [(name, c) for name, r in results.items() for c in r.get("claims_table", [])]
if rows:
    words = [c.get("verdict") or ("holds" if c["holds"] else "fails") for _, c in rows]
    counts = ", ".join(f"{words.count(w)} {w}" for w in ("holds", "fails", "inconclusive"))
    lines.append(
        f"## The paper's claims, checked here\n\nOf {len(rows)} claims in this build: {counts}. A claim "
        "**holds** when the "
        "95% interval of its statistic lies entirely on the claimed side of its threshold, **fails** when it "
        "lies entirely "
        "on the other side, and is **inconclusive** otherwise or with fewer than three attacked tasks × "
        "seeds behind it "
        "(*behind it*). Rows checked on one configuration, without an interval, say so. Each chapter ends "
        "with its own rows."
    )
if not lines:
    lines.append("No chapter has recorded results yet: run `make book`.")
display(Markdown("\n\n".join(lines)))
if rows:
    board = claims_frame(
        [c | {"chapter": f'<a href="{name}.html">{name[:2]}</a>'} for name, c in rows], chapter=True
    )
    board["verdict"] = board["verdict"].map(lambda v: f"<b>{v}</b>" if v == "fails" else v)
    display(HTML(board.to_html(index=False, escape=False, classes="scoreboard")))

# %% tags=["remove-input"]
import matplotlib.pyplot as plt
import pandas as pd

defense = results.get("05_defenses", {})
if defense.get("asr_by_attack"):
    by_attack = pd.DataFrame(defense["asr_by_attack"]).T
    order = [
        d
        for d in ("none", "IBVS", "TBAR (known, oracle)", "DAM", "DAM, untrained mask")
        if d in by_attack.columns
    ]
    by_attack = by_attack[order + [d for d in by_attack.columns if d not in order]]
    ax = by_attack.plot.bar(rot=0, figsize=(8, 3.2), width=0.8)
    ax.set_ylabel("ASR after merging")
    ax.set_ylim(0, 1)
    ax.set_title(
        f"Attacks on `{defense['attacked']}` merged with {defense['n_tasks'] - 1} clean models: ASR per "
        "defense "
        f"(mean over {defense['n_methods']} merging methods; DAM: its own merge)",
        fontsize=9,
    )
    ax.legend(title="defense", fontsize=8, ncol=len(by_attack.columns))
    ax.grid(axis="y", alpha=0.3)
    plt.show()

# %% [markdown]
# ## Re-running
#
# - `make book` builds everything missing (the mini world is cached in `.bvlib/`) and this book.
# - `make notebook NB=00_world PARAMS="-p preset smoke"` re-executes one chapter with new parameters
#   (the same as `bvlib notebook 00_world -p preset smoke`); trained models are reused from the store.
# - `bvlib world --json` prints the world card; `make test` runs the regression suite.
