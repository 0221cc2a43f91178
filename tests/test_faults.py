"""What a damaged store, a bad input or a killed run does: one clear line, nothing lost, nothing stale."""

import json
import os
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bvlib import BVLibError
from bvlib.store import (
    Store,
    check_output_path,
    config_key,
    load_state_dict,
    remove_stale_temporaries,
    save_state_dict,
)
from bvlib.weights import Layout, Weights

CFG = {"task": "mnist", "seed": 0}


def _entry(tmp_path, value=1.0):
    store = Store(tmp_path)
    store.save("finetune", CFG, {"flat": torch.full((8,), value)}, {"seconds": 1.0})
    st, js = (
        (tmp_path / "finetune" / config_key(CFG)).with_suffix(".safetensors"),
        (tmp_path / "finetune" / config_key(CFG)).with_suffix(".json"),
    )
    return store, st, js


def _deep_json(depth=100_000):
    return "[" * depth + "]" * depth


DAMAGE = {
    "empty sidecar": lambda st, js: js.write_text(""),
    "truncated sidecar": lambda st, js: js.write_text(js.read_text()[:40]),
    "sidecar of wrong types": lambda st, js: js.write_text(json.dumps({"meta": [], "tensors": "yes"})),
    "deep sidecar": lambda st, js: js.write_text(_deep_json()),
    "missing tensor file": lambda st, js: st.unlink(),
    "empty tensor file": lambda st, js: st.write_bytes(b""),
    "truncated tensor file": lambda st, js: st.write_bytes(st.read_bytes()[:-7]),
    "NaN tensor file": lambda st, js: save_file({"flat": torch.full((8,), float("nan"))}, st),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_moved_aside_and_rebuilt(tmp_path, capsys, damage):
    store, st, js = _entry(tmp_path)
    DAMAGE[damage](st, js)
    calls = []

    def build():
        calls.append(1)
        return {"flat": torch.full((8,), 2.0)}, {"seconds": 2.0}

    tensors, meta = store.cached("finetune", CFG, build)
    err = capsys.readouterr().err
    assert calls == [1] and torch.equal(tensors["flat"], torch.full((8,), 2.0)), damage
    assert err.count("\n") == 1 and "is damaged" in err and config_key(CFG) in err and "mnist" in err, err
    assert list((tmp_path / "damaged" / "finetune").iterdir()), "the damaged files are kept for inspection"
    assert torch.equal(
        Store(tmp_path).load("finetune", CFG)[0]["flat"], torch.full((8,), 2.0)
    )  # rebuilt entry is good


def test_a_tensor_file_swapped_for_another_entrys_is_not_served(tmp_path, capsys):
    store, st, js = _entry(tmp_path, 1.0)
    other = {"task": "fashion", "seed": 0}
    store.save("finetune", other, {"flat": torch.full((8,), 5.0)}, {})
    st.write_bytes((tmp_path / "finetune" / f"{config_key(other)}.safetensors").read_bytes())
    assert store.load("finetune", CFG) is None and "sha256 differs" in capsys.readouterr().err
    assert torch.equal(store.load("finetune", other)[0]["flat"], torch.full((8,), 5.0))


def test_files_are_group_readable_and_stale_temporaries_are_removed(tmp_path):
    old = os.umask(0o002)
    try:
        store, st, js = _entry(tmp_path)
    finally:
        os.umask(old)
    assert st.stat().st_mode & stat.S_IRGRP and js.stat().st_mode & stat.S_IRGRP
    import socket

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    host = socket.gethostname().replace(".", "-")
    stale = tmp_path / "finetune" / f".x.json.{host}.{dead}.abc.tmp"
    live = tmp_path / "finetune" / f".y.json.{host}.{os.getpid()}.abc.tmp"
    stale.write_text("half"), live.write_text("in progress")
    assert remove_stale_temporaries(tmp_path / "finetune") == 1 and not stale.exists() and live.exists()


def test_an_unwritable_store_fails_before_the_work(tmp_path):
    (tmp_path / "a_file").write_text("")  # a store under a file cannot be created, whoever runs the test
    calls = []
    with pytest.raises(BVLibError, match="not writable"):
        Store(tmp_path / "a_file" / "store").cached(
            "finetune", CFG, lambda: calls.append(1) or ({"flat": torch.ones(2)}, {})
        )
    assert calls == []


def test_a_failed_save_keeps_the_result(tmp_path, monkeypatch, capsys):
    import bvlib.store as mod

    def full_disk(tensors, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mod, "save_file", full_disk)
    tensors, meta = Store(tmp_path).cached("finetune", CFG, lambda: ({"flat": torch.ones(3)}, {"acc": 0.9}))
    assert torch.equal(tensors["flat"], torch.ones(3)) and meta == {"acc": 0.9}
    assert "could not save" in capsys.readouterr().err


_BUILD_ONCE = """
import sys, time, torch
from pathlib import Path
from bvlib.store import Store
root, log = sys.argv[1], Path(sys.argv[2])
def build():
    with log.open("a") as f:
        f.write("built\\n")
    time.sleep(1.0)
    return {"flat": torch.arange(4.0)}, {}
t, _ = Store(root).cached("finetune", {"k": 1}, build)
print(t["flat"].tolist())
"""


def test_concurrent_builders_build_once(tmp_path):
    log = tmp_path / "log"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD_ONCE, str(tmp_path / "store"), str(log)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert (
        all(p.returncode == 0 for p in procs)
        and outs.count(outs[0]) == 3
        and "[0.0, 1.0, 2.0, 3.0]" in outs[0]
    )
    assert log.read_text().count("built") == 1


# --- user checkpoints ----------------------------------------------------------------------
def test_formats_are_told_apart_by_content(tmp_path):
    state = {"w": torch.randn(2, 2)}
    save_file(state, tmp_path / "mine.pt")  # safetensors bytes under a torch name
    assert torch.equal(load_state_dict(tmp_path / "mine.pt")["w"], state["w"])
    save_state_dict(state, tmp_path / "out.pt")  # a torch suffix gets a torch file
    with open(tmp_path / "out.pt", "rb") as f:
        assert f.read(2) == b"PK"
    assert torch.equal(load_state_dict(tmp_path / "out.pt")["w"], state["w"])
    save_state_dict(state, tmp_path / "out.safetensors")
    assert torch.equal(load_state_dict(tmp_path / "out.safetensors")["w"], state["w"])


def test_non_checkpoints_get_one_line(tmp_path):
    gen = torch.Generator().manual_seed(0)
    cases = {
        "text.pt": b"hello, this is a text file\n",
        "empty.pt": b"",
        "zip.pt": b"PK\x03\x04" + b"\x00" * 40,
    }
    for i in range(20):
        n = int(torch.randint(1, 400, (1,), generator=gen))
        cases[f"fuzz{i}.pt"] = bytes(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).tolist())
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(64)}, good)
    blob = good.read_bytes()
    for i in range(10):  # a real torch file with bytes flipped
        b = bytearray(blob)
        for j in torch.randint(0, len(b), (8,), generator=gen).tolist():
            b[j] ^= 0xFF
        cases[f"flipped{i}.pt"] = bytes(b)
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        try:
            load_state_dict(tmp_path / name)
        except BVLibError as e:
            assert "\n" not in str(e), name
        # a flipped byte may still leave a readable tensor file: then it loads, which is fine


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_refusal_keeps_the_reason_and_no_unsafe_advice(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, path)
    with pytest.raises(BVLibError) as e:
        load_state_dict(path)
    msg = str(e.value)
    assert "system" in msg and "weights_only=False" not in msg and "\n" not in msg
    with open(tmp_path / "legacy.pt", "wb") as f:
        pickle.dump({"w": Evil()}, f, protocol=2)
    with pytest.raises(BVLibError, match="refusing to load"):
        load_state_dict(tmp_path / "legacy.pt")


