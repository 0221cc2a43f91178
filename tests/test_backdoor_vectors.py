"""BV experiments on the smoke world: the sweep's end points are the real models, transfer's diagonal is
self-ASR."""

import pytest
import torch

from bvlib import BVLibError
from bvlib.backdoor_vectors import (
    Attack,
    attack_bv,
    backdoored_model,
    clean_model,
    group_means,
    scale_sweep,
    similarity_matrix,
    top_mass,
    transfer_matrix,
    variations,
    vector_stats,
)
from bvlib.weights import Weights


@pytest.fixture(scope="module")
def attack(smoke_world):
    return Attack(smoke_world.task_names[0], smoke_world.badnets())


def test_sweep_end_points_are_the_clean_and_backdoored_models(smoke_world, attack):
    inject = scale_sweep(smoke_world, attack, [0.0, 1.0], "inject")
    remove = scale_sweep(smoke_world, attack, [0.0, 1.0], "remove")
    trig, tgt = attack.trigger, attack.target
    clean = smoke_world.evaluate(attack.task, clean_model(smoke_world, attack), trig, tgt)
    bd = smoke_world.evaluate(attack.task, backdoored_model(smoke_world, attack), trig, tgt)
    assert inject[0]["asr"] == clean["asr"] and inject[0]["acc"] == clean["acc"]
    assert inject[1]["asr"] == pytest.approx(bd["asr"], abs=0.01) and remove[0]["asr"] == bd["asr"]
    assert remove[1]["asr"] == pytest.approx(clean["asr"], abs=0.01)
    assert inject[1]["asr"] > inject[0]["asr"]  # injecting the BV implants the backdoor
    with pytest.raises(BVLibError, match="inject"):
        scale_sweep(smoke_world, attack, [1.0], "add")


def test_variations_and_matrices(smoke_world):
    task = smoke_world.task_names[0]
    attacks = variations(
        smoke_world,
        task,
        seeds=[0, 1],
        locations=["top_left"],
        targets=[2],
        tasks=[smoke_world.task_names[1]],
    )
    assert [a.group for a in attacks] == ["reference", "seed", "location", "target", "task"]
    assert (
        attacks[2].trigger.location == "top_left"
        and attacks[3].target == 2
        and attacks[4].task == smoke_world.task_names[1]
    )
    cos = similarity_matrix(smoke_world, attacks)
    assert torch.allclose(cos.diagonal(), torch.ones(len(attacks)), atol=1e-5)
    transfer = transfer_matrix(smoke_world, attacks)
    for i, a in enumerate(
        attacks
    ):  # the diagonal is each attack's own ASR on clean + its BV (= its backdoored model)
        own = smoke_world.evaluate(a.task, backdoored_model(smoke_world, a), a.trigger, a.target)["asr"]
        assert transfer[i, i] == pytest.approx(own, abs=0.02)
    means = group_means(cos, attacks)
    assert set(means) == {"seed", "location", "target", "task"}
    assert means["seed"] == pytest.approx(float(cos[0, 1]), abs=1e-6)
    with pytest.raises(BVLibError, match="unknown task"):
        variations(smoke_world, task, tasks=["nope"])


def test_vector_stats_and_top_mass(smoke_world, attack):
    stats = vector_stats(smoke_world, attack)
    assert stats["bv_norm"] == pytest.approx(attack_bv(smoke_world, attack).norm())
    assert 0 < stats["bv_top1pct_mass"] <= 1 and -1 <= stats["cos_bv_tau"] <= 1
    layout = smoke_world.layout
    spike = torch.zeros(layout.numel)
    spike[7] = 3.0
    assert top_mass(Weights(spike, layout)) == 1.0
    assert top_mass(Weights(torch.ones(layout.numel), layout), 0.1) == pytest.approx(0.1, rel=0.01)
