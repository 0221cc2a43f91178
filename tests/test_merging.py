import hashlib
import math

import numpy as np
import pytest
import torch

from bvlib import BVLibError, Layout, Weights
from bvlib.attacks.sbv import sparse_backdoor_vector
from bvlib.merging import (
    METHODS,
    consensus_mask,
    dare_keys,
    dare_row_offsets,
    dare_uniform,
    kth_largest,
    merge,
    sign_agreement,
    tall_masks,
)

# A tiny model: two linear layers, a bias, and a 2-D embedding that the SVD methods must leave alone.
LAYOUT = Layout(
    ("a.weight", "a.bias", "b.weight", "positional_embedding"),
    ((6, 4), (4,), (3, 5), (2, 3)),
)
MATRICES = ("a.weight", "b.weight")


def random_stack(k=3, layout=LAYOUT, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, layout.numel, generator=g, dtype=dtype)


def as_dicts(s, layout=LAYOUT):
    return [Weights(row.clone(), layout).state_dict() for row in s]


def flatten(d, layout=LAYOUT):
    return torch.cat([d[n].reshape(-1) for n in layout.names])


def sign(v):
    return (v > 0) - (v < 0)


# slow references: per-key dicts, per-coordinate loops ----------------------------------------------
def ref_task_arithmetic(dicts, lam):
    return flatten({n: lam * sum(d[n] for d in dicts) for n in LAYOUT.names})


def ref_ties(s, k, lam):
    K, D = s.shape
    n = max(1, int(k * D))
    trimmed = []
    for row in s:
        thr = row.abs().kthvalue(D - n + 1).values
        trimmed.append([float(x) if abs(x) >= thr else 0.0 for x in row])
    elected = [sign(sum(t[i] for t in trimmed)) for i in range(D)]
    majority = sign(sum(elected))
    out = []
    for i in range(D):
        e = elected[i] or majority
        agree = [t[i] for t in trimmed if t[i] * e > 0]
        out.append(lam * sum(agree) / len(agree) if agree else 0.0)
    return torch.tensor(out)


def ref_tall_masks(s, tall_lambda):
    K, D = s.shape
    return [
        [abs(float(s[t, i])) > abs(float(s[:, i].sum() - s[t, i])) * tall_lambda for i in range(D)]
        for t in range(K)
    ]


def ref_tall(s, lam, tall_lambda):
    m = ref_tall_masks(s, tall_lambda)
    K, D = s.shape
    return torch.tensor([lam * sum(float(s[t, i]) for t in range(K) if m[t][i]) for i in range(D)])


def ref_consensus(s, lam, k, tall_lambda):
    m = ref_tall_masks(s, tall_lambda)
    K, D = s.shape
    return torch.tensor(
        [lam * float(s[:, i].sum()) if sum(m[t][i] for t in range(K)) >= k else 0.0 for i in range(D)]
    )


def ref_tsv(dicts, lam, rank_share=None):
    K = len(dicts)
    share = 1 / K if rank_share is None else rank_share
    out = {}
    for name in LAYOUT.names:
        if name not in MATRICES:
            out[name] = lam * sum(d[name] for d in dicts) / K
            continue
        us, ss, vs = [], [], []
        for d in dicts:  # one task at a time
            u, sv, vh = torch.linalg.svd(d[name], full_matrices=False)
            r = max(1, int(share * len(sv)))
            us.append(u[:, :r])
            ss.append(sv[:r])
            vs.append(vh[:r, :])
        pu, _, qu = torch.linalg.svd(torch.cat(us, 1), full_matrices=False)
        pv, _, qv = torch.linalg.svd(torch.cat(vs, 0), full_matrices=False)
        out[name] = lam * (pu @ qu) @ torch.diag(torch.cat(ss)) @ (pv @ qv)
    return flatten(out)


def ref_iso_c(dicts, lam):
    out = {}
    for name in LAYOUT.names:
        total = sum(d[name] for d in dicts)
        if name not in MATRICES:
            out[name] = lam * total / len(dicts)
            continue
        u, sv, vh = torch.linalg.svd(total, full_matrices=False)
        out[name] = lam * sv.mean() * u @ vh
    return flatten(out)