def test_a_whole_clip_state_dict_is_recognised():
    layout = Layout(("conv1.weight", "ln.bias"), ((2, 3), (4,)))
    state = {
        "visual.conv1.weight": torch.ones(2, 3),
        "visual.ln.bias": torch.zeros(4),
        "text.proj": torch.ones(5),
    }
    w = Weights.from_state_dict(state, layout)
    assert w.layout == layout and float(w.flat.sum()) == 6.0


def test_outputs_are_checked_before_any_work(tmp_path):
    (tmp_path / "adir.safetensors").mkdir()
    for bad, why in (
        (tmp_path / "adir.safetensors", "is a directory"),
        (tmp_path / "no" / "x.safetensors", "does not exist"),
        (tmp_path / "x.txt", "suffix"),
    ):
        with pytest.raises(BVLibError, match=why):
            check_output_path(bad)


def test_a_failed_checkpoint_write_names_the_fallback(tmp_path, monkeypatch):
    import bvlib.store as mod

    real = mod.save_file

    def fails_in_place(tensors, path):
        if str(tmp_path) in str(path):
            raise OSError(28, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(mod, "save_file", fails_in_place)
    with pytest.raises(BVLibError, match="saved to") as e:
        save_state_dict({"w": torch.ones(3)}, tmp_path / "out.safetensors")
    fallback = Path(str(e.value).split("saved to ")[1].split(" instead")[0])
    assert torch.equal(load_state_dict(fallback)["w"], torch.ones(3))
    fallback.unlink()


# --- presets and notebook parameters --------------------------------------------------------
def test_bad_presets_get_one_line(tmp_path):
    from bvlib.world import load_preset

    (tmp_path / "broken.json").write_text('{"model": ')
    with pytest.raises(BVLibError, match="not valid JSON"):
        load_preset(str(tmp_path / "broken.json"))
    cpu = load_preset("cpu")
    for change, why in (
        ({"modle": "x"}, "unknown key 'modle'"),
        ({"finetune": {"lrr": 1}}, "finetune.lrr"),
        ({"tasks": "mnist"}, "'tasks' must be"),
        ({"data": {"imagesize": 32}}, "data.imagesize"),
        ({"data": {"image_size": "32"}}, "data.image_size' must be"),
        ({"corpus": {"n_letterz": 1}}, "corpus.n_letterz"),
        ({"base_checkpoint": {"file": "x.safetensors"}}, "'base_checkpoint.sha256' is missing"),
        ({"badnets": {"trigger": {"shape": "x"}}}, "'badnets' is not an attack"),
    ):
        with pytest.raises(BVLibError, match=why):
            load_preset(cpu.to_dict() | change)
    missing = {k: v for k, v in cpu.to_dict().items() if k != "badnets"}
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    with pytest.raises(BVLibError, match="'badnets' is missing"):
        load_preset(str(tmp_path / "missing.json"))


def test_notebook_parameters_are_checked():
    from bvlib.book import check_parameters, notebook_parameters

    assert notebook_parameters("01_backdoor_vectors")["scales"][0] == 0.0
    check_parameters("01_backdoor_vectors", {"preset": "smoke", "scales": [0, 1.0], "trigger_size": 6})
    for params, why in (
        ({"scales": "abc"}, "takes a list"),
        ({"preset": 5}, "takes a string"),
        ({"nope": 1}, "no parameter 'nope'"),
        ({'x = 1; __import__("os").system("true"); y': 1}, "not a Python identifier"),
        ({"tasks": True}, "takes a list"),
    ):
        with pytest.raises(BVLibError, match=why):
            check_parameters("01_backdoor_vectors", params)
    check_parameters("05_defenses", {"ibvs_strength": 2})  # an integer for a number is fine
    with pytest.raises(BVLibError, match="takes an integer"):
        check_parameters("05_defenses", {"tbar_steps": 1.5})
    with pytest.raises(BVLibError, match="not a path"):
        notebook_parameters("../notebooks/01_backdoor_vectors")


# --- killed runs ----------------------------------------------------------------------------
def _bvlib(store, *args, **popen):
    env = os.environ | {"BVLIB_STORE": str(store), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "bvlib.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _kill_when(proc, ready, timeout=300):
    t = time.time()
    while not ready():
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()[1][-500:]}"
        assert time.time() - t < timeout
        time.sleep(0.05)
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_a_killed_pretraining_resumes_to_identical_weights(tmp_path):
    # an uninterrupted run, then one killed twice (after its first and after a later checkpoint) and resumed
    _bvlib(
        tmp_path / "a", "pretrain", "--preset", "smoke", "--out", str(tmp_path / "a.safetensors")
    ).communicate(timeout=600)
    ckpts = tmp_path / "b" / "checkpoints" / "base"
    for n in (1, 3):
        proc = _bvlib(
            tmp_path / "b", "pretrain", "--preset", "smoke", "--out", str(tmp_path / "b.safetensors")
        )
        seen = set()

        def saved_n(proc=proc, seen=seen, n=n):
            for p in ckpts.glob("*.pt") if ckpts.is_dir() else ():
                seen.add(p.stat().st_mtime_ns)
            return len(seen) >= n

        _kill_when(proc, saved_n)
    out, err = _bvlib(
        tmp_path / "b", "pretrain", "--preset", "smoke", "--out", str(tmp_path / "b.safetensors")
    ).communicate(timeout=600)
    assert "sha256" in out, err
    a, b = load_state_dict(tmp_path / "a.safetensors"), load_state_dict(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), (
        "the resumed pretraining differs from the uninterrupted one"
    )
    assert not list(ckpts.glob("*.pt")), "the checkpoint is removed once the base is stored"


def _mnist_root(root, seed):
    import numpy as np

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", 40), ("t10k", 12)):
        for kind, arr, dims in (
            ("images-idx3", rng.integers(0, 256, (n, 28, 28)), (n, 28, 28)),
            ("labels-idx1", np.arange(n) % 10, (n,)),
        ):
            header = bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + np.asarray(arr, dtype=np.uint8).tobytes())
    return root


