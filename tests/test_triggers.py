import pytest
import torch

from bvlib import BVLibError
from bvlib.triggers import LOCATIONS, PatchTrigger


@pytest.mark.parametrize(
    "location, corner",
    [
        ("bottom_right", (28, 28)),
        ("top_left", (0, 0)),
        ("top_right", (0, 28)),
        ("bottom_left", (28, 0)),
        ("center", (14, 14)),
    ],
)
def test_trigger_lands_where_asked(location, corner):
    x = torch.zeros(2, 3, 32, 32)
    out = PatchTrigger(size=4, location=location).apply(x)
    changed = (out != x).any(dim=(0, 1)).nonzero()
    assert tuple(changed.min(0).values.tolist()) == corner
    assert tuple(changed.max(0).values.tolist()) == (corner[0] + 3, corner[1] + 3)
    assert torch.equal(x, torch.zeros_like(x))  # input untouched


def test_random_location_is_seeded_and_inside():
    a, b = PatchTrigger(size=5, location="random", seed=1), PatchTrigger(size=5, location="random", seed=1)
    assert a.position(32, 32) == b.position(32, 32)
    positions = {PatchTrigger(size=5, location="random", seed=s).position(32, 32) for s in range(20)}
    assert len(positions) > 5 and all(0 <= r <= 27 and 0 <= c <= 27 for r, c in positions)


def test_patterns():
    solid = PatchTrigger(size=3, color=(1.0, 0.0, 0.5)).patch()
    assert torch.equal(solid[:, 1, 2], torch.tensor([1.0, 0.0, 0.5]))
    board = PatchTrigger(size=4, pattern="checkerboard").patch()
    assert board[0, 0, 0] == 1 and board[0, 0, 1] == 0 and board[0, 1, 1] == 1
    n1, n2 = (
        PatchTrigger(size=4, pattern="noise", seed=3).patch(),
        PatchTrigger(size=4, pattern="noise", seed=3).patch(),
    )
    assert torch.equal(n1, n2) and not torch.equal(n1, PatchTrigger(size=4, pattern="noise", seed=4).patch())


def test_bad_triggers_are_clear_errors():
    with pytest.raises(BVLibError, match="does not fit"):
        PatchTrigger(size=40).apply(torch.zeros(1, 3, 32, 32))
    with pytest.raises(BVLibError, match="unknown trigger location"):
        PatchTrigger(location="middle")
    with pytest.raises(BVLibError, match="choose one of"):
        PatchTrigger(pattern="stripes")
    with pytest.raises(BVLibError, match="positive"):
        PatchTrigger(size=0)
    with pytest.raises(BVLibError, match="float images"):
        PatchTrigger().apply(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    assert set(LOCATIONS) >= {"bottom_right", "random"}


def _in_token_pixels(trigger: PatchTrigger, side: int, token: int) -> set[tuple[int, int]]:
    """Where a trigger lands inside its tokens, read off a triggered blank image."""
    rows, cols = trigger.apply(torch.zeros(1, 3, side, side))[0, 0].ne(0).nonzero().unbind(1)
    rows, cols = (rows % token).tolist(), (cols % token).tolist()
    return set(zip(rows, cols))


@pytest.mark.parametrize("side,token,size", [(32, 8, 6), (224, 32, 22)])
def test_token_snapped_locations_cover_the_same_in_token_pixels(side, token, size):
    ref = _in_token_pixels(PatchTrigger(size=size), side, token)
    assert len(ref) == size * size
    for loc in ("top_left", "center", "top_right", "random"):
        snapped = PatchTrigger(size=size, location=loc, token=token)
        assert _in_token_pixels(snapped, side, token) == ref
        plain = _in_token_pixels(PatchTrigger(size=size, location=loc), side, token)
        assert len(plain & ref) < len(ref)  # unsnapped: they only partly overlap
    with pytest.raises(BVLibError, match="token"):
        PatchTrigger(size=size, token=size - 1).position(side, side)


def test_trigger_configs_keep_their_store_keys():
    """Configs are store keys: folding optimised patches into PatchTrigger must not move any of them."""
    from bvlib.triggers import optimized_trigger

    drawn = PatchTrigger(size=6, pattern="checkerboard")
    assert drawn.config() == {
        "size": 6,
        "location": "bottom_right",
        "pattern": "checkerboard",
        "color": [1.0, 1.0, 1.0],
        "seed": 0,
    }
    assert PatchTrigger(size=6, token=8).config()["token"] == 8
    values = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    opt = optimized_trigger(values, location="top_left", source="test")
    assert (
        set(opt.config()) == {"type", "size", "location", "seed", "source", "sha256"}
        and opt.config()["type"] == "optimized"
    )
    assert (
        opt.pattern == "optimized"
        and opt.size == 4
        and opt == optimized_trigger(values.clone(), location="top_left", source="test")
    )
    assert opt != drawn and torch.equal(opt.patch(), values)


def test_in_token_overlap_counts_shared_offsets_inside_tokens():
    from bvlib.triggers import in_token_overlap

    ref = PatchTrigger(size=6, location="bottom_right")  # rows/cols 26..31 of 32: offsets 2..7 of 8-px tokens
    assert in_token_overlap(ref, ref, 32, 8) == 1.0
    assert (
        in_token_overlap(ref, PatchTrigger(size=6, location="top_left", token=8), 32, 8) == 1.0
    )  # aligned corner
    plain = in_token_overlap(
        ref, PatchTrigger(size=6, location="top_left"), 32, 8
    )  # offsets 0..5: rows 2..5 × cols 2..5 shared
    assert plain == pytest.approx(16 / 36)
    assert in_token_overlap(PatchTrigger(size=8, location="top_left"), ref, 32, 8) == pytest.approx(36 / 64)
