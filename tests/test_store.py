import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from bvlib import BVLibError
from bvlib.store import Store, config_key, load_state_dict


def test_round_trip_and_key_ignores_dict_order(tmp_path):
    store = Store(tmp_path)
    cfg = {"task": "mnist", "seed": 0, "train": {"lr": 1e-4, "steps": 3}}
    assert config_key(cfg) == config_key({"train": {"steps": 3, "lr": 1e-4}, "seed": 0, "task": "mnist"})
    assert config_key(cfg) != config_key(cfg | {"seed": 1})
    assert store.load("finetune", cfg) is None
    t = torch.arange(6.0).view(2, 3)
    store.save("finetune", cfg, {"flat": t}, {"seconds": 1.5})
    tensors, meta = Store(tmp_path).load("finetune", cfg)
    assert torch.equal(tensors["flat"], t) and meta == {"seconds": 1.5}


def test_cached_builds_once(tmp_path):
    store, calls = Store(tmp_path), []

    def build():
        calls.append(1)
        return {"x": torch.ones(3)}, {"n": 3}

    first = store.cached("head", {"k": 1}, build)
    second = store.cached("head", {"k": 1}, build)
    assert len(calls) == 1 and torch.equal(first[0]["x"], second[0]["x"]) and second[1] == {"n": 3}


def test_built_since_counts_each_kind_built_after_a_time(tmp_path):
    import time

    store = Store(tmp_path)
    store.cached("head", {"k": 0}, lambda: ({"x": torch.ones(1)}, {}))
    old = time.time() - 100
    os.utime(next((tmp_path / "head").glob("*.json")), (old, old))  # built before the time asked about

    def slow():
        time.sleep(0.05)
        return None, {"acc": 0.5}

    store.cached("evaluation", {"k": 1}, slow)
    store.cached("evaluation", {"k": 2}, slow)
    assert store.cached("evaluation", {"k": 1}, slow)[1] == {
        "acc": 0.5
    }  # the build time is not in what loads return
    built = store.built_since(old + 50)
    assert (
        list(built) == ["evaluation"]
        and built["evaluation"]["n"] == 2
        and built["evaluation"]["seconds"] >= 0.1
    )


def test_killed_write_leaves_no_half_entry(tmp_path, monkeypatch):
    store = Store(tmp_path)
    import bvlib.store as mod

    def dies(tensors, path):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        store.save("finetune", {"a": 1}, {"flat": torch.ones(4)})
    assert store.load("finetune", {"a": 1}) is None
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # temp file cleaned up, nothing published


def test_safe_checkpoint_loading(tmp_path):
    state = {"w": torch.randn(2, 2)}
    save_file(state, tmp_path / "ok.safetensors")
    torch.save(state, tmp_path / "ok.pt")
    assert torch.equal(load_state_dict(tmp_path / "ok.safetensors")["w"], state["w"])
    assert torch.equal(load_state_dict(tmp_path / "ok.pt")["w"], state["w"])


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(BVLibError, match="refusing to load"):
        load_state_dict(path)
    whole_model = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), whole_model)  # a pickled module, not a state_dict
    with pytest.raises(BVLibError, match="refusing to load"):
        load_state_dict(whole_model)


def test_bad_checkpoints_get_one_line_errors(tmp_path):
    with pytest.raises(BVLibError, match="does not exist"):
        load_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BVLibError, match="not a checkpoint"):
        load_state_dict(tmp_path / "junk.safetensors")
    save_file({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "nan.safetensors")
    with pytest.raises(BVLibError, match="NaN"):
        load_state_dict(tmp_path / "nan.safetensors")


def test_a_kind_cannot_leave_the_store(tmp_path):
    store = Store(tmp_path / "store")
    for kind in ("../../x", "a/b", "", ".."):
        with pytest.raises(BVLibError, match="plain name"):
            store.save(kind, {"a": 1}, None, {})
    assert not (tmp_path / "x").exists() and store.save("merge_curves", {"a": 1}, None, {})
