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
# # The mini world
#
# Every finding in this book is measured in a *world*: a CLIP-style base model θ0, a set of
# image-classification tasks, and for each task a clean fine-tuned model θ_t and a BadNets-backdoored
# one. The paper uses open_clip ViT-B-32 / ViT-L-14 and eight real datasets (TA8). That needs
# pretrained weights and dataset downloads; the default **mini world** keeps every mechanism at a size
# that runs offline on a 2-core CPU: a small open_clip CLIP *pretrained here* with the contrastive loss
# on a captioned corpus, eight tasks built from real data that ships inside Debian and PyPI packages,
# zero-shot heads from class names × prompt templates, and fine-tuning of the image encoder only.
#
# This page is the world card: what each task is, how well the base model does zero-shot, how well a
# clean fine-tune does, and how strong the BadNets backdoor is.
#
# One departure from the paper's protocol: the BadNets patch is a black-and-white checkerboard, not a
# white square, because several mini-world sources (clip-art, glyphs, silhouettes) have white
# backgrounds on which a white corner patch is invisible (a first build measured 17% ASR on a clip-art task
# with it).
#
# **Trigger geometry.** A ViT sees a trigger through its tokens. ViT-B-32 cuts a 224 px image into
# 32 px tokens, and the paper's 22 px corner trigger covers 0.69 of a token's side; two corners'
# triggers then share most of the pixels *inside* their tokens. The mini CLIP cuts 32 px images into
# 8 px tokens, so its trigger is 6 px (0.75 of a token's side). It covers 3.5% of the image where the
# paper's covers 1%: what is kept is the size relative to a token, which is what the encoder sees.

# %% tags=["parameters"]
preset = "cpu"  # cpu (default), smoke (tests), gpu, or paper
show_samples = True  # plot a few training images per task, with and without the trigger

# %%
import warnings

warnings.filterwarnings("ignore")  # before the imports: import-time warnings of libraries are noise here

import matplotlib.pyplot as plt
import pandas as pd
import torch

from bvlib.book import Claim, claims_frame, page_setup, record
from bvlib.world import World

page_setup()

world = World(preset, progress=False)
attack = world.badnets()
print(f"preset {world.name}: model {world.preset.model}, {world.layout.numel:,} image-encoder parameters")
print(
    f"BadNets: {attack.trigger.size}px {attack.trigger.pattern} patch at {attack.trigger.location}, target "
    f"class {attack.target}, "
    f"poison rate {attack.rate}"
)

# %% [markdown]
# ## Tasks
# A row per task: size, the base model's zero-shot accuracy, a clean fine-tune's accuracy, and the
# backdoored fine-tune's clean accuracy and attack success rate (ASR: triggered test images whose true
# label is not the target, classified as the target).

# %%
card = pd.DataFrame(world.card()).set_index("task")
chance = 1 / card["n_classes"]
card["gain"] = card["clean_acc"] - card["zeroshot_acc"]
card.style.format(
    {c: "{:.1%}" for c in ["zeroshot_acc", "clean_acc", "backdoor_clean_acc", "backdoor_asr", "gain"]}
)

