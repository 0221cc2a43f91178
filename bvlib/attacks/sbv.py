"""The Sparse Backdoor Vector (the paper's attack): the coordinates on which several BVs agree in sign,
summed (or rescaled, or averaged), so that merging's sign election works for the backdoor."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bvlib.errors import BVLibError
from bvlib.merging import _as_stack, _real, _streamed, fused
from bvlib.weights import Weights

SBV_COMBINE = ("sum", "rescale", "mean")


def sparse_backdoor_vector(
    bvs: Sequence[Weights] | torch.Tensor, *, agreement: float = 1.0, combine: str = "sum"
) -> Weights | torch.Tensor:
    """Sparse Backdoor Vector (the paper's attack): a sign-consistent merge of several BVs of one attack.

    Several BVs of one attack (other seeds, other patch locations) share the backdoor's direction but
    not their noise. A coordinate is kept when at least ⌈agreement · K⌉ of the K BVs have the same
    non-zero sign (agreement=1.0: all of them); the others are 0. A kept coordinate gets
    - combine="sum" (default): the sum of the K values, so agreeing coordinates add up as they do in a
      task-arithmetic merge: the paper's "leverage merging to improve backdoor effectiveness";
    - combine="rescale": the same, rescaled to the mean norm of the K BVs (a vector as long as one BV,
      to compare at equal norm);
    - combine="mean": their mean, a sparse subset of the mean BV and so *shorter* than one BV
      (kept for comparison; it is no stronger than the BVs it is made of).
    The attacker injects θ_clean + β·SBV; β is the attacker's knob. A single BV comes back unchanged.
    """
    s, layout, as_weights = _as_stack(bvs, None, "BVs")
    agreement = _real("agreement", agreement, 0.5, 1, lo_open=True)
    if combine not in SBV_COMBINE:
        raise BVLibError(f"combine must be one of: {', '.join(SBV_COMBINE)}; got {combine!r}")
    K = s.shape[0]
    need = math.ceil(agreement * K - 1e-9)

    out = _streamed(s, lambda x: _agreeing_sum(x, need))
    if K > 1 and combine == "mean":
        out.div_(K)
    elif K > 1 and combine == "rescale":
        target = s.float().norm(dim=1).mean()
        out.mul_((target / out.float().norm().clamp_min(1e-30)).to(out.dtype))
    return Weights(out, layout) if as_weights else out


@fused
def _agreeing_sum(x: torch.Tensor, need: int) -> torch.Tensor:
    """Σ τ where at least `need` rows share one non-zero sign, else 0 (fused on GPU)."""
    agreeing = torch.maximum((x > 0).sum(0), (x < 0).sum(0))
    return x.sum(0) * (agreeing >= need)
