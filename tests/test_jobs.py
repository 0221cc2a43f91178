"""The job list and its executors: local processes and a Ray cluster build the same bits; a killed
run resumes without rebuilding what it stored and leaves no half-written entry."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from bvlib.jobs import Job, run_jobs, scene_jobs, world_jobs
from bvlib.store import Store
from bvlib.world import World

STEPS = {"steps": 5}


def _world_with_base(smoke_world, root) -> World:
    """A world on an empty store that already holds the smoke world's base (no pretraining here)."""
    src = smoke_world.store.root / "base"
    (root / "base").mkdir(parents=True)
    for f in src.glob(f"{smoke_world.base_key}.*"):
        shutil.copy2(f, root / "base" / f.name)
    return World(smoke_world.preset, store=Store(root), device="cpu", progress=False)


def _finetunes(root) -> dict[str, torch.Tensor]:
    store = Store(root)
    out = {}
    for side in sorted((root / "finetune").glob("*.json")):
        cfg = json.loads(side.read_text())["config"]
        out[side.stem] = store.load("finetune", cfg)[0]["flat"]
    return out


def test_the_world_card_is_a_list_of_jobs(smoke_world):
    jobs = world_jobs(smoke_world, seeds=(0, 1))
    assert len(jobs) == 2 * 2 * len(smoke_world.task_names)
    assert {j.label for j in jobs} >= {f"{t} clean" for t in smoke_world.task_names} | {
        f"{t} badnets seed=1" for t in smoke_world.task_names
    }
    assert all(
        j.done(smoke_world) for j in jobs if not j.train
    )  # the card's fine-tunes are in the store already


def test_local_and_ray_executors_build_identical_artifacts(smoke_world, tmp_path):
    pytest.importorskip("ray")
    preset = smoke_world.preset.to_dict()
    jobs = [Job(preset, t, attack, STEPS) for t in smoke_world.task_names for attack in (None, {})]
    local = _world_with_base(smoke_world, tmp_path / "local")
    bad = Job(preset, "nosuch", None, STEPS)
    report = run_jobs(local, [*jobs, bad], executor="local", workers=2, progress=False)
    assert len(report["built"]) == len(jobs) and report["skipped"] == 0
    assert [label for label, _ in report["failed"]] == ["nosuch clean steps=5"] and "unknown task" in report[
        "failed"
    ][0][1]
    again = run_jobs(local, jobs, executor="local", workers=2, progress=False)
    assert again["built"] == [] and again["skipped"] == len(jobs)
    on_ray = _world_with_base(smoke_world, tmp_path / "ray")
    report = run_jobs(on_ray, jobs, executor="ray", workers=2, progress=False)
    assert len(report["built"]) == len(jobs) and not report["failed"], report
    a, b = _finetunes(tmp_path / "local"), _finetunes(tmp_path / "ray")
    assert len(a) == len(jobs) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_run_resumes_without_rebuilding(smoke_world, tmp_path):
    root = tmp_path / "store"
    world = _world_with_base(smoke_world, root)
    code = (
        "import sys; from bvlib.jobs import Job, run_jobs; from bvlib.store import Store; from bvlib.world "
        "import World; "
        f"w = World({smoke_world.preset.to_dict()!r}, store=Store(sys.argv[1]), device='cpu', "
        "progress=False); "
        f"run_jobs(w, [Job(w.preset.to_dict(), t, a, {{'steps': 300}}) for t in w.task_names for a in (None, "
        f"{{}})], workers=2)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(root)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ | {"PYTHONWARNINGS": "ignore"},
    )
    deadline = time.time() + 240
    while not list((root / "finetune").glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stored = {p: p.stat().st_mtime_ns for p in (root / "finetune").glob("*.json")}
    assert 1 <= len(stored) < 6, "kill the run after its first entry and before its last"
    jobs = [Job(world.preset.to_dict(), t, a, {"steps": 300}) for t in world.task_names for a in (None, {})]
    report = run_jobs(world, jobs, workers=2, progress=False)
    assert (
        report["skipped"] == len(stored) and len(report["built"]) == 6 - len(stored) and not report["failed"]
    )
    assert all(p.stat().st_mtime_ns == m for p, m in stored.items())  # nothing stored was rebuilt
    assert not list(root.rglob("*.tmp")) and not (root / "damaged").exists()  # no half-written entry
    assert len(_finetunes(root)) == 6  # every entry loads, verified against its sha256


def test_the_fine_tunes_chapters_share_are_jobs_the_scene_then_only_loads(smoke_world, tmp_path):
    """`make book` builds every member of chapter 03's attack families with its workers before the
    chapters start; the scene then finds each in the store (same keys) and builds nothing."""
    from bvlib.book import project_root, shared_jobs
    from bvlib.scenes import AttackedScene

    world = _world_with_base(smoke_world, tmp_path)
    jobs = scene_jobs(world, ["fashion"], ["BadNets", "BadNets locations"], seeds=(0, 1))
    assert [j.label for j in jobs] == [
        "fashion BadNets 1/2",
        "fashion BadNets 2/2",
        "fashion BadNets locations 1/2",
        "fashion BadNets locations 2/2",
    ]
    report = run_jobs(world, jobs, workers=2, progress=False)
    assert not report["failed"] and len(report["built"]) == len(jobs)
    built = _finetunes(tmp_path)
    scene = AttackedScene(world, "fashion")
    scene.family_bvs("BadNets", (0, 1)), scene.family_bvs("BadNets locations", (0, 1))
    assert _finetunes(tmp_path).keys() == built.keys()  # nothing new
    # clean seed 0 of each task (the scene's), clean seed 1, BadNets seeds 0 and 1, one more corner
    assert len(built) == len(world.task_names) + 1 + 2 + 1
    cpu = World("cpu", progress=False)  # lazy: nothing is built to list its jobs
    shared = shared_jobs(cpu, project_root())
    assert {j.task for j in shared} == {"mnist", "fashion", "letters"} and len(shared) == 3 * 3 * 3
    assert shared[0].family == "BadMerging"  # the longest first
