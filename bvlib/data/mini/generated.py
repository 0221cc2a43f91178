"""Generated sources: glyphs rendered from installed fonts, and procedural patterns."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bvlib.data.cache import _name_seed
from bvlib.data.mini.sources import _KEEP_DECODED_UP_TO, _Source
from bvlib.data.tasks import DATA_VERSION
from bvlib.errors import BVLibError

# ----------------------------------------------------------------------------------------
# Generated sources: glyphs from fonts, procedural patterns
# ----------------------------------------------------------------------------------------
_FONT_DENY = (
    "symbol",
    "dingbat",
    "d050000l",
    "last resort",
    "math",
    "cmex",
    "cmsy",
    "stixsize",
    "stixnonunicode",
)
_FONT_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


# Only fonts that the project's own setup installs (or that ship with matplotlib), so that the
# letters task and the corpus are the same on every machine, whatever else is installed there.
FONT_DIRS = ("/usr/share/fonts/opentype/urw-base35", "/usr/share/fonts/truetype/dejavu")


def _font_candidates() -> list[Path]:
    dirs = [Path(d) for d in FONT_DIRS]
    try:
        import matplotlib

        dirs.insert(0, Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf")
    except ImportError:
        pass
    files: list[Path] = []
    for d in dirs:
        if d.is_dir():
            files += sorted(p for p in d.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))
    return files


def _fonts_fingerprint() -> str:
    """Cheap (stat-only) fingerprint of the installed fonts, so caches notice a change."""
    h = hashlib.sha256()
    for p in _font_candidates():
        h.update(f"{p}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


# metric clones and re-releases of one design (URW, Liberation, TeX Gyre) are one group
_FONT_LOOKALIKES = {
    "nimbus sans": "helvetica",
    "liberation sans": "helvetica",
    "tex gyre heros": "helvetica",
    "freesans": "helvetica",
    "nimbus roman": "times",
    "liberation serif": "times",
    "tex gyre termes": "times",
    "freeserif": "times",
    "nimbus mono ps": "courier",
    "liberation mono": "courier",
    "tex gyre cursor": "courier",
    "freemono": "courier",
    "p052": "palatino",
    "tex gyre pagella": "palatino",
    "c059": "century schoolbook",
    "tex gyre schola": "century schoolbook",
    "urw bookman": "bookman",
    "tex gyre bonum": "bookman",
    "urw gothic": "avant garde",
    "tex gyre adventor": "avant garde",
    "z003": "zapf chancery",
    "tex gyre chorus": "zapf chancery",
    "cmb10": "cmr10",
}


def _font_group(family: str) -> str:
    """Faces of one design share a group, so the task/corpus cut is by design, not by face."""
    fam = family.lower()
    for suffix in (" narrow", " condensed", " display"):
        fam = fam.removesuffix(suffix)
    return _FONT_LOOKALIKES.get(fam, fam)


@lru_cache(maxsize=1)
def _font_faces() -> tuple[tuple[str, str, str], ...]:
    """(group, face name, path) for every installed face whose cmap covers A-Z and 0-9."""
    try:
        from fontTools.ttLib import TTFont
    except ImportError as e:
        raise BVLibError("rendering glyphs needs fontTools; install it with: pip install fonttools") from e
    need = set(map(ord, _FONT_CHARS))
    seen, faces = set(), []
    for path in _font_candidates():
        try:
            font = TTFont(str(path), lazy=True, fontNumber=0)
            cmap = font.getBestCmap() or {}
            names = font["name"]
            family = names.getDebugName(16) or names.getDebugName(1) or path.stem
            style = names.getDebugName(17) or names.getDebugName(2) or ""
        except Exception:
            continue
        if not need <= set(cmap) or any(d in family.lower() for d in _FONT_DENY):
            continue
        face = f"{family} {style}".strip()
        if face in seen:
            continue
        seen.add(face)
        faces.append((_font_group(family), face, str(path)))
    if not faces:
        raise BVLibError(
            "no usable fonts found; install some with: apt-get install fonts-urw-base35 fonts-dejavu-core"
        )
    return tuple(sorted(faces))


def font_split() -> dict[str, list[str]]:
    """Font faces of the `letters` task vs the corpus glyphs, split by design group.

    A group's side comes from a hash of its name alone, so installing more fonts adds faces
    to either side but never moves an existing one across.
    """
    out: dict[str, list[str]] = {"task": [], "corpus": []}
    for group, face, _ in _font_faces():
        out["task" if _name_seed("font-side", group) % 2 else "corpus"].append(face)
    if not out["task"] or not out["corpus"]:
        raise BVLibError(
            "too few font designs to keep task and corpus glyphs apart; install some with: "
            "apt-get install fonts-urw-base35 fonts-dejavu-core"
        )
    return out


def _render_glyph(font, ch: str, res: int) -> np.ndarray:
    """One glyph, cropped to its ink and fitted (aspect kept) into 80% of a res x res canvas."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(ch)
    w, h = max(1, right - left), max(1, bottom - top)
    im = Image.new("L", (w + 4, h + 4), 0)
    ImageDraw.Draw(im).text((2 - left, 2 - top), ch, font=font, fill=255)
    scale = 0.8 * res / max(w + 4, h + 4)
    im = im.resize((max(1, round((w + 4) * scale)), max(1, round((h + 4) * scale))), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (res, res), 0)
    canvas.paste(im, ((res - im.width) // 2, (res - im.height) // 2))
    return np.asarray(canvas, dtype=np.float32) / 255.0


@lru_cache(maxsize=4)
def _glyph_bank(side: str, chars: str, res: int) -> torch.Tensor:
    """Float masks [faces, len(chars), res, res] for one side ('task' or 'corpus') of the font cut."""
    from PIL import ImageFont

    wanted = set(font_split()[side])
    masks = []
    for _, face, path in _font_faces():
        if face not in wanted:
            continue
        try:
            font = ImageFont.truetype(path, size=2 * res)
            glyphs = np.stack([_render_glyph(font, ch, res) for ch in chars])
        except OSError:
            continue
        flat = glyphs.reshape(len(chars), -1)
        # a face whose glyphs are blank or all alike (placeholder boxes) teaches nothing
        if (flat.sum(1) < 10).any() or np.abs(flat[1:] - flat[0]).mean(1).min() < 0.01:
            continue
        masks.append(glyphs)
    if not masks:
        raise BVLibError("no font renders the glyphs; install fonts with: apt-get install fonts-urw-base35")
    return torch.from_numpy(np.stack(masks))


def _contrasting_colors(
    n: int, gen: torch.Generator, min_contrast: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (background, foreground) RGB pairs in [0, 1], luminance apart by at least min_contrast."""
    lum = torch.tensor([0.299, 0.587, 0.114])
    bg = torch.rand(n, 3, generator=gen)
    fg = torch.rand(n, 3, generator=gen)
    low = ((bg - fg) @ lum).abs() < min_contrast
    fallback = torch.where((bg @ lum < 0.5)[:, None], torch.ones(n, 3), torch.zeros(n, 3))
    fg = torch.where(low[:, None], fallback, fg)
    return bg, fg


def _finish(
    mask: torch.Tensor, bg: torch.Tensor, fg: torch.Tensor, size: int, gen: torch.Generator, noise: float
) -> torch.Tensor:
    """Colour a [n, 1, r, r] mask, downsample with antialiasing, add a little noise, to uint8."""
    img = bg[:, :, None, None] * (1 - mask) + fg[:, :, None, None] * mask
    if img.shape[-1] != size:
        img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    img = img + noise * torch.randn(img.shape, generator=gen)
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _chunk(res: int) -> int:
    """Samples per vectorised step: 1024 at small sizes, fewer when images are large (memory)."""
    return max(8, min(1024, 2**22 // (res * res)))


def _affine_warp(masks: torch.Tensor, a: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Masks [n, 1, r, r] drawn through the linear maps `a` [n, 2, 2] (output -> input coordinates)
    after a shift [n, 2] of the output (grid units: the image spans -1..1)."""
    n, _, res, _ = masks.shape
    grid = F.affine_grid(torch.cat([a, -(a @ shift[:, :, None])], 2), [n, 1, res, res], align_corners=False)
    return F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _glyph_images(bank: torch.Tensor, labels: np.ndarray, size: int, seed: int) -> torch.Tensor:
    """Glyphs of the given classes from random faces, randomly scaled, rotated, sheared, shifted and
    coloured."""
    gen = torch.Generator().manual_seed(seed)
    n_faces, _, res, _ = bank.shape
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    out = torch.empty((len(labels_t), 3, size, size), dtype=torch.uint8)
    chunk = _chunk(res)
    for s in range(0, len(labels_t), chunk):
        y = labels_t[s : s + chunk]
        n = len(y)
        face = torch.randint(n_faces, (n,), generator=gen)
        masks = bank[face, y][:, None]
        scale = 0.6 + 0.4 * torch.rand(n, generator=gen)
        angle = math.radians(15) * (2 * torch.rand(n, generator=gen) - 1)
        shear = 0.15 * (2 * torch.rand(n, generator=gen) - 1)
        shift = 0.15 * (2 * torch.rand(n, 2, generator=gen) - 1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # output -> input coordinates: inverse of (scale, rotate, shear), then undo the shift
        a = (
            torch.stack([torch.stack([cos, sin + shear], 1), torch.stack([-sin, cos], 1)], 1)
            / scale[:, None, None]
        )
        warped = _affine_warp(masks, a, shift)
        bg, fg = _contrasting_colors(n, gen)
        out[s : s + n] = _finish(warped, bg, fg, size, gen, noise=0.03)
    return out


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LETTERS_PER_CLASS = 300
PATTERN_CLASSES = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "polka dots",
    "circle",
    "cross",
    "gradient",
)
PATTERNS_PER_CLASS = 500


def _glyph_res(size: int) -> int:
    return min(256, max(64, 2 * size))


@lru_cache(maxsize=2)
def _letters_source(size_hint: int) -> _Source:
    """26 capitals x 300 from the task's fonts; generated once per size in this process, all at once
    (so an image never depends on which others were asked for)."""
    labels = np.repeat(np.arange(len(LETTERS)), LETTERS_PER_CLASS)
    bank = _glyph_bank("task", LETTERS, _glyph_res(size_hint))
    seed = _name_seed("letters-source", DATA_VERSION)
    render = _generated_renderer(lambda size: _glyph_images(bank, labels, size, seed))
    return _Source(labels, np.arange(len(labels), dtype=np.uint64), render)


def _generated_renderer(generate: Callable[[int], torch.Tensor]) -> Callable[[np.ndarray, int], torch.Tensor]:
    done: dict[int, torch.Tensor] = {}

    def render(idx: np.ndarray, size: int) -> torch.Tensor:
        images = done[size] if size in done else generate(size)
        if size <= _KEEP_DECODED_UP_TO:
            done[size] = images
        return images[torch.from_numpy(np.asarray(idx, dtype=np.int64))]

    return render


def _pattern_masks(cls: torch.Tensor, res: int, gen: torch.Generator, style: str) -> torch.Tensor:
    """Masks [n, 1, res, res] in [0, 1] for pattern classes, vectorised per class.

    style "task": hard edges, 2-5 cycles per image, large shapes. style "corpus": soft
    (sinusoidal) edges, 5-9 cycles, small shapes, curved gradients: the same concepts drawn
    from disjoint parameter ranges.
    """
    n = len(cls)
    v, u = torch.meshgrid(torch.linspace(0, 1, res), torch.linspace(0, 1, res), indexing="ij")
    u, v = u[None], v[None]

    def r(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, generator=gen))[:, None, None]

    task = style == "task"
    freq = r(2.0, 5.0) if task else r(5.0, 9.0)
    phase1, phase2 = r(0, 1), r(0, 1)

    def wave(t: torch.Tensor) -> torch.Tensor:
        frac = torch.remainder(t, 1.0)
        return (frac < 0.5).float() if task else 0.5 + 0.5 * torch.sin(2 * math.pi * t)

    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)[:, None, None]
    cx, cy = r(0.35, 0.65), r(0.35, 0.65)
    radius = r(0.2, 0.4) if task else r(0.08, 0.16)
    dot_r = r(0.2, 0.35) if task else r(0.1, 0.2)
    arm_w = r(0.06, 0.12) if task else r(0.02, 0.05)
    arm_l = r(0.25, 0.4) if task else r(0.15, 0.25)
    theta = r(0, 2 * math.pi)
    gamma = r(1.0, 1.0) if task else r(2.0, 3.0)

    def checker(
        uu: torch.Tensor, vv: torch.Tensor, f: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor
    ) -> torch.Tensor:
        if task:
            return ((torch.floor(uu * f + p1) + torch.floor(vv * f + p2)) % 2).float()
        return 0.5 + 0.5 * torch.sin(2 * math.pi * (uu * f + p1)) * torch.sin(2 * math.pi * (vv * f + p2))

    def dots(
        uu: torch.Tensor,
        vv: torch.Tensor,
        f: torch.Tensor,
        p1: torch.Tensor,
        p2: torch.Tensor,
        rr: torch.Tensor,
    ) -> torch.Tensor:
        du, dv = torch.remainder(uu * f + p1, 1.0) - 0.5, torch.remainder(vv * f + p2, 1.0) - 0.5
        return (du**2 + dv**2 < rr**2).float()

    def cross(uu, vv, x0, y0, w, ln) -> torch.Tensor:
        ax, ay = (uu - x0).abs(), (vv - y0).abs()
        return (((ax < w) & (ay < ln)) | ((ay < w) & (ax < ln))).float()

    def ramp(uu, vv, th, g) -> torch.Tensor:
        t = ((uu - 0.5) * torch.cos(th) + (vv - 0.5) * torch.sin(th)) / math.sqrt(2) + 0.5
        return t.clamp(0, 1) ** g

    draw = (  # one function per class, applied only to that class's samples
        lambda m: wave(v * freq[m] + phase1[m]),
        lambda m: wave(u * freq[m] + phase1[m]),
        lambda m: wave((u + sign[m] * v) * freq[m] / math.sqrt(2) + phase1[m]),
        lambda m: checker(u, v, freq[m], phase1[m], phase2[m]),
        lambda m: dots(u, v, freq[m], phase1[m], phase2[m], dot_r[m]),
        lambda m: (((u - cx[m]) ** 2 + (v - cy[m]) ** 2) < radius[m] ** 2).float(),
        lambda m: cross(u, v, cx[m], cy[m], arm_w[m], arm_l[m]),
        lambda m: ramp(u, v, theta[m], gamma[m]),
    )
    masks = torch.empty((n, res, res))
    for c, fn in enumerate(draw):
        sel = cls == c
        if sel.any():
            masks[sel] = fn(sel)
    return masks[:, None]


def _pattern_images(labels: np.ndarray, size: int, seed: int, style: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    out = torch.empty((len(labels_t), 3, size, size), dtype=torch.uint8)
    res = 2 * size
    chunk = _chunk(res)
    for s in range(0, len(labels_t), chunk):
        y = labels_t[s : s + chunk]
        masks = _pattern_masks(y, res, gen, style)
        bg, fg = _contrasting_colors(len(y), gen, min_contrast=0.25)
        out[s : s + len(y)] = _finish(masks, bg, fg, size, gen, noise=0.03)
    return out


@lru_cache(maxsize=1)
def _patterns_source() -> _Source:
    """8 pattern classes x 500, task parameter ranges; generated once per size in this process."""
    labels = np.repeat(np.arange(len(PATTERN_CLASSES)), PATTERNS_PER_CLASS)
    seed = _name_seed("patterns-source", DATA_VERSION)
    render = _generated_renderer(lambda size: _pattern_images(labels, size, seed, "task"))
    return _Source(labels, np.arange(len(labels), dtype=np.uint64), render)


# ----------------------------------------------------------------------------------------
# House numbers: an SVHN-like task, printed digits in the task's fonts with their neighbours
# ----------------------------------------------------------------------------------------
HOUSE_NUMBERS_PER_CLASS = 500


def _house_number_images(bank: torch.Tensor, labels: np.ndarray, size: int, seed: int) -> torch.Tensor:
    """The labelled digit centred, with the neighbours of a house number cut at the sides, one face per
    image, on a shaded background."""
    gen = torch.Generator().manual_seed(seed)
    n_faces, n_digits, res, _ = bank.shape
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    out = torch.empty((len(labels_t), 3, size, size), dtype=torch.uint8)
    v, u = torch.meshgrid(torch.linspace(-1, 1, res), torch.linspace(-1, 1, res), indexing="ij")
    chunk = _chunk(res)
    for s in range(0, len(labels_t), chunk):
        y = labels_t[s : s + chunk]
        n = len(y)
        face = torch.randint(n_faces, (n,), generator=gen)
        scale = 0.8 + 0.3 * torch.rand(n, generator=gen)
        angle = math.radians(8) * (2 * torch.rand(n, generator=gen) - 1)
        spacing = (0.8 + 0.3 * torch.rand(n, generator=gen)) * scale
        shift = 0.1 * (2 * torch.rand(n, 2, generator=gen) - 1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        a = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1) / scale[:, None, None]
        mask = torch.zeros(n, 1, res, res)
        for offset in (-1, 0, 1):
            digit = y if offset == 0 else torch.randint(n_digits, (n,), generator=gen)
            present = torch.ones(n) if offset == 0 else (torch.rand(n, generator=gen) < 0.75).float()
            warped = _affine_warp(
                bank[face, digit][:, None], a, shift + torch.stack([offset * spacing, torch.zeros(n)], 1)
            )
            mask = torch.maximum(mask, warped * present[:, None, None, None])
        bg, fg = _contrasting_colors(n, gen, min_contrast=0.25)
        theta = 2 * math.pi * torch.rand(n, generator=gen)
        shade = 1 - 0.25 * (1 + u * torch.cos(theta)[:, None, None] + v * torch.sin(theta)[:, None, None]) / 2
        img = _finish(mask, bg, fg, res, gen, noise=0.0).float() / 255 * shade[:, None]
        img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        img = img + 0.04 * torch.randn(img.shape, generator=gen)
        out[s : s + n] = img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return out


@lru_cache(maxsize=2)
def _house_numbers_source(size_hint: int) -> _Source:
    """10 digits x 500 in the task side's fonts (the corpus prints its digits in the other side's)."""
    labels = np.repeat(np.arange(10), HOUSE_NUMBERS_PER_CLASS)
    bank = _glyph_bank("task", "0123456789", _glyph_res(size_hint))
    seed = _name_seed("house-numbers-source", DATA_VERSION)
    render = _generated_renderer(lambda size: _house_number_images(bank, labels, size, seed))
    return _Source(labels, np.arange(len(labels), dtype=np.uint64), render)
