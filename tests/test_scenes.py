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
    assert torch.equal(vectors[0].flat, bd.tau.flat) and all(torch.equal(v.flat, scene.tau[t].flat) for v, t in zip(vectors[1:], scene.names[1:]))
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
    assert torch.allclose((scene.sbv((0, 1, 2), beta=0.5).tau - scene.tau["mnist"]).flat, 0.5 * sparse_backdoor_vector(bvs).flat, atol=1e-6)


def test_merges_use_the_validated_lambda(scene, smoke_world):
    lam = smoke_world.merge_params("task_arithmetic")["lam"]
    expected = merge(scene.vectors(None), "task_arithmetic", lam=lam)
    assert torch.equal(scene.merge(None, "task_arithmetic").flat, expected.flat)
    assert not torch.equal(scene.merge(None, "task_arithmetic", lam=lam + 0.1).flat, expected.flat)
    bd = scene.badnets()
    r = scene.judge(scene.merge(bd, "ties"), bd)
    assert set(r) >= {"mean_acc", "attacked_acc", "asr"} and 0 <= r["asr"] <= 1
