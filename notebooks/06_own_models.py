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
# # Use it on your own models
#
# A practitioner merges fine-tuned CLIP encoders downloaded from others and worries that one of them
# is backdoored. `bvlib` gives that person two commands that work on checkpoint **files** (safetensors,
# or torch files of plain tensors: nothing is ever unpickled), whole CLIP state dicts or image-encoder
# ones, streamed tensor group by tensor group so that large encoders merge in little memory:
#
# - `bvlib inspect --base BASE A B ... [--bv SUSPECT CLEAN] [--json]`: the paper's diagnostics, i.e. per
#   task vector its norm, share of nonzero coordinates and top-1% mass, the cosine matrix of the task
#   vectors, their sign agreement, and for a suspect/clean pair the Backdoor Vector's statistics;
# - `bvlib merge --base BASE A B ... --method ties [--param lam=0.3] [--defense ibvs --defender-bv
#   BV.safetensors]
#   --out merged.safetensors [--report merged.json]`: any merging method of `bvlib.merging`, optionally
#   with the IBVS defense (the defender's own −BV merged with the task vectors), written in the base's
#   key layout and loadable by `open_clip`;
# - the defenses that need data, with the defender's images in folders (ImageFolder layout,
#   FOLDER/CLASS/IMAGE): `--defense tbar --data NAME=FOLDER` reverse-engineers the unknown trigger on
#   those images and unlearns it from the merge, `--defense dam --data NAME=FOLDER ...` (a folder per
#   checkpoint) learns DAM's mask on them. Both run the models, so they take the architecture
#   (`--model ViT-B-32`) and a base that is a whole CLIP checkpoint (its text tower makes the heads).
#
# Here the mini world plays the user: its base and fine-tunes are written to files (one of them
# backdoored by BadNets), and the commands run on those files exactly as a user would type them.

# %% tags=["parameters"]
preset = "cpu"  # cpu (default), smoke (tests), gpu
attacked_task = ""  # the task whose downloaded model is backdoored, empty for the first task of the preset
defender_task = ""  # the task on which the defender makes its own BV, empty for the last task
method = "ties"  # merging method of `bvlib merge`
tbar_trigger_steps = 100  # TBAR: optimisation steps of each reverse-engineered trigger (one per class)
dam_steps = 100  # DAM: steps of its mask

# %%
import warnings

warnings.filterwarnings("ignore")  # before the imports: import-time warnings of libraries are noise here

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from bvlib.book import page_setup, record
from bvlib.data import write_image_folder
from bvlib.defenses import ibvs_vector
from bvlib.store import bvlib_home, config_key, save_state_dict
from bvlib.world import World

page_setup()

world = World(preset, progress=False)
attacked = world.check_task(attacked_task or world.task_names[0])
defender = world.check_task(defender_task or world.task_names[-1])
# kept between builds (see the image folders below), one per version of the world's data and base
folder = bvlib_home() / "own-models" / f"{world.name}-{config_key(world.artifact_config(world.task_names))}"
folder.mkdir(parents=True, exist_ok=True)
world.export_base(folder / "base.safetensors")  # a whole CLIP state dict, as open_clip saves one
attack = world.badnets()
files = []
for task in world.task_names:
    weights = world.finetune(task, poison=attack if task == attacked else None)
    files.append(
        save_state_dict(weights.state_dict(), folder / f"ft_{task}.safetensors").name
    )  # image-encoder state dicts
save_state_dict(world.finetune(attacked).state_dict(), folder / f"clean_{attacked}.safetensors")
save_state_dict(ibvs_vector(world, defender).state_dict(), folder / "defender_bv.safetensors")
print(
    f"files: base.safetensors, {', '.join(files)} (ft_{attacked} is backdoored), clean_{attacked}, "
    "defender_bv"
)


def bvlib(*args: str) -> str:
    """Run a bvlib command in the folder of the files, as a user would; show the command line."""
    print("$ bvlib " + shlex.join(args))
    exe = Path(sys.executable).with_name("bvlib")
    proc = subprocess.run(
        [str(exe), *args],
        cwd=folder,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONWARNINGS": "ignore"},
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip())
    return proc.stdout


# %% [markdown]
# ## Inspect the downloaded models
# The task vectors' norms and cosines, and (as the paper's diagnostic, when a clean model of the same
# task is at hand) the Backdoor Vector of the suspect model.

# %%
report = json.loads(
    bvlib(
        "inspect",
        "--base",
        "base.safetensors",
        *files,
        "--bv",
        f"ft_{attacked}.safetensors",
        f"clean_{attacked}.safetensors",
        "--json",
    )
)
vectors = pd.DataFrame(report["task_vectors"]).set_index("name")
cos = pd.DataFrame(report["cosine"], index=vectors.index, columns=[n[3:-12] for n in vectors.index])
fig, ax = plt.subplots(figsize=(5.2, 4.2))
im = ax.imshow(cos.values, cmap="RdBu_r", vmin=-1, vmax=1)
ax.set_xticks(range(len(cos)), cos.columns, rotation=45, ha="right")
ax.set_yticks(range(len(cos)), cos.columns)
ax.set_title("cosine of the task vectors (from the files)", fontsize=9)
fig.colorbar(im, ax=ax, fraction=0.046)
fig.tight_layout()
plt.show()
bv = report["bv"]
print(
    f"BV of ft_{attacked}: norm {bv['norm']:.3g}, top-1% mass {bv['top1pct_mass']:.1%}; "
    f"sign agreement of the task vectors: {report['sign_agreement']['unanimous_share']:.1%}"
)
vectors[["norm", "nonzero_share", "top1pct_mass"]]

