"""Intervals and verdict words: how a chapter says whether a claim of the paper holds.

Every number a claim rests on is a rate measured on test images (an ASR, a clean accuracy) in one
*replicate* (an attacked task × seed). A claim's statistic is a function of those rates across its
replicates, e.g. the mean over replicates of (undefended ASR − defended ASR). Its 95% interval comes
from a two-level bootstrap: replicates are resampled with replacement, and inside each one every
rate k/n is redrawn as Binomial(n, k/n)/n, which is the bootstrap over that rate's n test images.

    units = [{"none": Rate(0.8, 900), "ibvs": Rate(0.5, 900)} for ...]   # one dict per replicate
    est, lo, hi = interval(units, lambda x: (x["none"] - x["ibvs"]).mean(-1))
    verdict(lo, hi, threshold=0.05)  # "holds": the whole interval above 0.05

Two rates of one replicate are redrawn independently even where they were measured on the same
images (paired), which makes an interval of their difference wider, never narrower: conservative.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bvlib.errors import BVLibError

VERDICTS = ("holds", "fails", "inconclusive")
MIN_REPLICATES = 3  # fewer replicates than this and a claim is inconclusive whatever its interval


@dataclass(frozen=True)
class Rate:
    """A proportion measured on `n` images (an ASR or a clean accuracy). An interpolated rate (read
    off a curve between two measured points) carries the smaller n of the two."""

    value: float
    n: int

    def __post_init__(self):
        if not (0.0 <= self.value <= 1.0) or self.n < 1:
            raise BVLibError(f"a rate needs a value in [0, 1] and n >= 1, got {self.value!r} on {self.n!r}")


def interval(
    units: Sequence[Mapping[str, Rate | float]],
    statistic: Callable[[Mapping[str, np.ndarray]], np.ndarray],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high): `statistic` of the measured rates and its bootstrap percentile interval.

    `units` holds one {name: Rate} per replicate, all with the same names; a plain number (a cosine)
    is exact within its replicate and varies only as replicates are resampled. `statistic` gets
    {name: array [..., U]} (U replicates) and returns the statistic per leading index, for example
    `lambda x: (x["none"] - x["ibvs"]).mean(-1)`.
    """
    if not units:
        raise BVLibError("need at least one replicate to compute an interval")
    names = list(units[0])
    if any(list(u) != names for u in units):
        raise BVLibError("every replicate must measure the same rates")
    values = np.array([[getattr(u[k], "value", u[k]) for k in names] for u in units], dtype=float)  # [U, K]
    ns = np.array([[getattr(u[k], "n", 0) for k in names] for u in units])  # 0: exact

    def stat(x: np.ndarray) -> np.ndarray:  # x: [..., U, K]
        return np.asarray(statistic({k: x[..., i] for i, k in enumerate(names)}), dtype=float)

    estimate = float(stat(values[None])[0])
    rng = np.random.default_rng(seed)
    u = len(units)
    idx = rng.integers(0, u, size=(n_boot, u)) if u > 1 else np.zeros((n_boot, 1), dtype=int)
    n, v = ns[idx], values[idx]
    draws = np.where(n > 0, rng.binomial(n, np.clip(v, 0, 1)) / np.maximum(n, 1), v)  # [B, U, K]
    boot = stat(draws)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return estimate, float(lo), float(hi)


def verdict(low: float, high: float, threshold: float = 0.0, *, replicates: int = MIN_REPLICATES) -> str:
    """ "holds" when the interval lies entirely above `threshold`, "fails" when entirely below, else
    "inconclusive"; inconclusive too with fewer than `MIN_REPLICATES` replicates behind it. State a
    claim so that its side is "above" (negate the statistic for a "lower than" claim)."""
    if replicates < MIN_REPLICATES:
        return "inconclusive"
    if low > threshold:
        return "holds"
    if high < threshold:
        return "fails"
    return "inconclusive"


def describe(estimate: float, low: float, high: float, *, percent: bool = True) -> str:
    """'+12.3 [+4.0, +20.1]' in points (percent) or plain numbers."""
    f = (lambda v: f"{100 * v:+.1f}") if percent else (lambda v: f"{v:+.3f}")
    return f"{f(estimate)} [{f(low)}, {f(high)}]"
