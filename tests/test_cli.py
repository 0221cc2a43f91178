import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

ENV = os.environ | {"PYTHONWARNINGS": "ignore"}


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "bvlib.cli", *args], capture_output=True, text=True, env=ENV, timeout=900
    )


def test_world_json(smoke_world):
    smoke_world.card()  # build first, so the CLI only reads the store
    proc = run("world", "--preset", "smoke", "--json")
    assert proc.returncode == 0, proc.stderr
    card = json.loads(proc.stdout)
    assert card["preset"] == "smoke" and len(card["tasks"]) == len(smoke_world.task_names)
    for method in ("task_arithmetic", "ties"):  # λ validated on the val split, accuracies in [0, 1]
        m = card["merge"][method]
        assert (
            m["lam"] in smoke_world.merge_curves()[method]["lams"]
            and 0 <= m["mean_acc"] <= 1
            and 0 <= m["normalized_acc"] <= 1.5
        )
    assert 0 <= card["zeroshot_mean"] <= 1 and 0 <= card["finetuned_mean"] <= 1
    assert set(card["tasks"][0]) >= {
        "task",
        "n_classes",
        "n_train",
        "n_test",
        "zeroshot_acc",
        "clean_acc",
        "backdoor_clean_acc",
        "backdoor_asr",
    }


def test_finetune_then_eval_a_saved_checkpoint(tmp_path, smoke_world):
    task = smoke_world.task_names[0]
    out = tmp_path / "bd.safetensors"
    proc = run("finetune", "--preset", "smoke", "--task", task, "--backdoor", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    trained = json.loads(proc.stdout)
    proc = run("eval", "--preset", "smoke", "--task", task, "--backdoor", "--checkpoint", str(out))
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads(proc.stdout)
    assert evaluated["acc"] == trained["acc"] and evaluated["asr"] == trained["asr"]


def test_preset_keys_are_set_on_the_command_line(smoke_world):
    """--set finetune.steps=3: the fine-tune the library makes with that override, stored under its own
    key."""
    from bvlib.world import World

    task = smoke_world.task_names[0]
    changed = World("smoke", overrides={"finetune": {"steps": 3, "seed": 2}}, device="cpu", progress=False)
    proc = run(
        "finetune",
        "--preset",
        "smoke",
        "--set",
        "finetune.steps=3",
        "--set",
        "finetune.seed=2",
        "--task",
        task,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (
        result["seed"] == 2
        and changed.has_finetune(task)
        and changed.finetune_key(task) != smoke_world.finetune_key(task)
    )
    assert result["acc"] == changed.evaluate(task, changed.finetune(task))["acc"]
    for bad, message in (
        ("finetune.sed=1", "unknown key 'finetune.sed'"),
        ("finetune", "--set takes KEY=VALUE"),
    ):
        proc = run("world", "--preset", "smoke", "--set", bad)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_errors_are_one_line(tmp_path, smoke_world):
    proc = run("finetune", "--preset", "smoke", "--task", "nope")
    assert (
        proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "unknown task 'nope'" in proc.stderr
    )
    bad = tmp_path / "other.safetensors"
    save_file({"conv1.weight": torch.zeros(3, 3)}, bad)
    proc = run("eval", "--preset", "smoke", "--task", smoke_world.task_names[0], "--checkpoint", str(bad))
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and proc.stderr.strip().count("\n") == 0
    proc = run("world", "--preset", "nope")
    assert proc.returncode == 2 and "unknown preset" in proc.stderr


def test_attack_options_are_checked_before_any_work(smoke_world):
    task = smoke_world.task_names[0]
    proc = run("eval", "--preset", "smoke", "--task", task, "--backdoor", "--target", "99")
    assert (
        proc.returncode == 2
        and "--target 99 is out of range" in proc.stderr
        and proc.stderr.strip().count("\n") == 0
    )
    proc = run("finetune", "--preset", "smoke", "--task", task, "--trigger-size", "6")
    assert proc.returncode == 2 and "--trigger-size only apply with --backdoor" in proc.stderr


def test_the_device_check_runs_at_tiny_sizes(tmp_path):
    """`make device-check`'s script, every timed part at toy sizes on the CPU (its GPU run is issue-sized)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "device.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "scripts" / "device_check.py"),
            "--tiny",
            "--skip",
            "tests",
            "--fabricated-world",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["gpu"] and r["merge"]["ties"]["fp32_ms"] > 0 and r["merge"]["naive_ties_fp32_ms"] > 0
    assert r["finetune"]["bvlib_img_s"] > 0 and r["finetune"]["plain_img_s"] > 0
    assert r["paper_dry_run_s"] > 0 and r["paper_dry_run"]["tbar_s"] > 0
    dare = r["dare_probe"]  # the candidates it times: one draws the shipped bits, the other keeps 1 − p
    assert (
        dare["counters_inside"]["same_bits"] and abs(dare["hash32"]["kept"] - 0.1) < 0.005 and dare["kernels"]
    )
    steps = r["world_steps"]  # the smoke preset's loops at toy step counts
    assert all(
        steps[loop]["ms"] > 0 and steps[loop]["gpu_busy_ms"] > 0
        for loop in ("pretrain", "finetune", "eval_batch")
    )
    assert steps["card_training_s"] > steps["pretrain_steps"] * steps["pretrain"]["ms"] / 1e3
    assert r["gpu_world_s"] > r["gpu_world"]["pretrain_s"] > 0 and r["gpu_world"]["data"].startswith(
        "fabricated"
    )


def test_the_device_checks_fabricated_world_reads_no_image_source(tmp_path, monkeypatch):
    """A GPU machine without the mini world's sources still times its world: tasks and corpus of the
    given sizes, the tasks' own class names, and no source or data cache touched."""
    import importlib.util
    from pathlib import Path

    from bvlib.data.mini import registry
    from bvlib.store import Store
    from bvlib.world import World

    spec = importlib.util.spec_from_file_location(
        "device_check", Path(__file__).resolve().parents[1] / "scripts" / "device_check.py"
    )
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.setenv("BVLIB_CACHE", str(tmp_path / "cache"))
    for name in ("_mnist_source", "_fashion_source", "_patterns_source"):  # what the smoke tasks read
        monkeypatch.setattr(registry, name, lambda: 1 / 0)
    with check.fabricated_mini_data(
        {"mnist": (30, 5, 10), "fashion": (20, 4, 8), "patterns": (12, 3, 6)}, 50
    ):
        world = World("smoke", store=Store(tmp_path / "store"))
        mnist = world.task("mnist")
        assert [len(mnist.train), len(mnist.val), len(mnist.test)] == [30, 5, 10] and mnist.classnames[
            3
        ] == "3"
        assert mnist.train.images.dtype == torch.uint8 and mnist.train.images.shape[1:] == (3, 32, 32)
        assert len(world.task("fashion").classnames) == 10
    assert not (tmp_path / "cache").exists()
