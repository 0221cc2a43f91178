"""The shared attacked-task scene on the smoke world: what each attack injects, and how it is merged."""

import pytest
import torch

from bvlib.attacks.sbv import sparse_backdoor_vector
from bvlib.merging import merge
from bvlib.scenes import AttackedScene


@pytest.fixture(scope="module")
def scene(smoke_world):
    return AttackedScene(smoke_world, "mnist")


def test_attacks_replace_the_attacked_task_vector(scene):
    bd = scene.badnets()
    vectors = scene.vectors(bd)
    assert len(vectors) == len(scene.names) and scene.names[0] == "mnist"
    assert torch.equal(vectors[0].flat, bd.tau.flat) and all(
        torch.equal(v.flat, scene.tau[t].flat) for v, t in zip(vectors[1:], scene.names[1:])
    )
    assert torch.equal(scene.vectors(None)[0].flat, scene.tau["mnist"].flat)


def test_sbv_is_injected_longer_than_one_bv_and_beta_scales_it(scene):
    bvs = scene.seed_bvs((0, 1, 2))
    one = scene.bv(1.0)
    sbv = scene.sbv((0, 1, 2))
    assert sbv.injected_norm == pytest.approx(sparse_backdoor_vector(bvs).norm(), rel=1e-5)
    assert sbv.injected_norm > one.injected_norm  # summed agreeing coordinates, not averaged ones
    assert scene.mean_bv((0, 1, 2)).injected_norm < one.injected_norm * 1.01
    assert scene.sbv((0, 1, 2), beta=2.0).injected_norm == pytest.approx(2 * sbv.injected_norm, rel=1e-5)
    # θ_clean + β·SBV: removing the clean task vector leaves β·SBV
    assert torch.allclose(
        (scene.sbv((0, 1, 2), beta=0.5).tau - scene.tau["mnist"]).flat,
        0.5 * sparse_backdoor_vector(bvs).flat,
        atol=1e-6,
    )


def test_merges_use_the_validated_lambda(scene, smoke_world):
    lam = smoke_world.merge_params("task_arithmetic")["lam"]
    expected = merge(scene.vectors(None), "task_arithmetic", lam=lam)
    assert torch.equal(scene.merge(None, "task_arithmetic").flat, expected.flat)
    assert not torch.equal(scene.merge(None, "task_arithmetic", lam=lam + 0.1).flat, expected.flat)
    bd = scene.badnets()
    r = scene.judge(scene.merge(bd, "ties"), bd)
    assert set(r) >= {"mean_acc", "attacked_acc", "asr"} and 0 <= r["asr"] <= 1


def test_an_sbv_of_badmerging_bvs_differs_from_one_badmerging_bv(scene, smoke_world):
    bvs = scene.family_bvs("BadMerging", (0, 1, 2))
    clean = smoke_world.finetune("mnist", seed=0)
    one = scene.bv(1.0, 0, "BadMerging")  # β = 1: the BadMerging model itself
    assert torch.allclose((scene.theta0 + one.tau).flat, (clean + bvs[0]).flat, atol=1e-6)
    assert torch.allclose(one.tau.flat, scene.badmerging(0).tau.flat, atol=1e-6)
    sbv = scene.sbv((0, 1, 2), 0.5, family="BadMerging")
    assert sbv.trigger == scene.badmerging_poison.trigger and sbv.name == "SBV (BadMerging)"
    injected = sbv.tau + scene.theta0 - clean
    assert torch.allclose(injected.flat, 0.5 * sparse_backdoor_vector(bvs).flat, atol=1e-6)
    assert 0 < float(injected.flat.ne(0).float().mean()) < 1 and not torch.allclose(
        injected.flat, 0.5 * bvs[0].flat, atol=1e-4
    )


def test_location_bvs_are_token_aligned_corners(scene, smoke_world):
    attacks = scene._location_attacks((0, 1, 2))
    assert [a.trigger.location for a in attacks] == list(scene.LOCATIONS) and [a.seed for a in attacks] == [
        0,
        0,
        0,
    ]
    assert attacks[0].poison == scene.poison and all(
        a.trigger.token == smoke_world.patch_size for a in attacks[1:]
    )
    assert len(scene.family_bvs("BadNets locations", (0, 0))) == 2


def test_a_beta_sweep_starts_at_the_clean_model_and_costs_grow(smoke_world):
    rows = AttackedScene(smoke_world, "fashion").beta_sweep("BadNets", "BV", [1.0, 3.0])
    assert [r["beta"] for r in rows] == [0.0, 1.0, 3.0] and rows[0]["cost"] == 0.0 and rows[0]["norm"] == 0.0
    assert rows[-1]["norm"] == pytest.approx(3 * rows[1]["norm"], rel=1e-5) and rows[-1]["cost"] > 0
    assert rows[-1]["attacker ASR"] > rows[0]["attacker ASR"] + 0.3
    assert {"ASR TA", "ASR TIES", "ASR TIES sum ×0.3"} <= set(rows[0]) and rows[0]["n_asr"] < rows[0]["n_acc"]