# %%
fig, ax = plt.subplots(figsize=(9, 3.6))
x = torch.arange(len(card))
w = 0.2
ax.bar(x - 1.5 * w, card["zeroshot_acc"], w, label="zero-shot θ0")
ax.bar(x - 0.5 * w, card["clean_acc"], w, label="clean fine-tune")
ax.bar(x + 0.5 * w, card["backdoor_clean_acc"], w, label="backdoored: clean acc.")
ax.bar(x + 1.5 * w, card["backdoor_asr"], w, label="backdoored: ASR")
ax.scatter(x - 1.5 * w, chance, marker="_", color="k", s=120, label="chance", zorder=3)
ax.set_xticks(x, card.index)
ax.set_ylim(0, 1.05)
ax.set_ylabel("accuracy / ASR")
ax.legend(ncol=5, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What the images look like
# Training images of each task; the bottom row of each task carries the BadNets trigger.

# %%
if show_samples:
    k = 6
    fig, axes = plt.subplots(2 * len(card), k, figsize=(k * 0.9, 2 * len(card) * 0.95))
    for i, name in enumerate(card.index):
        imgs = world.task(name).train.images[:k].float() / 255
        for j in range(k):
            for row, img in ((2 * i, imgs[j]), (2 * i + 1, attack.trigger.apply(imgs[j : j + 1])[0])):
                axes[row, j].imshow(img.permute(1, 2, 0).numpy())
                axes[row, j].axis("off")
        axes[2 * i, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## Does the world meet its targets?
# The mini world is only useful if it behaves like the paper's: fine-tuning must teach the base
# something (task vectors are made of that gap), and BadNets must work without hurting clean accuracy.

# %%
checks = {
    "mean clean fine-tuned accuracy >= 85%": card["clean_acc"].mean() >= 0.85,
    "BadNets ASR >= 95% on every task": bool((card["backdoor_asr"] >= 0.95).all()),
    "backdoored clean accuracy within 2 points of clean on every task": bool(
        ((card["clean_acc"] - card["backdoor_clean_acc"]).abs() <= 0.02).all()
    ),
    "zero-shot above chance on at least half the tasks": bool((card["zeroshot_acc"] > chance).mean() >= 0.5),
    "mean fine-tuning gain over zero-shot >= 10 points": card["gain"].mean() >= 0.10,
}
summary = {
    "preset": world.name,
    "n_tasks": len(card),
    "mean_zeroshot_acc": card["zeroshot_acc"].mean(),
    "mean_clean_acc": card["clean_acc"].mean(),
    "mean_backdoor_clean_acc": card["backdoor_clean_acc"].mean(),
    "mean_backdoor_asr": card["backdoor_asr"].mean(),
    "min_backdoor_asr": card["backdoor_asr"].min(),
    "targets_met": int(sum(checks.values())),
    "targets": len(checks),
}
record("00_world", summary)
pd.DataFrame({"target": list(checks), "met": ["yes" if v else "NO" for v in checks.values()]}).set_index(
    "target"
)

# %% [markdown]
# ## Is this world in the task-arithmetic regime?
# Every finding about merging needs a world where merging *works*: at paper scale (ViT-B-32 on TA8)
# zero-shot is about 48%, single fine-tunes about 90%, and task arithmetic over the eight task vectors
# about 69-70% (normalized accuracy, merged / single per task, about 0.77; TIES about 0.8). Here the
# clean task vectors of every task are merged at each λ of a grid, λ is chosen on the **validation**
# split, and the test split reports the result.

# %%
curves = world.merge_curves()
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for (method, c), color in zip(curves.items(), ["tab:blue", "tab:orange"]):
    axes[0].plot(c["lams"], c["val"], ls="--", color=color, label=f"{method} (val)")
    axes[0].plot(c["lams"], c["test"], marker="o", color=color, label=f"{method} (test)")
    axes[0].axvline(c["lam"], color=color, lw=0.8, ls=":")
axes[0].axhline(card["zeroshot_acc"].mean(), color="k", ls="--", lw=1, label="zero-shot θ0")
axes[0].axhline(card["clean_acc"].mean(), color="k", ls="-", lw=1, label="single fine-tunes")
axes[0].set_xscale("log")
axes[0].set_xlabel("λ (log scale)")
axes[0].set_ylabel("mean accuracy over the tasks")
axes[0].legend(fontsize=7)
normalized = pd.DataFrame({m: c["normalized"] for m, c in curves.items()})
normalized.plot.bar(ax=axes[1], rot=30)
axes[1].axhline(0.77, color="k", ls="--", lw=1, label="paper scale, TA (0.77)")
axes[1].set_ylabel("merged / single accuracy")
axes[1].legend(fontsize=7)
for ax in axes:
    ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()
regime = pd.DataFrame(
    {
        "mini world": [
            card["zeroshot_acc"].mean(),
            card["clean_acc"].mean(),
            curves["task_arithmetic"]["mean_acc"],
            curves["ties"]["mean_acc"],
            curves["task_arithmetic"]["normalized_acc"],
            curves["ties"]["normalized_acc"],
        ],
        "paper scale (ViT-B-32, TA8)": [0.48, 0.90, 0.695, 0.72, 0.77, 0.80],
    },
    index=[
        "zero-shot",
        "single fine-tunes",
        f"task arithmetic (λ {curves['task_arithmetic']['lam']:g})",
        f"TIES (λ {curves['ties']['lam']:g})",
        "task arithmetic, normalized",
        "TIES, normalized",
    ],
)
regime.style.format("{:.2f}")

# %%
ta, ties = curves["task_arithmetic"], curves["ties"]
zs = card["zeroshot_acc"].mean()
claims = [
    Claim(
        "task arithmetic merges far above the zero-shot base (the world is in the merging regime)",
        "69.5% vs 48% zero-shot (+21)",
        f"{ta['mean_acc']:.1%} vs {zs:.1%} ({(ta['mean_acc'] - zs) * 100:+.1f}; target +15) at λ "
        f"{ta['lam']:g}",
        ta["mean_acc"] >= zs + 0.15,
    ),
    Claim(
        "task arithmetic keeps most of the single fine-tunes' accuracy",
        "normalized 0.77",
        f"normalized {ta['normalized_acc']:.3f} (target 0.75)",
        ta["normalized_acc"] >= 0.75,
    ),
    Claim(
        "TIES keeps most of the single fine-tunes' accuracy",
        "normalized about 0.8",
        f"normalized {ties['normalized_acc']:.3f} at λ {ties['lam']:g} (target 0.75)",
        ties["normalized_acc"] >= 0.75,
    ),
]
record(
    "00_world",
    summary
    | {
        "ta_lam": ta["lam"],
        "ta_mean_acc": ta["mean_acc"],
        "ta_normalized_acc": ta["normalized_acc"],
        "ties_lam": ties["lam"],
        "ties_mean_acc": ties["mean_acc"],
        "ties_normalized_acc": ties["normalized_acc"],
        "regime_met": sum(c.holds for c in claims),
        "regime_targets": len(claims),
    },
    claims,
)
claims_frame(claims)

# %% [markdown]
# ## Every method's scale, chosen the same way
# Every chapter that merges uses these validated λ for task arithmetic and TIES (`World.merge_params`),
# and for every other method its own λ chosen on the validation split in the same way (its other
# parameters at their published defaults: DARE p 0.9, TALL's λ_t 0.4, Consensus k 2, TSV-M and Iso-C
# as their papers), so no method is judged at a scale the others were not offered.
#
# On the `smoke` preset (a few dozen training steps, used by the tests) the targets are not expected to
# hold; on the default `cpu` preset the table above says which hold, and the book's intro repeats it.

# %%
scales = world.merge_scales()
pd.DataFrame(
    {
        m: {
            "λ chosen on val": c["lam"],
            "val mean accuracy": max(c["val"]),
            "test mean accuracy": c["mean_acc"],
        }
        for m, c in {**{m: curves[m] for m in ("task_arithmetic", "ties")}, **scales}.items()
    }
).T.style.format({"λ chosen on val": "{:g}", "val mean accuracy": "{:.1%}", "test mean accuracy": "{:.1%}"})