def ref_sbv(s, agreement, combine):
    K, D = s.shape
    out = []
    for i in range(D):
        col = [float(x) for x in s[:, i]]
        pos, neg = sum(x > 0 for x in col), sum(x < 0 for x in col)
        keep = max(pos, neg) / K >= agreement - 1e-9
        out.append((sum(col) / (K if combine == "mean" else 1)) if keep else 0.0)
    return torch.tensor(out)


# hand-computed cases ---------------------------------------------------------------------------
HAND = torch.tensor(
    [
        [4.0, -1.0, 2.0, -3.0, 0.5, 1.0],  # top 3: 4, -3, 2
        [-2.0, 5.0, 1.0, -1.0, 3.0, -0.5],  # top 3: 5, 3, -2
        [3.0, 2.0, -4.0, -2.0, 0.1, 6.0],  # top 3: 6, -4, 3
    ]
)


def test_average_and_task_arithmetic_by_hand():
    assert torch.allclose(merge(HAND, "average"), torch.tensor([5.0, 6.0, -1.0, -6.0, 3.6, 6.5]) / 3)
    assert torch.allclose(
        merge(HAND, "task_arithmetic", lam=0.5), torch.tensor([2.5, 3.0, -0.5, -3.0, 1.8, 3.25])
    )
    assert torch.allclose(merge(HAND), 0.3 * HAND.sum(0))  # the default method and lam


def test_ties_by_hand():
    # trimmed: [4,0,2,-3,0,0], [-2,5,0,0,3,0], [3,0,-4,0,0,6]; mass [5,5,-2,-3,3,6] -> signs + + - - + +
    # disjoint mean: (4+3)/2, 5, -4, -3, 3, 6
    expected = torch.tensor([3.5, 5.0, -4.0, -3.0, 3.0, 6.0])
    assert torch.equal(merge(HAND, "ties", k=0.5, lam=1.0), expected)
    assert torch.allclose(merge(HAND, "ties", k=0.5, lam=0.4), 0.4 * expected)
    # k=0.2 of 6 keeps one coordinate per task: 4, 5, 6
    assert torch.equal(merge(HAND, "ties", k=0.2), torch.tensor([4.0, 5.0, 0, 0, 0, 6.0]))
    # BadMerging's convention: disjoint sum (4+3 on the first coordinate), × lam
    assert torch.equal(
        merge(HAND, "ties", k=0.5, disjoint="sum"), torch.tensor([7.0, 5.0, -4.0, -3.0, 3.0, 6.0])
    )
    with pytest.raises(BVLibError, match="disjoint"):
        merge(HAND, "ties", disjoint="median")


def test_dare_in_bfloat16_keeps_the_right_share():
    """p = 0.99 keeps 1/100 and rescales by 100: the mean of a ones-vector stays ~1 in bf16 too."""
    ones = torch.ones(2, 200_000, dtype=torch.bfloat16)
    out = merge(ones, "dare", p=0.99, lam=0.5)  # 0.5 · Σ of two rescaled ones-vectors: mean ~1
    assert out.dtype == torch.bfloat16
    assert abs(float(out.float().mean()) - 1.0) < 0.05


def test_ties_zero_mass_takes_the_majority_sign():
    s = torch.tensor([[1.0, 2.0], [-1.0, 1.0]])  # coordinate 0 cancels; the elected signs are (0, +)
    assert torch.equal(merge(s, "ties", k=1.0), torch.tensor([1.0, 1.5]))


