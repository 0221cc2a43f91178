"""Defenses on the smoke world: IBVS, TBAR and DAM, each checked where its effect can be measured.

The scenario: BadNets on fashion (the preset's checkerboard, target 0) with 150 fine-tuning steps,
so that the backdoor is real (ASR ~0.8) and clean accuracy is well above chance; the merge is task
arithmetic (lam 0.5) of the backdoored fashion τ and a clean patterns τ, where about half the ASR
survives. With all three tasks in the merge the smoke world's interference wipes the attack out
(ASR < 0.1 before any defense), which would make every defense look perfect.
"""

import dataclasses
import time

import pytest
import torch

from bvlib import BVLibError
from bvlib.defenses import ALPHA_GRID, dam, ibvs_trigger, ibvs_vector, merge_with_ibvs, tbar
from bvlib.merging import merge
from bvlib.store import Store
from bvlib.weights import Layout, Weights, cosine_matrix
from bvlib.world import World

STEPS = 150
ATTACKED, OTHER, DEFENDER = "fashion", "patterns", "mnist"
MERGE = {"method": "task_arithmetic", "lam": 0.5}


@pytest.fixture(scope="module")
def scene(smoke_world):
    w = smoke_world
    attack = w.badnets()
    clean = {t: w.finetune(t, steps=STEPS) for t in (ATTACKED, OTHER)}
    backdoored = w.finetune(ATTACKED, poison=attack, steps=STEPS)
    th0 = w.base_weights
    taus = {ATTACKED: backdoored - th0, OTHER: clean[OTHER] - th0}
    return {"attack": attack, "clean": clean, "backdoored": backdoored, "taus": taus, "oracle_bv": backdoored - clean[ATTACKED],
            "clean_taus": {t: clean[t] - th0 for t in clean}}


def merged_eval(world, scene, tau: Weights) -> dict:
    a = scene["attack"]
    return world.evaluate_merged(world.base_weights + tau, [ATTACKED, OTHER], ATTACKED, a.trigger, a.target)


# IBVS -----------------------------------------------------------------------------------------
def test_ibvs_vector_is_the_defenders_own_backdoor_vector(smoke_world):
    w = smoke_world
    bv = ibvs_vector(w, DEFENDER, steps=STEPS)
    trig = ibvs_trigger(w)
    assert trig.pattern == "solid" and trig.color == (1.0, 1.0, 1.0) and trig.size == w.badnets().trigger.size
    poison = dataclasses.replace(w.badnets(), trigger=trig, target=0)
    expected = w.finetune(DEFENDER, poison=poison, steps=STEPS) - w.finetune(DEFENDER, steps=STEPS)
    assert torch.equal(bv.flat, expected.flat)
    assert w.task_names[0] == DEFENDER and torch.equal(ibvs_vector(w, steps=STEPS).flat, bv.flat)  # default: the first task


def test_merge_with_ibvs_is_the_merge_minus_the_scaled_bv(scene):
    taus, bv = list(scene["taus"].values()), scene["oracle_bv"]
    plain = merge(taus, **MERGE)
    assert torch.equal(merge_with_ibvs(taus, MERGE["method"], bv, 0.0, lam=0.5).flat, plain.flat)
    out = merge_with_ibvs(scene["taus"], MERGE["method"], bv, 0.7, lam=0.5)  # a dict of task vectors works too
    assert torch.allclose(out.flat, plain.flat - 0.7 * bv.flat, atol=1e-6)
    per_task = merge_with_ibvs(taus, MERGE["method"], bv, 0.7, apply="per_task", lam=0.5)
    assert torch.allclose(per_task.flat, plain.flat - 0.5 * len(taus) * 0.7 * bv.flat, atol=1e-5)  # TA: lam · K · strength
    ties = merge_with_ibvs(taus, "ties", bv, 1.0, k=0.2, lam=1.0)
    assert torch.allclose(ties.flat, merge(taus, "ties", k=0.2, lam=1.0).flat - bv.flat, atol=1e-6)


def test_ibvs_with_the_attackers_own_bv_removes_the_attack(smoke_world, scene):
    undefended = merged_eval(smoke_world, scene, merge(list(scene["taus"].values()), **MERGE))
    clean_merge = merged_eval(smoke_world, scene, merge(list(scene["clean_taus"].values()), **MERGE))
    assert undefended["asr"] >= 0.3, f"the attack should survive this merge (ASR {undefended['asr']:.2f})"
    oracle = merged_eval(smoke_world, scene, merge_with_ibvs(scene["taus"], MERGE["method"], scene["oracle_bv"], 1.0, lam=0.5))
    assert oracle["asr"] <= clean_merge["asr"] + 0.05, (undefended, oracle, clean_merge)


