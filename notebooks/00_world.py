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
# white square, because several mini-world tasks (clip-art, glyphs, silhouettes) have white
# backgrounds on which a white corner patch is invisible (a first build measured 17% ASR on clip-art
# with it).

# %% tags=["parameters"]
preset = "cpu"  # cpu (default), smoke (tests), gpu, or paper
show_samples = True  # plot a few training images per task, with and without the trigger

# %%
import warnings

warnings.filterwarnings("ignore")  # before the imports: import-time warnings of libraries are noise here

import matplotlib.pyplot as plt
import pandas as pd
import torch

from bvlib.book import record
from bvlib.world import World

world = World(preset, progress=False)
attack = world.badnets()
print(f"preset {world.name}: model {world.preset['model']}, {world.layout.numel:,} image-encoder parameters")
print(f"BadNets: {attack.trigger.size}px {attack.trigger.pattern} patch at {attack.trigger.location}, target class {attack.target}, "
      f"poison rate {attack.rate}")

# %% [markdown]
# ## Tasks
# A row per task: size, the base model's zero-shot accuracy, a clean fine-tune's accuracy, and the
# backdoored fine-tune's clean accuracy and attack success rate (ASR: triggered test images whose true
# label is not the target, classified as the target).

# %%
card = pd.DataFrame(world.card()).set_index("task")
chance = 1 / card["n_classes"]
card["gain"] = card["clean_acc"] - card["zeroshot_acc"]
card.style.format({c: "{:.1%}" for c in ["zeroshot_acc", "clean_acc", "backdoor_clean_acc", "backdoor_asr", "gain"]})

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
    "backdoored clean accuracy within 2 points of clean on every task": bool(((card["clean_acc"] - card["backdoor_clean_acc"]).abs() <= 0.02).all()),
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
pd.DataFrame({"target": list(checks), "met": ["yes" if v else "NO" for v in checks.values()]}).set_index("target")

# %% [markdown]
# On the `smoke` preset (a few dozen training steps, used by the tests) the targets are not expected to
# hold; on the default `cpu` preset the table above says which hold, and the book's intro repeats it.
