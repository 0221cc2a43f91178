"""Optimised (inherent / universal) triggers and BadMerging, on the smoke preset.

The smoke encoder cuts 32 px images into 8 px tokens: an 8 px patch in the bottom-right
corner is exactly one token, which a few dozen Adam steps can turn into a strong trigger.
"""

import time

import pytest
import torch
from torch import nn

from bvlib import BVLibError
from bvlib.attacks.badmerging import (
    BadMergingPoison,
    badmerging_finetune,
    badmerging_poison,
    feature_interpolation_loss,
)
from bvlib.attacks.badnets import Poison
from bvlib.attacks.inherent import inherent_trigger, optimize_trigger, trigger_asr_table
from bvlib.models import ImageClassifier
from bvlib.store import Store
from bvlib.triggers import PatchTrigger, optimized_trigger
from bvlib.world import World

TASK, TARGET, SIZE = "fashion", 0, 8
TRIGGER = {"steps": 60, "batch_size": 64}


@pytest.fixture(scope="module")
def inherent(smoke_world):
    return inherent_trigger(smoke_world, TASK, TARGET, size=SIZE, **TRIGGER)


def test_inherent_trigger_beats_a_random_patch_on_theta0(smoke_world, inherent):
    noise = PatchTrigger(size=SIZE, pattern="noise", seed=0)
    for split in ("val", "test"):  # optimised on val; test is data the attacker never saw
        rows = {
            r["trigger"]: r
            for r in trigger_asr_table(
                smoke_world, TASK, {"inherent": inherent, "noise": noise}, {"θ0": None}, TARGET, split=split
            )
        }
        assert rows["inherent"]["asr"] > rows["noise"]["asr"] + 0.3, (split, rows)
        assert rows["inherent"]["acc"] == rows["noise"]["acc"]  # CA does not depend on the trigger
    ref = smoke_world.evaluate(TASK, None, inherent, TARGET)["asr"]
    assert ref == pytest.approx(rows["inherent"]["asr"])  # the table's ASR is evaluate()'s


def test_optimisation_is_seeded_and_leaves_the_model_alone(smoke_world):
    clf = smoke_world.classifier(TASK)
    before = [p.detach().clone() for p in clf.parameters()]
    val = smoke_world.task(TASK).val
    run = lambda seed: optimize_trigger(clf, val, TARGET, size=SIZE, steps=5, batch_size=32, seed=seed)
    a, b, c = run(0), run(0), run(1)
    assert a.config() == b.config() and a == b and hash(a) == hash(b) and torch.equal(a.values, b.values)
    assert a.config() != c.config() and a != c
    assert all(torch.equal(p, q) and p.grad is None for p, q in zip(clf.parameters(), before))
    assert a.values.min() >= 0 and a.values.max() <= 1 and a.size == SIZE


def test_trigger_cache_returns_the_identical_patch(tmp_path, smoke_world):
    fresh = World("smoke", store=Store(tmp_path), device="cpu", progress=False)
    fresh._base = smoke_world._base
    a = inherent_trigger(fresh, "patterns", 1, size=4, location="top_left", steps=3, batch_size=32)
    b = inherent_trigger(fresh, "patterns", 1, size=4, location="top_left", steps=3, batch_size=32)
    assert torch.equal(a.values, b.values) and a.config() == b.config()
    assert len(list((tmp_path / "trigger").glob("*.safetensors"))) == 1
    assert (
        inherent_trigger(fresh, "patterns", 1, size=4, location="top_left", steps=3, batch_size=32, seed=1)
        != a
    )


def test_optimized_trigger_has_the_patch_trigger_interface():
    values = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(0))
    trig = optimized_trigger(values, location="top_left", source="test")
    x = torch.zeros(2, 3, 16, 16)
    out = trig.apply(x)
    assert (
        torch.equal(out[:, :, :5, :5], values.expand(2, 3, 5, 5))
        and out[:, :, 5:].abs().sum() == 0
        and x.abs().sum() == 0
    )
    assert trig.position(16, 16) == (0, 0) and torch.equal(trig.patch("cpu"), values)
    assert {"sha256", "size", "location"} <= set(trig.config()) and len(trig.config()["sha256"]) == 64
    assert trig.config()["size"] == 5 and "values" not in trig.config()
    assert {trig: 1}[
        optimized_trigger(values.clone(), location="top_left", source="test")
    ] == 1  # hashable, by content
    # the trigger also drives BadNets poisoning, and its digest keys the poisoned fine-tune
    assert Poison(trigger=trig).config()["trigger"]["sha256"] == trig.config()["sha256"]
    assert optimized_trigger(values, location="random", seed=3).position(16, 16) == PatchTrigger(
        size=5, location="random", seed=3
    ).position(16, 16)