@pytest.mark.parametrize("method, params", [("task_arithmetic", {"lam": 0.5}), ("ties", {"lam": 1.0})])
def test_ibvs_with_the_defenders_independent_bv_lowers_the_asr(smoke_world, scene, method, params):
    # The defender's white square on its own task (mnist) vs the attacker's checkerboard on fashion:
    # nearly orthogonal BVs, yet subtracting the defender's lowers the attacker's ASR in the merge.
    bv = ibvs_vector(smoke_world, DEFENDER, steps=STEPS)
    assert abs(float(cosine_matrix([bv, scene["oracle_bv"]])[0, 1])) < 0.3
    undefended = merged_eval(smoke_world, scene, merge(list(scene["taus"].values()), method, **params))
    defended = merged_eval(smoke_world, scene, merge_with_ibvs(scene["taus"], method, bv, 1.0, **params))
    assert undefended["asr"] >= 0.3 and defended["asr"] <= 0.5 * undefended["asr"], (undefended, defended)


# TBAR -----------------------------------------------------------------------------------------
def test_tbar_with_the_known_trigger_unlearns_the_backdoor(smoke_world, scene):
    w, a, bd = smoke_world, scene["attack"], scene["backdoored"]
    before = w.evaluate(ATTACKED, bd, a.trigger, a.target)
    cleaned, info = tbar(w, bd, ATTACKED, trigger=a.trigger, target=a.target, alpha="auto", steps=20)
    after = w.evaluate(ATTACKED, cleaned, a.trigger, a.target)
    assert before["asr"] > 0.6 and after["asr"] < 0.2, (before, after)
    # the smoke world's trade-off is steep: ~15 points of CA for ~75 points of ASR (alpha ~0.3)
    assert after["acc"] >= before["acc"] - 0.25 and after["acc"] > 2 / w.task(ATTACKED).n_classes, (before, after)
    assert info["mode"] == "known" and info["target"] == a.target and info["trigger"] == a.trigger.config()
    assert info["alpha"] in ALPHA_GRID and info["val_asr"][info["alpha"]] <= 0.1 and info["tau_norm"] > 0
    # a fixed alpha is θ − alpha·τ exactly
    fixed, info1 = tbar(w, bd, ATTACKED, trigger=a.trigger, target=a.target, alpha=1.0, steps=20)
    tau = bd - cleaned
    assert torch.allclose(fixed.flat, bd.flat - tau.flat / info["alpha"], atol=1e-5) and info1["tau_norm"] == pytest.approx(info["tau_norm"])


def test_tbar_cleans_the_merged_model(smoke_world, scene):
    w, a = smoke_world, scene["attack"]
    merged = w.base_weights + merge(list(scene["taus"].values()), **MERGE)
    before = merged_eval(w, scene, merged - w.base_weights)
    cleaned, _ = tbar(w, merged, ATTACKED, trigger=a.trigger, target=a.target, alpha=0.5)
    after = merged_eval(w, scene, cleaned - w.base_weights)
    assert before["asr"] >= 0.3 and after["asr"] <= 0.1 and after["mean_acc"] >= before["mean_acc"] - 0.05, (before, after)


def test_tbar_unknown_attack_finds_the_target_by_reverse_engineering(smoke_world, scene):
    w, a, bd = smoke_world, scene["attack"], scene["backdoored"]
    cleaned, info = tbar(w, bd, ATTACKED, alpha="auto", steps=20, trigger_steps=30)
    scores = info["candidates"]
    assert info["mode"] == "unknown" and set(scores) == set(range(w.task(ATTACKED).n_classes))
    assert info["target"] == a.target and scores[a.target] == max(scores.values()), scores
    assert scores[a.target] > 0.5 and sorted(scores.values())[-2] < 0.4, scores  # a clear winner
    assert info["trigger"]["type"] == "optimized"
    assert w.evaluate(ATTACKED, cleaned, a.trigger, a.target)["asr"] < 0.3  # the real trigger is unlearnt too
    # with a trigger and no target, the target is the class the triggered images go to
    _, guessed = tbar(w, bd, ATTACKED, trigger=a.trigger, alpha=0.3, steps=20)
    assert guessed["target"] == a.target


def test_tbar_trigger_task_is_cached(tmp_path, smoke_world, scene):
    fresh = World("smoke", store=Store(tmp_path), device="cpu", progress=False)
    fresh._base = smoke_world._base
    a, bd = scene["attack"], scene["backdoored"]
    run = lambda seed: tbar(fresh, bd, ATTACKED, trigger=a.trigger, target=a.target, steps=3, seed=seed)
    x, info = run(0)
    t = time.perf_counter()
    y, _ = run(0)
    assert time.perf_counter() - t < 2.0 and torch.equal(x.flat, y.flat)
    assert len(list((tmp_path / "tbar").glob("*.safetensors"))) == 1
    z, _ = run(1)
    assert len(list((tmp_path / "tbar").glob("*.safetensors"))) == 2 and not torch.equal(x.flat, z.flat)
    assert info["steps"] == 3 and info["seed"] == 0


