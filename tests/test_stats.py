"""Intervals and verdict words (bvlib.stats), and reading a β sweep at equal cost (bvlib.scenes)."""

import pytest

from bvlib import BVLibError
from bvlib.scenes import at_cost, matched_cost
from bvlib.stats import Rate, interval, verdict


def diff(x):
    return (x["a"] - x["b"]).mean(-1)


def test_the_interval_holds_the_estimate_and_narrows_with_more_images_and_replicates():
    def width(n_images, n_units, spread=0.0):
        units = [
            {"a": Rate(min(1.0, 0.6 + spread * (i % 3 - 1)), n_images), "b": Rate(0.5, n_images)}
            for i in range(n_units)
        ]
        est, lo, hi = interval(units, diff, seed=1)
        assert lo <= est <= hi
        return hi - lo

    assert width(1000, 3) < 0.6 * width(100, 3)  # more test images: narrower (about 1/sqrt(10))
    assert width(400, 12, 0.1) < width(400, 3, 0.1)  # more replicates of a varying effect: narrower
    assert width(400, 3, 0.1) > width(400, 3, 0.0)  # replicates that disagree widen it
    est, lo, hi = interval([{"a": Rate(0.8, 500), "b": Rate(0.5, 500)}] * 3, diff)
    assert est == pytest.approx(0.3) and 0.22 < lo < 0.3 < hi < 0.38
    assert interval([{"a": Rate(0.8, 500), "b": Rate(0.5, 500)}] * 3, diff, seed=4) == interval(
        [{"a": Rate(0.8, 500), "b": Rate(0.5, 500)}] * 3, diff, seed=4
    )  # seeded


def test_exact_numbers_vary_only_across_replicates():
    same = [{"a": 0.9, "b": 0.2}] * 4
    assert interval(same, diff)[1:] == pytest.approx(
        (0.7, 0.7)
    )  # one cosine per replicate, all equal: no width
    est, lo, hi = interval([{"a": 0.9, "b": 0.2}, {"a": 0.5, "b": 0.2}, {"a": 0.7, "b": 0.2}], diff)
    assert est == pytest.approx(0.5) and lo < est < hi and lo >= 0.3 - 1e-9 and hi <= 0.7 + 1e-9


def test_verdict_words():
    assert verdict(0.02, 0.10, 0.0) == "holds"
    assert verdict(-0.10, -0.02, 0.0) == "fails"
    assert verdict(-0.02, 0.10, 0.0) == "inconclusive"
    assert verdict(0.06, 0.10, 0.05) == "holds" and verdict(0.01, 0.04, 0.05) == "fails"
    assert verdict(0.2, 0.3, 0.0, replicates=2) == "inconclusive"  # too few replicates to say either way


def test_bad_rates_and_units_are_one_line_errors():
    with pytest.raises(BVLibError, match="rate"):
        Rate(1.2, 10)
    with pytest.raises(BVLibError, match="rate"):
        Rate(0.5, 0)
    with pytest.raises(BVLibError, match="at least one"):
        interval([], diff)
    with pytest.raises(BVLibError, match="same rates"):
        interval([{"a": Rate(0.5, 9), "b": Rate(0.5, 9)}, {"a": Rate(0.5, 9)}], diff)


def test_a_sweep_is_read_at_equal_cost_by_interpolation():
    rows = [
        {"beta": b, "cost": c, "ASR TA": a}
        for b, c, a in [(0, 0.0, 0.1), (1, 0.01, 0.3), (2, 0.005, 0.6), (3, 0.03, 0.9)]
    ]
    # the cost curve is made non-decreasing in β (β = 2 is not cheaper than β = 1): 0.02 lies between β 2 and
    # 3
    assert at_cost(rows, 0.02, "ASR TA") == pytest.approx(0.6 + 0.3 * (0.02 - 0.01) / (0.03 - 0.01))
    assert at_cost(rows, 0.005, "ASR TA") == pytest.approx(0.2)
    assert at_cost(rows, 0.05, "ASR TA") is None  # never that costly
    cheap = [{"beta": 0, "cost": 0.0}, {"beta": 1, "cost": 0.012}]
    assert matched_cost(rows, cheap, 0.02) == pytest.approx(0.012) and matched_cost(rows, rows, 0.02) == 0.02
    assert matched_cost(rows, [{"beta": 0, "cost": 0.0}, {"beta": 1, "cost": -0.01}], 0.02) is None