def test_tall_and_consensus_by_hand():
    s = torch.tensor([[1.0, 0.0, 2.0, -1.0], [1.0, 3.0, 0.0, 1.0], [-1.0, 0.0, 0.0, 1.0]])
    # sum [1,3,2,1]; masks |τ_t| > |sum − τ_t|: [1,0,1,0], [1,1,0,1], [0,0,0,1]
    assert tall_masks(s, 1.0).tolist() == [
        [True, False, True, False],
        [True, True, False, True],
        [False, False, False, True],
    ]
    assert torch.equal(merge(s, "tall", lam=1.0, tall_lambda=1.0), torch.tensor([2.0, 3.0, 2.0, 2.0]))
    assert consensus_mask(s, 2, 1.0).tolist() == [True, False, False, True]
    assert torch.equal(
        merge(s, "consensus", lam=1.0, k=2, tall_lambda=1.0), torch.tensor([1.0, 0.0, 0.0, 1.0])
    )
    assert torch.equal(merge(s, "consensus", lam=1.0, k=0, tall_lambda=1.0), s.sum(0))  # k=0: task arithmetic
    assert torch.equal(merge(s, "consensus", lam=1.0, k=4, tall_lambda=1.0), torch.zeros(4))
    # one λ_t per task: task 3 with λ=0 claims every coordinate where it is non-zero (and no other)
    assert tall_masks(s, [1.0, 1.0, 0.0])[2].tolist() == [True, False, False, True]


SMALL = Layout(("w", "b"), ((2, 2), (2,)))


def test_iso_c_and_tsv_by_hand():
    s = torch.tensor(
        [[3.0, 0.0, 0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 1.0, 3.0, 4.0]]
    )  # w: diag(3,0), diag(0,1)
    # Iso-C: M = diag(3, 1), mean σ = 2 -> 2·I; the bias gets lam · mean = [2, 3]
    assert torch.allclose(
        merge(s, "iso_c", layout=SMALL), torch.tensor([2.0, 0.0, 0.0, 2.0, 2.0, 3.0]), atol=1e-6
    )
    assert torch.allclose(
        merge(s, "iso_c", layout=SMALL, lam=1.5), 1.5 * torch.tensor([2.0, 0, 0, 2.0, 2.0, 3.0]), atol=1e-6
    )
    # TSV-M: rank 1 of 2 per task; the two singular vectors are already orthogonal -> diag(3, 1)
    assert torch.allclose(
        merge(s, "tsv", layout=SMALL), torch.tensor([3.0, 0.0, 0.0, 1.0, 2.0, 3.0]), atol=1e-6
    )


def test_sbv_by_hand():
    bvs = torch.tensor([[1.0, 2.0, -1.0, 0.0, 3.0], [3.0, -2.0, -3.0, 0.0, 1.0], [2.0, 1.0, -2.0, 1.0, 0.0]])
    # all same non-zero sign: coordinates 0 and 2 only
    assert torch.equal(sparse_backdoor_vector(bvs, combine="mean"), torch.tensor([2.0, 0.0, -2.0, 0.0, 0.0]))
    assert torch.equal(
        sparse_backdoor_vector(bvs), torch.tensor([6.0, 0.0, -6.0, 0.0, 0.0])
    )  # sum by default
    # rescale: the sum, as long as the mean BV norm
    mean_norm = float(bvs.norm(dim=1).mean())
    assert torch.allclose(
        sparse_backdoor_vector(bvs, combine="rescale"),
        torch.tensor([1.0, 0, -1.0, 0, 0]) * mean_norm / 2**0.5,
    )
    # 2 of 3 agreeing is enough at agreement=2/3: coordinate 1 (+,−,+) and 4 (+,+,0) join
    assert torch.allclose(
        sparse_backdoor_vector(bvs, agreement=2 / 3, combine="mean"),
        torch.tensor([2.0, 1 / 3, -2.0, 0.0, 4 / 3]),
    )
    assert torch.allclose(sign_agreement(bvs), torch.tensor([1.0, 2 / 3, 1.0, 1 / 3, 2 / 3]))


# against the slow references on the tiny model ---------------------------------------------------------
@pytest.mark.parametrize("k,lam", [(0.2, 1.0), (0.5, 0.7), (1.0, 1.0)])
def test_ties_matches_reference(k, lam):
    s = random_stack()
    assert torch.allclose(merge(s, "ties", k=k, lam=lam), ref_ties(s, k, lam), atol=1e-6)