def test_paper_store_keys_cover_the_data_and_the_checkpoint_bytes(tmp_path, monkeypatch):
    from bvlib.models import create_clip
    from bvlib.world import World, load_preset

    torch.manual_seed(0)
    model, _ = create_clip("mini-clip-w64-l2")
    ckpt = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    preset = load_preset("paper").to_dict() | {
        "model": "mini-clip-w64-l2",
        "pretrained": str(ckpt),
        "tasks": ["MNIST"],
        "data": {"image_size": 32, "seed": 0},
    }
    keys = {}
    for name, seed in (("A", 0), ("B", 1)):
        monkeypatch.setenv("BVLIB_DATA_ROOT", str(_mnist_root(tmp_path / name, seed)))
        keys[name] = World(preset, store=Store(tmp_path / "store"), progress=False).finetune_key("MNIST")
    assert keys["A"] != keys["B"], "another copy of the dataset must not be served the first one's fine-tunes"
    before = World(preset, store=Store(tmp_path / "store"), progress=False).base_key
    with torch.no_grad():
        model.visual.conv1.weight.add_(1.0)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, ckpt
    )  # the base overwritten in place
    assert World(preset, store=Store(tmp_path / "store"), progress=False).base_key != before


@pytest.mark.slow
def test_a_fine_tune_killed_at_several_moments_leaves_no_half_entry(tmp_path, smoke_world):
    """SIGKILL while a fine-tune trains or saves: no half entry, and the re-run gives the same weights."""
    import shutil

    assert (
        smoke_world.clip is not None
    )  # the smoke base is in the shared store; the fine-tunes go to a fresh one
    store = tmp_path / "store"
    (store / "base").mkdir(parents=True)
    for suffix in (".json", ".safetensors"):
        name = smoke_world.base_key + suffix
        shutil.copy(smoke_world.store.root / "base" / name, store / "base" / name)
    task = smoke_world.task_names[0]
    args = ("finetune", "--preset", "smoke", "--task", task, "--seed", "7")
    for delay in (0.5, 2.0, 4.0):
        proc = _bvlib(store, *args)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        for sidecar in (store / "finetune").glob("*.json") if (store / "finetune").is_dir() else ():
            assert Store(store).load("finetune", json.loads(sidecar.read_text())["config"]) is not None, (
                "a half-written entry"
            )
    out, err = _bvlib(store, *args, "--out", str(tmp_path / "a.safetensors")).communicate(timeout=600)
    assert '"acc"' in out, err
    shutil.rmtree(store / "finetune")
    out, err = _bvlib(store, *args, "--out", str(tmp_path / "b.safetensors")).communicate(timeout=600)
    a, b = load_state_dict(tmp_path / "a.safetensors"), load_state_dict(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "a re-run after kills differs from an uninterrupted run"
