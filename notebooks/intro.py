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
from IPython.display import Markdown

from bvlib.book import recorded

results = recorded()
lines = []
world = results.get("00_world")
if world:
    lines.append(
        f"**The world** (preset `{world['preset']}`, {world['n_tasks']} tasks): the base model's mean zero-shot accuracy is "
        f"{world['mean_zeroshot_acc']:.1%}; clean fine-tunes reach {world['mean_clean_acc']:.1%}. BadNets backdoors reach a mean "
        f"ASR of {world['mean_backdoor_asr']:.1%} (lowest task {world['min_backdoor_asr']:.1%}) at a clean accuracy of "
        f"{world['mean_backdoor_clean_acc']:.1%}. The world meets {world['targets_met']} of its {world['targets']} targets."
    )
    if "ta_mean_acc" in world:
        lines.append(
            f"**The merging regime** ([chapter](00_world)): task arithmetic over the clean task vectors at the validated λ "
            f"{world['ta_lam']:g} reaches {world['ta_mean_acc']:.1%} (normalized {world['ta_normalized_acc']:.2f}; paper scale: 0.77), "
            f"TIES at λ {world['ties_lam']:g} {world['ties_mean_acc']:.1%} (normalized {world['ties_normalized_acc']:.2f}). "
            f"{world['regime_met']} of {world['regime_targets']} regime targets are met."
        )
bv = results.get("01_backdoor_vectors")
if bv:
    lines.append(
        f"**Backdoor Vectors** ([chapter](01_backdoor_vectors)): adding the BV to a clean model raises the mean ASR from "
        f"{bv['asr_inject_0']:.1%} to {bv['asr_inject_1']:.1%} while clean accuracy goes from {bv['acc_inject_0']:.1%} to "
        f"{bv['acc_inject_1']:.1%}; subtracting it from the backdoored model leaves an ASR of {bv['asr_remove_1']:.1%}. "
        f"A BV's norm is {bv['bv_over_tau']:.2f}× the task vector's. {bv['claims_held']} of {bv['claims']} of the paper's observations hold here."
    )
st = results.get("02_similarity_transfer")
if st:
    groups = [g for g in ("seed", "location, aligned", "location", "target", "task") if f"cos_{g}" in st]
    parts = ", ".join(f"{g} {st[f'cos_{g}']:.2f} / {st[f'transfer_{g}']:.0%}" for g in groups)
    lines.append(
        f"**Similarity and transfer** ([chapter](02_similarity_transfer)): varying one knob of a BadNets attack on "
        f"`{st['task']}`, the BV cosine similarity / transfer ASR to the reference attack is: {parts}. "
        f"The paper's ordering (seeds and locations above target classes and tasks) holds in {st['claims_held']} of {st['claims']} comparisons."
    )
mr = results.get("03_merging_resilience")
if mr:
    attacks = [k[4:] for k in mr if k.startswith("asr_")]
    parts = ", ".join(f"{a} {mr['asr_' + a]:.0%}" for a in attacks)
    lines.append(
        f"**Merging** ([chapter](03_merging_resilience)): merging {mr['n_tasks']} models, one of them attacked on "
        f"`{mr['attacked']}` (BadNets ASR {mr['alone_asr_badnets']:.0%} before merging), the ASR averaged over the merging "
        f"methods is: {parts}. {mr['claims_held']} of {mr['claims']} of the paper's claims hold here."
    )
it = results.get("04_inherent_triggers")
if it:
    lines.append(
        f"**Inherent triggers** ([chapter](04_inherent_triggers)): a {it['size']}px patch optimised against θ0 alone reaches an ASR of "
        f"{it['asr_base_opt']:.0%} on θ0 (a random patch: {it['asr_base_rand']:.0%}), {it['asr_finetuned_opt']:.0%} on clean fine-tuned "
        f"models and {it['asr_merged_opt']:.0%} on a clean merge, with no poisoned training. {it['claims_held']} of {it['claims']} "
        "of the paper's observations hold here."
    )
df = results.get("05_defenses")
if df:
    defenses = [k[4:] for k in df if k.startswith("asr_")]
    parts = ", ".join(f"{d} {df['asr_' + d]:.0%} / {df['ca_' + d]:.1%}" for d in sorted(defenses, key=lambda d: d != "none"))
    lines.append(
        f"**Defenses** ([chapter](05_defenses)): with the attacker on `{df['attacked']}` and the defender's own white-square BV from "
        f"`{df['defender']}`, the ASR / mean clean accuracy over the attacks and {df['n_methods']} merging methods is: {parts}. "
        f"{df.get('surviving_merges', 0)} attacked merges survive merging without a defense; judged on those, "
        f"{df['claims_held']} of {df['claims']} of the paper's claims about IBVS hold here. DAM's mask keeps "
        f"{df.get('dam_kept_share', float('nan')):.0%} of the coordinates."
    )
if not lines:
    lines.append("No chapter has recorded results yet: run `make book`.")
Markdown("\n\n".join(lines))

# %% [markdown]
# ## Re-running
#
# - `make book` builds everything missing (the mini world is cached in `.bvlib/`) and this book.
# - `make notebook NB=00_world PARAMS="-p preset smoke"` re-executes one chapter with new parameters
#   (the same as `bvlib notebook 00_world -p preset smoke`); trained models are reused from the store.
# - `bvlib world --json` prints the world card; `make test` runs the regression suite.