def test_ties_on_a_long_vector_uses_the_sampled_threshold_exactly():
    s = random_stack(k=3, layout=Layout(("w",), ((300_000,),)), seed=1)
    s[1, :100_000] = 0.0  # ties at zero in one task
    s[2] = s[2].round(decimals=2)  # many ties at the threshold in another
    n = int(0.2 * s.shape[1])
    a = s.abs()
    thr = a.kthvalue(s.shape[1] - n + 1, dim=1).values
    trimmed = torch.where(a >= thr[:, None], s, 0)
    elected = torch.sign(trimmed.sum(0))
    agree = trimmed * elected > 0
    expected = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
    assert torch.allclose(merge(s, "ties"), expected, atol=1e-6)


def test_kth_largest_is_exact_with_ties_and_bracket_misses():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 50_000, generator=g).abs()
    a[1, :30_000] = 0.0
    a[2] = a[2].round(decimals=1)
    a[3, ::3] = a[3, 0]
    D = a.shape[1]
    for f in (0.001, 0.2, 0.5, 0.9):
        n = max(1, int(f * D))
        ref = a.kthvalue(D - n + 1, dim=1).values
        for z in (6.0, 0.0):  # z=0 makes the bracket miss often: the fallback must still be exact
            assert torch.equal(kth_largest(a, n, sample=512, z=z), ref)
    with pytest.raises(BVLibError):
        kth_largest(a, 0)


def test_streamed_slices_give_the_unstreamed_results(monkeypatch):
    # On CPU, TIES (and its threshold), TALL, Consensus and SBV stream the stack through cache-sized column
    # slices; with tiny
    # slices (hundreds of them, the last one short) the results must not change, exactly.
    import bvlib.merging as merging

    g = torch.Generator().manual_seed(7)
    s = torch.randn(4, 50_001, generator=g)
    s[1, :20_000] = 0.0  # a tie-heavy row
    s[2] = s[2].round(decimals=1)
    s[:, 100:140] = torch.tensor([3.0, 0.0, 0.0, -3.0]).unsqueeze(
        1
    )  # large, kept by the trim, and cancelling exactly
    n = int(0.2 * s.shape[1])
    big = {
        "kth": [kth_largest(s, n, sample=512), kth_largest(s, n, magnitude=True, sample=512)],
        "ties": merge(s, "ties"),
        "ties_k1": merge(s, "ties", k=1.0),
        "sbv": sparse_backdoor_vector(s, agreement=0.75),
        "tall": merge(s, "tall", tall_lambda=[0.4, 0.2, 0.6, 0.4]),
        "consensus": merge(s, "consensus", k=2),
    }
    monkeypatch.setattr(merging, "CPU_CHUNK", 4 * 173)
    assert len(merging.column_slices(4, s.shape[1], s.device)) == math.ceil(50_001 / 173)
    assert torch.equal(big["kth"][0], s.kthvalue(s.shape[1] - n + 1, dim=1).values)
    assert torch.equal(kth_largest(s, n, sample=512), big["kth"][0])
    assert torch.equal(
        kth_largest(s, n, magnitude=True, sample=512), s.abs().kthvalue(s.shape[1] - n + 1, dim=1).values
    )
    assert torch.equal(kth_largest(s, n, magnitude=True, sample=512), big["kth"][1])
    assert torch.equal(merge(s, "ties"), big["ties"])
    assert torch.equal(merge(s, "ties", k=1.0), big["ties_k1"])
    for key, k in (
        ("ties", 0.2),
        ("ties_k1", 1.0),
    ):  # cancelled coordinates take the majority of the elected signs
        trimmed = torch.where(
            s.abs()
            >= s.abs().kthvalue(s.shape[1] - max(1, int(k * s.shape[1])) + 1, dim=1, keepdim=True).values,
            s,
            0,
        )
        majority = torch.sign(torch.sign(trimmed.sum(0)).sum())
        assert majority != 0 and torch.equal(big[key][100:140], torch.full((40,), 3.0) * majority)
    assert torch.equal(sparse_backdoor_vector(s, agreement=0.75), big["sbv"])
    assert torch.equal(merge(s, "tall", tall_lambda=[0.4, 0.2, 0.6, 0.4]), big["tall"])
    assert torch.equal(merge(s, "consensus", k=2), big["consensus"])