# DAM ------------------------------------------------------------------------------------------
def test_dam_masks_are_binary_and_the_merge_follows_them(smoke_world, scene):
    w, taus = smoke_world, scene["taus"]
    tau, info = dam(w, taus, lam=0.5, steps=8, seed=0)
    assert isinstance(tau, Weights) and tau.layout == w.layout and torch.isfinite(tau.flat).all()
    n_tensors = len(w.layout.names)
    for key in ("shared_mask", "backdoor_mask"):
        m = info[key]
        assert m.shape == (len(taus), n_tensors) and set(m.unique().tolist()) <= {0.0, 1.0}
    keep = (info["shared_mask"] * (1 - info["backdoor_mask"]))[:, torch.repeat_interleave(torch.arange(n_tensors), torch.tensor(w.layout.numels))]
    expected = 0.5 * (keep * torch.stack([v.flat for v in taus.values()])).sum(0)
    assert torch.allclose(tau.flat, expected, atol=1e-6)
    assert info["tasks"] == list(taus) and set(info["kept"]) == set(taus)
    assert len(info["history"]) == 8 and all(h["perf"] >= 0 and h["safe"] >= 0 for h in info["history"])
    again, info2 = dam(w, taus, lam=0.5, steps=8, seed=0)
    assert torch.equal(tau.flat, again.flat) and torch.equal(info["shared_mask"], info2["shared_mask"])


def test_dam_per_coordinate_with_pgd(smoke_world, scene):
    tau, info = dam(smoke_world, scene["taus"], lam=0.5, steps=3, granularity="coordinate", perturb="pgd", seed=1)
    assert tau.layout == smoke_world.layout and info["backdoor_mask"].shape == (2, smoke_world.layout.numel)
    assert set(info["backdoor_mask"].unique().tolist()) <= {0.0, 1.0} and info["perturb"] == "pgd"


# bad input --------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_errors(smoke_world, scene):
    w, taus, bv, a, bd = smoke_world, scene["taus"], scene["oracle_bv"], scene["attack"], scene["backdoored"]
    other_layout = Weights(torch.zeros(3), Layout(("a",), ((3,),)))
    cases = [
        (lambda: merge_with_ibvs(taus, "soup", bv), "unknown merging method"),
        (lambda: merge_with_ibvs(taus, "task_arithmetic", bv, -1.0), "strength"),
        (lambda: merge_with_ibvs([], "task_arithmetic", bv), "at least one"),
        (lambda: merge_with_ibvs({}, "task_arithmetic", bv), "at least one"),
        (lambda: merge_with_ibvs(taus, "task_arithmetic", "bv"), "ibvs_bv"),
        (lambda: merge_with_ibvs(taus, "task_arithmetic", other_layout), "different architectures"),
        (lambda: merge_with_ibvs(taus, "task_arithmetic", bv, apply="sideways"), "apply"),
        (lambda: ibvs_vector(w, "svhn"), "unknown task"),
        (lambda: ibvs_vector(w, DEFENDER, target=99), "out of range"),
        (lambda: tbar(w, bd, ATTACKED, trigger=a.trigger, target=a.target, alpha=-1.0), "alpha"),
        (lambda: tbar(w, bd, ATTACKED, trigger=a.trigger, target=a.target, alpha="max"), "alpha"),
        (lambda: tbar(w, bd, ATTACKED, trigger=a.trigger, target=99), "out of range"),
        (lambda: tbar(w, bd.flat, ATTACKED), "Weights"),
        (lambda: tbar(w, bd, "svhn"), "unknown task"),
        (lambda: tbar(w, bd, ATTACKED, trigger=a.trigger, target=0, clean_share=1.0), "clean_share"),
        (lambda: tbar(w, bd, ATTACKED, trigger=a.trigger, target=0, steps=0), "steps"),
        (lambda: tbar(w, bd, ATTACKED, trigger=dataclasses.replace(a.trigger, size=64), target=0), "does not fit"),
        (lambda: dam(w, {}), "non-empty"),
        (lambda: dam(w, list(taus.values())), "non-empty dict"),
        (lambda: dam(w, {"svhn": bv}), "unknown task"),
        (lambda: dam(w, taus, perturb="blur"), "perturb"),
        (lambda: dam(w, taus, granularity="row"), "granularity"),
        (lambda: dam(w, taus, steps=0), "steps"),
    ]
    for call, match in cases:
        with pytest.raises(BVLibError, match=match) as err:
            call()
        assert "\n" not in str(err.value), str(err.value)
