"""Triggers, applied to float image batches in [0, 1] on whatever device they live on: one type,
`PatchTrigger`, drawn from a pattern (solid, checkerboard, noise) or holding optimised free pixels."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from bvlib.errors import BVLibError

LOCATIONS = ("bottom_right", "bottom_left", "top_right", "top_left", "center", "random")
PATTERNS = ("solid", "checkerboard", "noise", "optimized")


def check_location(location: str) -> None:
    if location not in LOCATIONS:
        raise BVLibError(f"unknown trigger location '{location}'; choose one of: {', '.join(LOCATIONS)}")


def check_fits(size: int, height: int, width: int) -> None:
    """Refuse a square patch of `size` px that does not fit a height x width image."""
    if size > min(height, width):
        raise BVLibError(
            f"a {size}px trigger does not fit a {height}x{width} image; use size <= {min(height, width)}"
        )


def _snap(pos: int, size: int, extent: int, token: int) -> int:
    """`pos` moved to the nearest place whose offset inside its `token`-px token equals the offset of a
    patch flush with the far edge (bottom / right), without leaving the image."""
    offset = (extent - size) % token
    n = min(max(round((pos - offset) / token), 0), (extent - size) // token)
    return n * token + offset


def patch_position(
    size: int, location: str, height: int, width: int, seed: int = 0, token: int = 0
) -> tuple[int, int]:
    """Top-left corner (row, column) of a square patch at a named location.

    "random" is one position drawn from `seed`, the same for every image. With `token` > 0 (a ViT's
    patch size) the position is snapped so that the patch sits at the same offset inside its token as
    a bottom-right patch does: then triggers at two locations cover the same pixels of their tokens.
    """
    check_location(location)
    check_fits(size, height, width)
    if isinstance(token, bool) or not isinstance(token, int) or token < 0 or (token and size > token):
        raise BVLibError(
            f"token must be 0 (no snapping) or a patch size of at least the trigger's {size} px, got "
            f"{token!r}"
        )
    s = size
    if location == "random":
        g = torch.Generator().manual_seed(seed)
        r, c = (
            int(torch.randint(0, height - s + 1, (1,), generator=g)),
            int(torch.randint(0, width - s + 1, (1,), generator=g)),
        )
    else:
        rows = {"top": 0, "bottom": height - s, "center": (height - s) // 2}
        cols = {"left": 0, "right": width - s, "center": (width - s) // 2}
        r, c = (
            (rows["center"], cols["center"])
            if location == "center"
            else (rows[location.split("_")[0]], cols[location.split("_")[1]])
        )
    if token:
        r, c = _snap(r, s, height, token), _snap(c, s, width, token)
    return r, c


def paste_patch(images: torch.Tensor, patch: torch.Tensor, position: tuple[int, int]) -> torch.Tensor:
    """A copy of a float batch [B, 3, H, W] with `patch` [3, s, s] pasted at (row, column).

    Differentiable in `patch` (trigger optimisation backpropagates through it).
    """
    if not images.is_floating_point():
        raise BVLibError("triggers apply to float images in [0, 1]; convert uint8 with images.float() / 255")
    r, c = position
    s = patch.shape[-1]
    out = images.clone()
    out[..., r : r + s, c : c + s] = patch.to(images.dtype)
    return out


def digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's float32 bytes: the identity of optimised patches and of weights in store keys."""
    return hashlib.sha256(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class PatchTrigger:
    """A square patch pasted onto every image: the one trigger type.

    pattern "solid" / "checkerboard" (alternating `color` and its complement) / "noise" (seeded RGB)
    draws the patch; pattern "optimized" holds free pixel `values` [3, s, s] in [0, 1], what trigger
    optimisation finds (`optimized_trigger`, `bvlib.attacks.inherent`): its identity is `sha256`, the
    digest of the pixels, and `source` says where it came from (e.g. "inherent:mnist:target0").
    location "random" is one position drawn from `seed` (the same for every image), so that attacks
    "at different patch locations" are different seeds of it. `token` > 0 snaps the position to a
    bottom-right patch's offset inside `token`-px ViT tokens (see `patch_position`).
    """

    size: int = 4
    location: str = "bottom_right"
    pattern: str = "solid"
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    seed: int = 0
    token: int = 0
    values: torch.Tensor | None = field(default=None, compare=False, hash=False, repr=False)
    source: str = ""
    sha256: str = ""

    def __post_init__(self):
        check_location(self.location)
        if self.pattern not in PATTERNS:
            raise BVLibError(
                f"unknown trigger pattern '{self.pattern}'; choose one of: {', '.join(PATTERNS)}"
            )
        if self.pattern == "optimized" or self.values is not None:
            if self.values is None:
                raise BVLibError("an optimized trigger needs its pixel values")
            v = torch.as_tensor(self.values)
            if v.dim() != 3 or v.shape[0] != 3 or v.shape[1] != v.shape[2] or v.shape[1] < 1:
                raise BVLibError(f"an optimised trigger is a [3, s, s] patch, got shape {list(v.shape)}")
            v = v.detach().to("cpu", torch.float32).contiguous()
            if not torch.isfinite(v).all() or v.min() < 0 or v.max() > 1:
                raise BVLibError("an optimised trigger's values must be finite and in [0, 1]")
            for name, value in (
                ("values", v),
                ("pattern", "optimized"),
                ("size", int(v.shape[-1])),
                ("sha256", digest(v)),
            ):
                object.__setattr__(self, name, value)
            return
        if int(self.size) != self.size or self.size < 1:
            raise BVLibError(f"trigger size must be a positive integer, got {self.size}")
        if len(self.color) != 3 or not all(0.0 <= c <= 1.0 for c in self.color):
            raise BVLibError(f"trigger color must be three values in [0, 1], got {self.color}")
        object.__setattr__(self, "color", tuple(float(c) for c in self.color))

    def config(self) -> dict:
        """JSON-able identity (store keys): the drawing's parameters, or the digest of free pixels."""
        if self.pattern == "optimized":
            return {
                "type": "optimized",
                "size": self.size,
                "location": self.location,
                "seed": self.seed,
                "source": self.source,
                "sha256": self.sha256,
            }
        cfg = {
            "size": self.size,
            "location": self.location,
            "pattern": self.pattern,
            "color": list(self.color),
            "seed": self.seed,
        }
        if self.token:  # unsnapped triggers keep the store keys they had
            cfg["token"] = self.token
        return cfg

    def check_fits(self, height: int, width: int) -> None:
        check_fits(self.size, height, width)

    def position(self, height: int, width: int) -> tuple[int, int]:
        """Top-left corner (row, column) of the patch."""
        return patch_position(self.size, self.location, height, width, self.seed, self.token)

    def patch(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The [3, size, size] patch in [0, 1]."""
        if self.pattern == "optimized":
            return self.values.to(device)
        s = self.size
        color = torch.tensor(self.color, device=device).view(3, 1, 1)
        if self.pattern == "solid":
            return color.expand(3, s, s).clone()
        if self.pattern == "checkerboard":
            idx = torch.arange(s, device=device)
            board = ((idx.view(-1, 1) + idx.view(1, -1)) % 2 == 0).float()
            return board * color + (1 - board) * (1 - color)
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(3, s, s, generator=g).to(device)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """A triggered copy of a float batch [B, 3, H, W] in [0, 1]."""
        return paste_patch(images, self.patch(images.device), self.position(*images.shape[-2:]))


def optimized_trigger(
    values: torch.Tensor, location: str = "bottom_right", seed: int = 0, source: str = ""
) -> PatchTrigger:
    """A trigger of free pixel values [3, s, s] in [0, 1] (what trigger optimisation finds)."""
    return PatchTrigger(pattern="optimized", values=values, location=location, seed=seed, source=source)


Trigger = PatchTrigger
"""The trigger type (kept as a name for annotations)."""


def in_token_overlap(a: PatchTrigger, b: PatchTrigger, image_size: int, token: int) -> float:
    """Share of trigger `a`'s in-token pixel positions that trigger `b` covers too.

    A ViT sees a patch through the `token`-px tokens it falls in; two triggers at different places
    look alike to the encoder where they cover the same (row, column) offsets inside their tokens.
    1.0: every offset `a` covers, `b` covers too (e.g. two corners aligned to one offset).
    """

    def offsets(t: PatchTrigger) -> set[tuple[int, int]]:
        r, c = t.position(image_size, image_size)
        return {((r + i) % token, (c + j) % token) for i in range(t.size) for j in range(t.size)}

    if isinstance(token, bool) or not isinstance(token, int) or token < 1:
        raise BVLibError(f"token must be a patch size of at least 1 px, got {token!r}")
    mine = offsets(a)
    return len(mine & offsets(b)) / len(mine)