def test_task_arithmetic_and_average_match_reference():
    s = random_stack()
    assert torch.allclose(
        merge(s, "task_arithmetic", lam=0.3), ref_task_arithmetic(as_dicts(s), 0.3), atol=1e-6
    )
    assert torch.allclose(merge(s, "average"), ref_task_arithmetic(as_dicts(s), 1 / 3), atol=1e-6)


@pytest.mark.parametrize("tall_lambda", [0.4, 1.0])
def test_tall_and_consensus_match_reference(tall_lambda):
    s = random_stack(k=4)
    assert torch.allclose(merge(s, "tall", tall_lambda=tall_lambda), ref_tall(s, 0.3, tall_lambda), atol=1e-6)
    for k in (1, 2, 3):
        got = merge(s, "consensus", k=k, tall_lambda=tall_lambda)
        assert torch.allclose(got, ref_consensus(s, 0.3, k, tall_lambda), atol=1e-6)


def test_tsv_matches_reference():
    s = random_stack()
    assert torch.allclose(merge(s, "tsv", layout=LAYOUT), ref_tsv(as_dicts(s), 1.0), atol=1e-5)
    assert torch.allclose(merge(s, "tsv", layout=LAYOUT, lam=0.5), ref_tsv(as_dicts(s), 0.5), atol=1e-5)


def orthogonal_tasks(k=3, seed=0):
    """Task vectors whose layer matrices have mutually orthogonal row and column spaces."""
    g = torch.Generator().manual_seed(seed)
    dicts = [{} for _ in range(k)]
    for name, shape in zip(LAYOUT.names, LAYOUT.shapes):
        if name not in MATRICES:
            for d in dicts:
                d[name] = torch.randn(shape, generator=g)
            continue
        m, n = shape
        qm = torch.linalg.qr(torch.randn(m, m, generator=g))[0]
        qn = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
        r = min(m, n)
        for t, d in enumerate(dicts):
            cols = list(range(t, r, k))  # task t owns directions t, t+k, ... (a.weight: task 0 gets rank 2)
            sv = torch.rand(len(cols), generator=g) + 0.5
            d[name] = qm[:, cols] @ torch.diag(sv) @ qn[:, cols].T
    return torch.stack([flatten(d) for d in dicts])


@pytest.mark.parametrize("rank_share", [None, 1.0])
def test_tsv_reconstructs_the_sum_of_orthogonal_tasks(rank_share):
    s = orthogonal_tasks()
    got = Weights(merge(s, "tsv", layout=LAYOUT, rank_share=rank_share), LAYOUT).state_dict()
    total = Weights(s.sum(0), LAYOUT).state_dict()
    mean = Weights(s.mean(0), LAYOUT).state_dict()
    if rank_share is None:  # 1/K of rank 4 keeps 1 per task: task 0's second direction is lost
        assert not torch.allclose(got["a.weight"], total["a.weight"], atol=1e-4)
        assert torch.allclose(got["b.weight"], total["b.weight"], atol=1e-5)
    else:
        for name in MATRICES:
            assert torch.allclose(got[name], total[name], atol=1e-5)
    for name in ("a.bias", "positional_embedding"):  # non-matrices: lam · mean
        assert torch.allclose(got[name], mean[name], atol=1e-6)


def test_iso_c_matches_reference_and_flattens_the_spectrum():
    s = random_stack()
    got = merge(s, "iso_c", layout=LAYOUT, lam=1.3)
    assert torch.allclose(got, ref_iso_c(as_dicts(s), 1.3), atol=1e-5)
    layers, total = Weights(got, LAYOUT).state_dict(), Weights(s.sum(0), LAYOUT).state_dict()
    for name in MATRICES:
        sv = torch.linalg.svdvals(layers[name])
        assert torch.allclose(sv, sv.mean().expand_as(sv), atol=1e-5)
        assert math.isclose(
            float(sv.mean()), 1.3 * float(torch.linalg.svdvals(total[name]).mean()), rel_tol=1e-5
        )


