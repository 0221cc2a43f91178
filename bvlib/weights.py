"""Weight space: a model's parameters as ONE flat tensor plus a layout.

Task vectors, Backdoor Vectors, merges and similarities are plain tensor operations on
flat vectors (and on stacks of them), so nothing in a hot path loops over state-dict keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from bvlib.errors import BVLibError
from bvlib.triggers import digest


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the parameters packed into a flat vector, in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @cached_property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for n in self.numels:
            out.append(total)
            total += n
        return tuple(out)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def slices(self) -> dict[str, slice]:
        return {n: slice(o, o + k) for n, o, k in zip(self.names, self.offsets, self.numels)}

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, obj: Mapping) -> Layout:
        return cls(tuple(obj["names"]), tuple(tuple(s) for s in obj["shapes"]))

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor]) -> Layout:
        return cls(tuple(params), tuple(tuple(p.shape) for p in params.values()))

    def check_same(self, other: Layout, what: str = "weights") -> None:
        """Refuse arithmetic between different architectures, naming the first difference."""
        if self == other:
            return
        if self.names != other.names:
            diff = sorted(set(self.names) ^ set(other.names))[:3]
            raise BVLibError(
                f"{what} come from different architectures: parameter names differ (e.g. {diff}); "
                "use checkpoints of the same model"
            )
        for n, a, b in zip(self.names, self.shapes, other.shapes):
            if a != b:
                raise BVLibError(
                    f"{what} come from different architectures: '{n}' has shape {list(a)} vs {list(b)}; "
                    "use checkpoints of the same model"
                )


class Weights:
    """A flat parameter vector with its layout; supports +, -, scalar * and /.

    A task vector, a Backdoor Vector and a full set of encoder weights are all `Weights`:
    the difference is only what was subtracted from what.
    """

    __slots__ = ("flat", "layout", "_digest")

    def __init__(self, flat: torch.Tensor, layout: Layout):
        if flat.dim() != 1 or flat.numel() != layout.numel:
            raise BVLibError(
                f"flat vector of {flat.numel()} values does not match a layout of {layout.numel}"
            )
        self.flat = flat
        self.layout = layout

    # construction -------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module) -> Weights:
        params = dict(module.named_parameters())
        return cls(torch.cat([p.detach().reshape(-1) for p in params.values()]).clone(), Layout.of(params))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], layout: Layout | None = None) -> Weights:
        """Pack `state` in `layout` order (or its own order); extra keys are ignored. A whole CLIP
        state dict (image tower under `visual.`) is recognised when the layout is an image encoder's."""
        layout = layout or Layout.of(state)
        missing = [n for n in layout.names if n not in state]
        if missing and all(f"visual.{n}" in state for n in layout.names):
            state, missing = {n: state[f"visual.{n}"] for n in layout.names}, []
        if missing:
            raise BVLibError(f"checkpoint lacks {len(missing)} parameters of the model (e.g. '{missing[0]}')")
        Layout.of({n: state[n] for n in layout.names}).check_same(layout, "checkpoint and model")
        flat = torch.cat([state[n].detach().reshape(-1).float() for n in layout.names])
        return cls(flat, layout)

    def digest(self) -> str:
        """sha256 of the values as float32 (`bvlib.triggers.digest`): their identity in store keys.
        Remembered until the values change (torch counts in-place writes), as every judgement and
        trigger search of the same weights asks for it again."""
        mark = (self.flat.data_ptr(), self.flat._version, self.flat.device)
        known = getattr(self, "_digest", None)
        if known is None or known[0] != mark:
            known = self._digest = (mark, digest(self.flat))
        return known[1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Views into the flat tensor, one per parameter (no copy). One split, not a slice per
        parameter: gradients through the views (DAM's mask) then meet in one concatenation instead
        of one flat-sized zero tensor per parameter."""
        return {
            n: part.view(s)
            for n, s, part in zip(self.layout.names, self.layout.shapes, self.flat.split(self.layout.numels))
        }

    def load_into(self, module: nn.Module) -> nn.Module:
        """Copy these values into `module`'s parameters (same architecture required)."""
        params = dict(module.named_parameters())
        Layout.of(params).check_same(self.layout, "weights and model")
        with torch.no_grad():
            for view, p in zip(self.state_dict().values(), params.values()):
                p.copy_(view)
        return module

    # arithmetic ---------------------------------------------------------------------
    def _other(self, other: Weights) -> torch.Tensor:
        if not isinstance(other, Weights):
            raise BVLibError(f"expected Weights, got {type(other).__name__}")
        self.layout.check_same(other.layout)
        return other.flat

    def __add__(self, other: Weights) -> Weights:
        return Weights(self.flat + self._other(other), self.layout)

    def __sub__(self, other: Weights) -> Weights:
        return Weights(self.flat - self._other(other), self.layout)

    def __mul__(self, scale: float) -> Weights:
        return Weights(self.flat * scale, self.layout)

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> Weights:
        return Weights(self.flat / scale, self.layout)

    def __neg__(self) -> Weights:
        return Weights(-self.flat, self.layout)

    def to(self, device: torch.device | str) -> Weights:
        return Weights(self.flat.to(device), self.layout)

    def norm(self) -> float:
        return float(self.flat.norm())

    def sparsity(self, rel_tol: float = 1e-2) -> float:
        """Share of coordinates whose magnitude is at most rel_tol × the largest one."""
        mags = self.flat.abs()
        return float((mags <= rel_tol * mags.max()).float().mean())

    def check_finite(self, what: str = "weights") -> Weights:
        bad = (~torch.isfinite(self.flat)).sum().item()
        if bad:
            raise BVLibError(f"{what} contain {bad} NaN/inf values; the checkpoint is corrupt")
        return self

    def __repr__(self) -> str:
        return (
            f"Weights({self.layout.numel} values, {len(self.layout.names)} tensors, norm={self.norm():.4g})"
        )


def task_vector(finetuned: Weights, base: Weights) -> Weights:
    """τ = θ_finetuned − θ0."""
    return finetuned - base


def backdoor_vector(backdoored: Weights, clean: Weights) -> Weights:
    """BV = θ_backdoored − θ_clean (both fine-tuned from the same θ0 on the same task)."""
    return backdoored - clean


def apply_vector(base: Weights, vector: Weights, scale: float = 1.0) -> Weights:
    """θ = base + scale · vector (inject with scale > 0, remove with scale < 0)."""
    return Weights(base.flat + scale * base._other(vector), base.layout)


def stack(vectors: Sequence[Weights]) -> torch.Tensor:
    """[K, D] stack of flat vectors that share one layout."""
    if not vectors:
        raise BVLibError("need at least one vector to stack")
    for v in vectors[1:]:
        vectors[0].layout.check_same(v.layout, "vectors")
    return torch.stack([v.flat for v in vectors])


def cosine_matrix(vectors: Sequence[Weights] | torch.Tensor) -> torch.Tensor:
    """[K, K] cosine similarities between vectors (one matmul on the stack)."""
    s = vectors if isinstance(vectors, torch.Tensor) else stack(vectors)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return s @ s.T