# %% [markdown]
# ## Merge them, without and with IBVS
# `bvlib merge` with the validated λ of chapter 00, then the same merge with the defender's own BV
# (a white square on the defender's task, made by the defender: it knows nothing of the attack), and
# each merged file evaluated on the attacked task with `bvlib eval`.

# %%
lam = world.merge_params(method).get("lam")
params = ["--param", f"lam={lam:g}"] if lam is not None else []
bvlib(
    "merge",
    "--base",
    "base.safetensors",
    *files,
    "--method",
    method,
    *params,
    "--out",
    "merged.safetensors",
    "--report",
    "merged.json",
)
bvlib(
    "merge",
    "--base",
    "base.safetensors",
    *files,
    "--method",
    method,
    *params,
    "--defense",
    "ibvs",
    "--defender-bv",
    "defender_bv.safetensors",
    "--out",
    "merged_ibvs.safetensors",
)
rows = {}
for label, name in (("merged", "merged.safetensors"), ("merged with IBVS", "merged_ibvs.safetensors")):
    r = json.loads(bvlib("eval", "--preset", preset, "--task", attacked, "--backdoor", "--checkpoint", name))
    rows[label] = {"clean accuracy": r["acc"], "ASR": r["asr"]}
results = pd.DataFrame(rows).T
headline = {
    "preset": world.name,
    "attacked": attacked,
    "method": method,
    **{f"asr_{k.replace(' ', '_')}": v["ASR"] for k, v in rows.items()},
}
record("06_own_models", headline)
results.style.format("{:.1%}")

# %% [markdown]
# The report `merged.json` holds what a reviewer of a merge needs: the method and parameters, every
# input with its sha256, each task vector's norm, their pairwise cosines and sign agreement, and the
# defense applied.

# %%
merged_report = json.loads((folder / "merged.json").read_text())
print(json.dumps({k: merged_report[k] for k in ("method", "params", "base", "defense")}, indent=1))
print(f"{len(merged_report['inputs'])} inputs, e.g. {json.dumps(merged_report['inputs'][0])}")

# %% [markdown]
# ## Defenses that need the defender's images: TBAR and DAM
# The defender holds some labelled images of each task (here each task's val split, written as PNG
# files in ImageFolder layout; the test split stays unseen). TBAR cleans the suspect model itself
# (a "merge" of that one file at λ = 1): it does not know the trigger, so it reverse-engineers a patch
# for every class on the folder's images, takes the class whose patch works best as the target, and
# subtracts the trigger task vector that patch makes. DAM merges all the files by task arithmetic
# (λ of chapter 00) through a mask it learns on the folders' images, labels unread.

# %%
for task in world.task_names:  # written once and kept: their files' dates are in TBAR's and DAM's store keys
    write_image_folder(world.task(task).val, world.task(task).classnames, folder / "images" / task, keep=True)
runs = ["--model", world.preset.model, "--preset", preset]
tbar_out = json.loads(
    bvlib(
        "merge",
        "--base",
        "base.safetensors",
        f"ft_{attacked}.safetensors",
        "--param",
        "lam=1",
        "--defense",
        "tbar",
        *runs,
        "--data",
        f"{attacked}=images/{attacked}",
        "--defense-param",
        f"trigger_steps={tbar_trigger_steps}",
        "--out",
        "tbar.safetensors",
    )
)
ta_lam = world.merge_params("task_arithmetic")["lam"]
bvlib("merge", "--base", "base.safetensors", *files, "--param", f"lam={ta_lam:g}", "--out", "ta.safetensors")
dam_out = json.loads(
    bvlib(
        "merge",
        "--base",
        "base.safetensors",
        *files,
        "--param",
        f"lam={ta_lam:g}",
        "--defense",
        "dam",
        *runs,
        *[f"--data={Path(f).stem}=images/{t}" for f, t in zip(files, world.task_names)],
        "--defense-param",
        f"steps={dam_steps}",
        "--out",
        "dam.safetensors",
    )
)
defended = {}
for label, name in (
    (f"suspect ft_{attacked}", f"ft_{attacked}.safetensors"),
    ("after TBAR", "tbar.safetensors"),
    (f"task arithmetic λ {ta_lam:g}", "ta.safetensors"),
    ("task arithmetic with DAM", "dam.safetensors"),
):
    r = json.loads(bvlib("eval", "--preset", preset, "--task", attacked, "--backdoor", "--checkpoint", name))
    defended[label] = {"clean accuracy": r["acc"], "ASR": r["asr"]}
t, d = tbar_out["defense"], dam_out["defense"]
print(
    f"TBAR: suspected target {t['target']} (attack's: {attack.target}), α {t['alpha']}; "
    f"DAM: mask moved by {d['logit_shift']:.2f} in the mean, {d['kept_share']:.0%} of coordinates kept"
)
record(
    "06_own_models",
    headline
    | {
        "tbar_target_found": t["target"] == attack.target,
        "asr_after_tbar": defended["after TBAR"]["ASR"],
        "asr_dam": defended["task arithmetic with DAM"]["ASR"],
    },
)
pd.DataFrame(defended).T.style.format("{:.1%}")
