import pytest
import torch
from torch import nn

from bvlib import (
    BVLibError,
    Layout,
    Weights,
    apply_vector,
    backdoor_vector,
    cosine_matrix,
    stack,
    task_vector,
)


def tiny(seed=0, hidden=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def test_flatten_round_trip_restores_every_parameter():
    a, b = tiny(0), tiny(1)
    Weights.from_module(a).load_into(b)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_layout_offsets_and_state_dict_views():
    w = Weights.from_module(tiny())
    assert w.layout.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert w.layout.offsets == (0, 15, 20, 30) and w.layout.numel == 32
    sd = w.state_dict()
    assert sd["2.weight"].shape == (2, 5)
    sd["0.bias"][0] = 42.0  # a view: writes through to the flat vector
    assert w.flat[15] == 42.0
    assert Layout.from_json(w.layout.to_json()) == w.layout


def test_clean_plus_bv_reproduces_backdoored():
    clean, bd = Weights.from_module(tiny(0)), Weights.from_module(tiny(1))
    bv = backdoor_vector(bd, clean)
    assert torch.allclose(apply_vector(clean, bv).flat, bd.flat)
    assert torch.allclose((bd - bv).flat, clean.flat)
    assert torch.allclose(apply_vector(clean, bv, 0.5).flat, (clean.flat + bd.flat) / 2)


def test_bv_of_a_model_with_itself_is_zero():
    w = Weights.from_module(tiny())
    assert backdoor_vector(w, w).norm() == 0.0
    assert task_vector(w, w).sparsity() == 1.0


def test_mismatched_architectures_refused():
    with pytest.raises(BVLibError, match="different architectures.*shape"):
        Weights.from_module(tiny(hidden=5)) - Weights.from_module(tiny(hidden=6))
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2), nn.Linear(2, 2))
    with pytest.raises(BVLibError, match="parameter names differ"):
        Weights.from_module(tiny()) + Weights.from_module(other)
    with pytest.raises(BVLibError):
        Weights.from_module(tiny(hidden=6)).load_into(tiny(hidden=5))


def test_cosine_matrix_matches_pairwise_cosine():
    vs = [Weights.from_module(tiny(s)) for s in range(4)]
    m = cosine_matrix(vs)
    assert m.shape == (4, 4)
    assert torch.allclose(m.diagonal(), torch.ones(4))
    ref = torch.nn.functional.cosine_similarity(vs[1].flat, vs[3].flat, dim=0)
    assert torch.allclose(m[1, 3], ref, atol=1e-6) and torch.allclose(m, m.T)
    assert torch.allclose(cosine_matrix(stack(vs)), m)
    assert torch.allclose(cosine_matrix([vs[0], -1 * vs[0]])[0, 1], torch.tensor(-1.0))


def test_from_state_dict_checks_and_nan_detection():
    model = tiny()
    w = Weights.from_module(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(Weights.from_state_dict(state, w.layout).flat, w.flat)
    del state["2.bias"]
    with pytest.raises(BVLibError, match="lacks 1 parameters"):
        Weights.from_state_dict(state, w.layout)
    bad = Weights(w.flat.clone(), w.layout)
    bad.flat[3] = float("nan")
    with pytest.raises(BVLibError, match="NaN"):
        bad.check_finite()


def test_digest_is_remembered_until_the_values_change():
    from bvlib.triggers import digest

    w = Weights.from_module(tiny())
    first = w.digest()
    assert first == digest(w.flat) == w.digest()
    w.state_dict()["0.weight"].add_(1.0)  # an in-place write through a view
    assert w.digest() == digest(w.flat) != first
    w.flat = w.flat.clone()
    w.flat[0] = 5.0
    assert w.digest() == digest(w.flat)