def test_dare_drops_rescales_and_is_seeded():
    s = random_stack(k=2, layout=Layout(("w",), ((200_000,),)))
    assert torch.equal(merge(s, "dare", p=0.0), merge(s, "task_arithmetic"))
    a, b, c = (merge(s, "dare", p=0.9, seed=seed) for seed in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    one = merge(s[:1], "dare", p=0.9, lam=1.0)  # one task: kept coordinates are τ / (1 − p), the rest 0
    kept = one != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.003
    assert torch.allclose(one[kept], s[0, kept] / 0.1)
    assert torch.equal(merge(s, "dare", p=0.0, base="ties", k=0.2, lam=1.0), merge(s, "ties", k=0.2))


def test_dare_generator_is_splitmix64_per_tensor_row_and_coordinate():
    """DARE's uniforms are splitmix64 outputs at counters s + (i + 1)·golden + k·row_step (s hashed from
    the seed and the tensor name): checked bit for bit against a plain-integer reference, so the mask
    is the same on any device; masks of different rows, tensors and seeds are independent."""
    from bvlib.data.cache import _mix64 as mix64_numpy  # uint64 numpy splitmix64 (it adds golden first)

    golden, row_step = 0x9E3779B97F4A7C15, 0xD1B54A32D192ED03
    layout = Layout(("a", "b"), ((3, 4), (5,)))
    got = dare_uniform(dare_keys(torch.zeros(3, 17), 7, layout), dare_row_offsets(3))
    want = torch.zeros(3, 17, dtype=torch.float64)
    for name, off, n in zip(layout.names, layout.offsets, layout.numels):
        s = int.from_bytes(hashlib.sha256(f"dare:7:{name}".encode()).digest()[:8], "little")
        counters = [
            (s + (i + 1) * golden + k * row_step - golden) % 2**64 for k in range(3) for i in range(n)
        ]
        bits = mix64_numpy(np.array(counters, dtype=np.uint64)) >> np.uint64(40)
        want[:, off : off + n] = torch.from_numpy(bits.astype(np.float64)).view(3, n) / 2**24
    assert torch.equal(got.double(), want)
    u = dare_uniform(dare_keys(torch.zeros(4, 250_000), 0), dare_row_offsets(4))
    assert abs(float(u.mean()) - 0.5) < 0.002 and abs(float(u.var()) - 1 / 12) < 0.001
    assert float(torch.corrcoef(u).triu(1).abs().max()) < 0.01
    other_seed = dare_uniform(dare_keys(torch.zeros(1, 250_000), 1), dare_row_offsets(1))
    assert abs(float(torch.corrcoef(torch.cat([u[:1], other_seed]))[0, 1])) < 0.01


def test_sbv_sum_is_longer_than_one_bv_and_mean_is_shorter():
    """The attack's point: summed agreeing coordinates outgrow one BV; the averaged subset cannot."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(2000, generator=g)
    bvs = torch.stack([shared + 0.5 * torch.randn(2000, generator=g) for _ in range(3)])
    one = float(bvs.norm(dim=1).mean())
    assert sparse_backdoor_vector(bvs).norm() > 1.5 * one
    assert sparse_backdoor_vector(bvs, combine="mean").norm() < one
    assert abs(float(sparse_backdoor_vector(bvs, combine="rescale").norm()) - one) < 1e-3 * one


def test_sbv_matches_reference_and_keeps_one_bv():
    g = torch.Generator().manual_seed(5)
    bvs = torch.randn(3, 40, generator=g) + 0.5  # mostly positive: many coordinates agree
    bvs[0, :5] = 0.0
    for agreement, combine in [
        (1.0, "mean"),
        (1.0, "sum"),
        (2 / 3, "mean"),
        (0.6, "sum"),
    ]:  # rescale: see above
        got = sparse_backdoor_vector(bvs, agreement=agreement, combine=combine)
        assert torch.allclose(got, ref_sbv(bvs, agreement, combine), atol=1e-6)
    kept = sparse_backdoor_vector(bvs) != 0
    assert torch.equal(kept, ((bvs > 0).all(0) | (bvs < 0).all(0)))
    one = Weights(bvs[0].clone(), Layout(("w",), ((40,),)))
    assert torch.equal(sparse_backdoor_vector([one]).flat, one.flat)


# interface ----------------------------------------------------------------------------------------
ALL = {
    "average": {},
    "task_arithmetic": {},
    "ties": {},
    "dare": {"layout": LAYOUT},  # with a layout, DARE draws per parameter tensor (as a streamed merge does)
    "tall": {},
    "consensus": {},
    "tsv": {"layout": LAYOUT},
    "iso_c": {"layout": LAYOUT},
}


def test_registry_lists_every_method():
    assert set(METHODS) == set(ALL)


@pytest.mark.parametrize("method", list(ALL))
def test_weights_and_tensor_inputs_agree_and_input_is_untouched(method):
    s = random_stack(dtype=torch.float64)
    before = s.clone()
    weights = [Weights(row, LAYOUT) for row in s]
    out_w = merge(weights, method)
    out_t = merge(s, method, **ALL[method])
    assert isinstance(out_w, Weights) and out_w.layout == LAYOUT
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (LAYOUT.numel,) and out_t.dtype == torch.float64
    assert torch.equal(out_w.flat, out_t)
    assert torch.equal(s, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", list(ALL))
def test_cuda_matches_cpu(method):
    s = random_stack(k=4)
    out = merge(s.cuda(), method, **ALL[method])
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert torch.allclose(out.cpu(), merge(s, method, **ALL[method]), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_kernels_match_cpu_at_scale():
    # Past 4 × 2^20 columns the GPU threshold takes the sampled bracket, and TIES, TALL, Consensus and SBV run
    # as
    # torch.compile'd kernels: same threshold exactly, same merges to float32 rounding, as the CPU's streamed
    # code.
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 5_000_000, generator=g)
    s[1, :1_000_000] = 0.0
    gpu = s.cuda()
    n = int(0.2 * s.shape[1])
    assert torch.equal(
        kth_largest(gpu, n, magnitude=True).cpu(), s.abs().kthvalue(s.shape[1] - n + 1, dim=1).values
    )
    for method in ("ties", "tall", "consensus"):
        assert torch.allclose(merge(gpu, method).cpu(), merge(s, method), atol=1e-5), method
    assert torch.allclose(
        sparse_backdoor_vector(gpu, agreement=0.75).cpu(),
        sparse_backdoor_vector(s, agreement=0.75),
        atol=1e-5,
    )


def test_svd_check_flags_inexact_and_nan_factorizations():
    """What decides whether gesvda's result is kept on CUDA: exact factors pass; a perturbed U, a
    non-orthonormal one and NaNs (0/0 on a rank-deficient matrix) are flagged."""
    from bvlib.merging import svd_failures

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 60, 40, generator=g)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    u, s, vh = u.clone(), s.clone(), vh.clone()
    assert not svd_failures(x, u, s, vh).any()
    u[1, 0, 0] += 1e-3  # reconstruction and orthonormality off
    u[2, :, -1] *= 1.01  # reconstructs to 1e-3 but the last column is not unit
    s[2, -1] /= 1.01
    u[3, :, -1] = float("nan")
    vh[4] = float("inf")
    assert svd_failures(x, u, s, vh).tolist() == [False, True, True, True, True]


def test_refused_svd_batch_is_halved_down_to_the_matrices_that_fail(monkeypatch):
    """cuSOLVER refuses a whole batch when one matrix does not converge (gesvda on a rank-deficient
    one, seen on an H200): only that matrix may leave the fast driver, as NaN factors the check redoes."""
    from bvlib import merging

    real_svd, calls = torch.linalg.svd, []

    def cusolver_like(x, full_matrices=False, driver=None):
        calls.append(len(x))
        if bool((x.abs().amax((-2, -1)) == 0).any()):
            raise RuntimeError("linalg.svd: The algorithm failed to converge (error code: 101)")
        return real_svd(x, full_matrices=full_matrices)

    x = torch.randn(8, 30, 20, generator=torch.Generator().manual_seed(0))
    x[5] = 0.0
    monkeypatch.setattr(torch.linalg, "svd", cusolver_like)
    u, s, vh = merging._cusolver_svd(x, "gesvda")
    fails = merging.svd_failures(x, u, s, vh)
    assert fails.tolist() == [i == 5 for i in range(8)] and bool(s[5].isnan().all())
    assert len(calls) == 7  # 8 -> 4 + 4 -> 4, 2 + 2 -> 2, 1 + 1: log-depth, not one call per matrix
    assert torch.equal(s[:5], real_svd(x[:5], full_matrices=False)[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checked_svd_is_exact_on_hard_matrices():
    # gesvda is approximate: on rank-deficient, ill-conditioned or wide matrices the checked SVD must
    # still return orthonormal factors that reconstruct the input (such matrices are redone by the
    # default driver), to a backward-stable SVD's relative error in float32.
    from bvlib.merging import _svd

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 300, 200, generator=g)
    x[1, :, 100:] = 0.0  # rank 100
    x[2] = x[2] @ torch.diag(torch.logspace(0, -7, 200))  # condition number 1e7
    eye = torch.eye(200)
    for batch in (x, x.mT):
        u, s, vh = (t.cpu() for t in _svd(batch.cuda()))
        recon = torch.linalg.matrix_norm((u * s.unsqueeze(-2)) @ vh - batch) / torch.linalg.matrix_norm(batch)
        orth = torch.stack([(u.mT @ u - eye).abs().amax((-2, -1)), (vh @ vh.mT - eye).abs().amax((-2, -1))])
        sigma = (s - torch.linalg.svdvals(batch)).abs().amax(-1) / s[:, 0]
        assert recon.max() < 2e-5 and orth.max() < 1e-4 and sigma.max() < 1e-5, (recon, orth, sigma)


def test_unknown_method_and_bad_params_are_refused():
    s = random_stack()
    with pytest.raises(BVLibError, match="unknown merging method 'x'; choose one of: average"):
        merge(s, "x")
    bad = [
        ("ties", {"k": 0}),
        ("ties", {"k": 1.5}),
        ("ties", {"lam": float("nan")}),
        ("task_arithmetic", {"lam": "0.3"}),
        ("task_arithmetic", {"lamda": 0.3}),
        ("average", {"lam": 0.3}),
        ("dare", {"p": 1.0}),
        ("dare", {"p": -0.1}),
        ("dare", {"seed": 1.5}),
        ("dare", {"base": "tsv"}),
        ("dare", {"k": 0.2}),
        ("tall", {"tall_lambda": -1.0}),
        ("tall", {"tall_lambda": [0.4, 0.4]}),
        ("consensus", {"k": 1.5}),
        ("tsv", {"layout": LAYOUT, "rank_share": 0.0}),
        ("tsv", {}),
        ("iso_c", {}),
    ]
    for method, params in bad:
        with pytest.raises(BVLibError) as err:
            merge(s, method, **params)
        assert "\n" not in str(err.value), (method, params)
    for params in ({"agreement": 0.5}, {"agreement": 1.1}, {"combine": "max"}):
        with pytest.raises(BVLibError):
            sparse_backdoor_vector(s, **params)


def test_mismatched_layouts_and_shapes_are_refused():
    s = random_stack()
    other = Layout(("a.weight", "a.bias", "b.weight", "positional_embedding"), ((4, 6), (4,), (3, 5), (2, 3)))
    with pytest.raises(BVLibError, match="different architectures"):
        merge([Weights(s[0], LAYOUT), Weights(s[1], other)])
    with pytest.raises(BVLibError, match="different architectures"):
        merge([Weights(s[0], LAYOUT)], "tsv", layout=other)
    with pytest.raises(BVLibError, match="layout"):
        merge(s[:, :10], "iso_c", layout=LAYOUT)
    with pytest.raises(BVLibError):
        merge(s[0], "average")  # one flat vector, not a stack
    with pytest.raises(BVLibError):
        merge(Weights(s[0], LAYOUT), "average")  # one Weights, not a list
    with pytest.raises(BVLibError):
        merge(torch.ones(2, 3, dtype=torch.long), "average")
