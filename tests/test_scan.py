"""`bvlib scan`: a trigger search on one checkpoint judged against the same search on θ0."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bvlib.cli import main
from bvlib.defenses.scan import SCAN_CALIBRATION, anomaly_index, roc, scan
from bvlib.store import save_state_dict

STEPS = 150  # the smoke fine-tunes of test_defenses
TASK = "fashion"


@pytest.fixture(scope="module")
def scanned(smoke_world):
    w, attack = smoke_world, smoke_world.badnets()
    backdoored = w.finetune(TASK, poison=attack, steps=STEPS)
    clean = w.finetune(TASK, steps=STEPS)
    return {
        "attack": attack,
        "backdoored": backdoored,
        "clean": clean,
        "bd": scan(w, backdoored, TASK),
        "clean_report": scan(w, clean, TASK),
    }


SMOKE_THRESHOLD = 3.89  # the smoke world's own 5%-FPR threshold (its chapter 07 baseline, 9 models)


def test_a_badnets_model_is_flagged_with_its_target_and_a_clean_one_is_not(scanned):
    """Flagged at the default (the cpu world's) threshold; the clean one stays below the smoke world's
    own threshold. The cpu threshold (1.91) does not carry to the smoke world, whose 150-step clean
    fine-tunes reach anomaly indices near 3: a threshold belongs to the world it was measured on."""
    bd, clean, target = scanned["bd"], scanned["clean_report"], scanned["attack"].target
    assert bd["verdict"] == "suspicious" and bd["suspected_class"] == target, bd["line"]
    assert clean["score"] < SMOKE_THRESHOLD <= bd["score"], (clean["line"], bd["line"])
    assert scan_verdict(clean, SMOKE_THRESHOLD) == "clean"
    row = bd["classes"][target]  # the found patch works on the candidate, far less on the base
    assert row["asr"] > 0.5 and row["excess"] == pytest.approx(row["asr"] - row["base_asr"])
    assert bd["threshold"] == SCAN_CALIBRATION["threshold"] and "SUSPICIOUS" in bd["line"]
    assert bd["weights"]["norm"] > 0 and 0 < bd["weights"]["top1pct_mass"] < 1


def test_the_base_correction_uses_the_same_search_on_theta0(smoke_world, scanned):
    on_base = scan(smoke_world, smoke_world.base_weights, TASK)  # θ0 against itself: no excess anywhere
    assert all(r["excess"] == 0 for r in on_base["classes"]) and on_base["verdict"] == "clean"
    assert [r["base_asr"] for r in on_base["classes"]] == [r["base_asr"] for r in scanned["bd"]["classes"]]


def test_anomaly_index_and_roc_on_known_numbers():
    assert anomaly_index([0.0, 0.0, 0.0, 1.0]).tolist() == [0.0, 0.0, 0.0, 50.0]  # MAD floored at 0.02
    x = anomaly_index([1.0, 2.0, 3.0, 4.0, 100.0])
    assert x[2] == 0 and x[-1] == pytest.approx(97 / (1.4826 * 1.0))
    r = roc(np.arange(10), [5, 10, 11, 12])
    assert r["auc"] == pytest.approx(35.5 / 40) and r["threshold"] == 9 and r["tpr_at_fpr"] == 0.75
    assert r["auc_interval"][0] <= r["auc"] <= r["auc_interval"][1]
    assert (
        r["curve"][0] == {"threshold": float("inf"), "fpr": 0.0, "tpr": 0.0} and r["curve"][-1]["fpr"] == 1.0
    )
    assert roc([0, 1], [2, 3])["auc"] == 1.0 and roc([2, 3], [0, 1])["auc"] == 0.0
    with pytest.raises(ValueError):
        roc([0.0], [1.0, 2.0])


def test_scan_from_the_command_line(smoke_world, scanned, tmp_path, capsys):
    path = save_state_dict(scanned["backdoored"].state_dict(), tmp_path / "suspect.safetensors")
    report = tmp_path / "report.json"
    assert (
        main(["scan", "--preset", "smoke", "--task", TASK, "--checkpoint", str(path), "--json", str(report)])
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(f"{TASK}: SUSPICIOUS: class {scanned['attack'].target}")
    assert any(line.startswith("threshold ") for line in out)  # the rates the threshold stands on
    assert json.loads(report.read_text())["suspected_class"] == scanned["attack"].target


def scan_verdict(report: dict, threshold: float) -> str:
    return "suspicious" if report["score"] >= threshold else "clean"


def _one_line_error(capsys, argv, why):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and why in err, err


def test_bad_inputs_get_one_line(smoke_world, tmp_path, capsys):
    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a pickled module: loading it would run code
    _one_line_error(
        capsys,
        ["scan", "--preset", "smoke", "--task", TASK, "--checkpoint", str(pickled)],
        "refusing to load",
    )
    other = tmp_path / "other.safetensors"  # a state dict of another architecture
    save_file({"conv1.weight": torch.zeros(8, 3, 4, 4)}, str(other))
    _one_line_error(
        capsys, ["scan", "--preset", "smoke", "--task", TASK, "--checkpoint", str(other)], "error:"
    )
    smoke_world.export_base(tmp_path / "base.safetensors")
    (tmp_path / "empty").mkdir()
    _one_line_error(
        capsys,
        [
            "scan",
            "--base",
            str(tmp_path / "base.safetensors"),
            "--model",
            smoke_world.preset.model,
            "--preset",
            "smoke",
            "--data",
            str(tmp_path / "empty"),
            str(other),
        ],
        "error:",
    )
    _one_line_error(capsys, ["scan", "--preset", "smoke", "--task", TASK], "--checkpoint")


def test_screening_scores_the_first_val_images_and_the_refined_patch_the_whole_split(smoke_world):
    """`screen_images` makes a search cheap: screened placements are scored on the head of val (the
    splits are shuffled), the refined patch on all of it, each stored under its own key."""
    from bvlib import data
    from bvlib.defenses.tbar import search_patches
    from bvlib.evaluation import trigger_scores

    w, n = smoke_world, 40
    val = w.task(TASK).val
    assert len(data.head(val, n)) == n and torch.equal(data.head(val, n).labels, val.labels[:n])
    assert data.head(val, 10**6) is val
    found = search_patches(
        w, None, TASK, targets=[1], steps=4, screen_steps=1, batch_size=16, screen_images=n
    )
    trig = found[1]["trigger"]
    whole = w.trigger_scores(TASK, None, trig, 1, split="val")
    head = w.trigger_scores(TASK, None, trig, 1, split="val", images=n)
    assert found[1]["asr"] == whole["asr"]
    assert head == trigger_scores(w.classifier(TASK), data.head(val, n), trig, 1)
    assert head["target_prob"] != whole["target_prob"]  # another sample of images, another mean