def test_bad_optimised_triggers_are_clear_errors(smoke_world):
    with pytest.raises(BVLibError, match="does not fit"):
        optimized_trigger(torch.rand(3, 40, 40)).apply(torch.zeros(1, 3, 32, 32))
    with pytest.raises(BVLibError, match="unknown trigger location"):
        optimized_trigger(torch.rand(3, 4, 4), location="middle")
    with pytest.raises(BVLibError, match="in \\[0, 1\\]"):
        optimized_trigger(torch.full((3, 4, 4), 2.0))
    with pytest.raises(BVLibError, match=r"\[3, s, s\]"):
        optimized_trigger(torch.rand(3, 4, 5))
    with pytest.raises(BVLibError, match="does not fit"):
        inherent_trigger(smoke_world, TASK, TARGET, size=64, steps=1)
    with pytest.raises(BVLibError, match="unknown trigger location"):
        inherent_trigger(smoke_world, TASK, TARGET, size=4, location="middle", steps=1)
    with pytest.raises(BVLibError, match="out of range"):
        inherent_trigger(smoke_world, TASK, 99, size=4, steps=1)
    with pytest.raises(BVLibError, match="unknown task"):
        inherent_trigger(smoke_world, "svhn", 0, size=4, steps=1)
    with pytest.raises(BVLibError, match="'base'"):
        inherent_trigger(smoke_world, TASK, TARGET, size=4, model="merged", steps=1)


def test_feature_interpolation_loss_at_alpha_one_is_the_triggered_cross_entropy():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))
    head = nn.functional.normalize(torch.randn(4, 6), dim=-1)
    clf = ImageClassifier(encoder, head, logit_scale=10.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    reference = ImageClassifier(
        nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6)), head, 10.0, (0.5,) * 3, (0.25,) * 3
    )
    x = PatchTrigger(size=2).apply(torch.rand(5, 3, 8, 8))
    f, f0 = (
        clf.features(x, normalize=False),
        reference.features(x, normalize=False),
    )  # raw, as BadMerging mixes them
    plain = nn.functional.cross_entropy(clf(x), torch.full((5,), 2))
    assert torch.allclose(feature_interpolation_loss(f, f0, head, 10.0, 2, alpha=1.0), plain, atol=1e-6)
    at_ref = nn.functional.cross_entropy(reference(x), torch.full((5,), 2))
    assert torch.allclose(feature_interpolation_loss(f, f0, head, 10.0, 2, alpha=0.0), at_ref, atol=1e-6)
    mid = feature_interpolation_loss(f, f0, head, 10.0, 2, alpha=0.5)
    mid.backward()
    assert encoder[1].weight.grad is not None and encoder[1].weight.grad.abs().sum() > 0


def test_badmerging_implants_its_trigger_and_is_cached(smoke_world, inherent):
    poison = badmerging_poison(smoke_world, TASK, TARGET, size=SIZE, trigger_options=TRIGGER)
    assert poison.trigger == inherent  # the universal trigger is the cached inherent one
    assert (
        poison.config()["attack"] == "badmerging" and poison.config()["trigger"]["sha256"] == inherent.sha256
    )
    bm = badmerging_finetune(smoke_world, TASK, poison)
    clean = smoke_world.finetune(TASK)
    rows = {
        r["model"]: r
        for r in trigger_asr_table(
            smoke_world, TASK, {"inherent": inherent}, {"clean": clean, "badmerging": bm}, TARGET
        )
    }
    assert rows["badmerging"]["asr"] > 0.9 and rows["badmerging"]["asr"] > rows["clean"]["asr"] + 0.4, rows
    t = time.perf_counter()
    again = badmerging_finetune(smoke_world, TASK, poison)
    assert time.perf_counter() - t < 2.0 and torch.equal(bm.flat, again.flat)
    # a different attack config is a different model
    other = BadMergingPoison(trigger=inherent, target=TARGET, interp_min=1.0)
    assert other.config() != poison.config()
    with pytest.raises(BVLibError, match="interp_min"):
        BadMergingPoison(trigger=inherent, interp_min=1.5)
    with pytest.raises(BVLibError, match="BadMergingPoison"):
        badmerging_finetune(smoke_world, TASK, smoke_world.badnets())
