"""The pretraining corpus of the mini CLIP: the tasks' concepts with captions, never their evaluation
images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bvlib.data.cache import _hash_rows, _name_seed, cached_data
from bvlib.data.mini.generated import (
    _FONT_CHARS,
    LETTERS,
    PATTERN_CLASSES,
    _fonts_fingerprint,
    _glyph_bank,
    _glyph_images,
    _glyph_res,
    _pattern_images,
)
from bvlib.data.mini.registry import ANIMAL_CLASSES, FASHION_CLASSES, _check_args, _source_partition
from bvlib.data.mini.sources import (
    CLIPART_CLASSES,
    CLIPART_CORPUS_CAP,
    CLIPART_CORPUS_CATEGORIES,
    _clipart_corpus_source,
    _Source,
)
from bvlib.errors import BVLibError

# ----------------------------------------------------------------------------------------
# The pretraining corpus
# ----------------------------------------------------------------------------------------
GENERIC_CAPTIONS = (
    "an image.",
    "a picture of something.",
    "a photo.",
    "an illustration.",
    "a small picture.",
    "something.",
    "a thumbnail.",
    "a low resolution image.",
)
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# "{}" is the concept's name, "{a}" the name with "a"/"an", "{w}" a digit's word
_CAPTIONS: dict[str, tuple[str, ...]] = {
    "digits": (
        "the digit {}.",
        "the number {}.",
        "a printed {}.",
        'the numeral "{}".',
        "the number {w}.",
        "a typed digit {w}.",
    ),
    "letters": (
        "the letter {}.",
        "a capital {}.",
        'the character "{}".',
        "the letter {} in a font.",
        "a printed letter {}.",
    ),
    "lowercase": (
        "the letter {}.",
        "a lowercase {}.",
        'the character "{}".',
        "a small letter {} in a font.",
        "a printed letter {}.",
    ),
    "fashion": (
        "a photo of {a}.",
        "a grey photo of {a}.",
        "{a}.",
        "a picture of {a}.",
        "{a} on a dark background.",
    ),
    "animals": ("a silhouette of {a}.", "the shape of {a}.", "{a}.", "a white {} on black."),
    "clipart": ("clip art of {a}.", "a drawing of {a}.", "a cartoon {}.", "{a}.", "an icon of {a}."),
    "patterns": ("{a}.", "an image of {a}.", "a picture with {a}.", "a texture with {a}."),
}
_PATTERN_PHRASES = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "a checkerboard",
    "polka dots",
    "a circle",
    "a cross",
    "a colour gradient",
)


def _article(name: str) -> str:
    """Name with its indefinite article ("an apple"); plurals and phrases with an article stay as they are."""
    if name.startswith(("a ", "an ")) or name.endswith(("stripes", "dots", "trousers")):
        return name
    return ("an " if name[0].lower() in "aeiou" else "a ") + name


@dataclass(frozen=True)
class CorpusMix:
    """How many images of each kind go into the pretraining corpus (see `pretraining_corpus`)."""

    n_digits: int = 5000
    n_letters: int = 6500
    n_fashion: int = 2000
    n_animals: int = 1000
    n_clipart_task: int = 200
    n_clipart_other: int = 2000
    n_patterns: int = 4000
    generic_caption_fraction: float = 0.2
    unnamed: tuple[
        str, ...
    ] = ()  # kinds shown with captions that never name the class ("letters": glyphs, no letter names)
    n_lowercase: int = (
        0  # lowercase a-z with their names: the letters' names known, not their capitals' shapes
    )

    def config(self) -> dict:
        out = dict(self.__dict__)
        for key in ("unnamed", "n_lowercase"):  # keys of corpora made before these options stay the same
            if not out[key]:
                out.pop(key)
        if self.unnamed:
            out["unnamed"] = list(self.unnamed)
        return out


def _pool_pick(name: str, n: int, seed: int) -> tuple[_Source, np.ndarray, np.ndarray]:
    """(source, n random pool indices, task-side indices) of a task's held-out pretraining pool."""
    src, task_idx, pool = _source_partition(name, 0)
    rng = np.random.default_rng([seed, _name_seed("corpus-pool", name)])
    return src, np.sort(rng.permutation(pool)[:n]), task_idx


_UNNAMED_CAPTIONS = {
    "letters": (
        "a printed character.",
        "a character in a font.",
        "a glyph.",
        "a typed symbol.",
        "a letter of the alphabet.",
    ),
    "fashion": (
        "a grey photo of a garment.",
        "a piece of clothing.",
        "a product photo.",
        "something to wear.",
        "an item of fashion on a dark background.",
    ),
}


def _captions(
    kind: str, names: Sequence[str], labels: np.ndarray, rng: np.random.Generator, unnamed: bool = False
) -> list[str]:
    if unnamed:  # the concept is seen, its class names never
        pool = _UNNAMED_CAPTIONS.get(kind, GENERIC_CAPTIONS)
        return [pool[i] for i in rng.integers(len(pool), size=len(labels))]
    templates = _CAPTIONS[kind]
    choice = rng.integers(len(templates), size=len(labels))
    out = []
    for t, y in zip(choice, labels, strict=True):
        name = names[y]
        out.append(
            templates[t].format(name, a=_article(name), w=_NUMBER_WORDS[y] if kind == "digits" else "")
        )
    return out


def _balanced_labels(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % n_classes)


def _build_corpus(image_size: int, mix: CorpusMix, seed: int) -> tuple[torch.Tensor, list[str]]:
    from tqdm import tqdm

    rng = np.random.default_rng([seed, _name_seed("corpus")])
    images: list[torch.Tensor] = []
    captions: list[str] = []
    forbidden: list[np.ndarray] = []  # content hashes of every task-side image of a source the corpus shares

    def from_pool(name: str, n: int, names: Sequence[str]) -> np.ndarray:
        src, pick, task_idx = _pool_pick(name, n, seed)
        forbidden.append(_hash_rows(src.render(task_idx, image_size)))
        images.append(src.render(pick, image_size))
        captions.extend(_captions(name, names, src.labels[pick], rng, unnamed=name in mix.unnamed))
        return src.keys[task_idx]

    for step in tqdm(
        ("glyphs", "fashion", "animals", "clipart", "patterns"),
        desc="building pretraining corpus",
        leave=False,
    ):
        if step == "glyphs" and mix.n_digits + mix.n_letters > 0:
            bank = _glyph_bank("corpus", _FONT_CHARS, _glyph_res(image_size))  # A-Z then 0-9
            glyph_sets = [
                ("digits", "0123456789", bank[:, 26:], mix.n_digits),
                ("letters", LETTERS, bank[:, :26], mix.n_letters),
            ]
            if mix.n_lowercase:
                lower = LETTERS.lower()
                glyph_sets.append(
                    (
                        "lowercase",
                        lower,
                        _glyph_bank("corpus", lower, _glyph_res(image_size)),
                        mix.n_lowercase,
                    )
                )
            for kind, chars, sub, n in glyph_sets:
                y = _balanced_labels(n, len(chars), rng)
                images.append(_glyph_images(sub, y, image_size, int(rng.integers(2**31))))
                captions.extend(_captions(kind, list(chars), y, rng, unnamed=kind in mix.unnamed))
        elif step == "fashion" and mix.n_fashion > 0:
            from_pool("fashion", mix.n_fashion, FASHION_CLASSES)
        elif step == "animals" and mix.n_animals > 0:
            from_pool("animals", mix.n_animals, ANIMAL_CLASSES)
        elif step == "clipart" and mix.n_clipart_task + mix.n_clipart_other > 0:
            task_keys = from_pool("clipart", mix.n_clipart_task, [c for _, c in CLIPART_CLASSES])
            other = _clipart_corpus_source()
            order = rng.permutation(np.flatnonzero(~np.isin(other.keys, task_keys)))  # no file the task uses
            keep = np.concatenate(
                [
                    order[other.labels[order] == c][:CLIPART_CORPUS_CAP]
                    for c in range(len(CLIPART_CORPUS_CATEGORIES))
                ]
            )
            keep = np.sort(rng.permutation(keep)[: mix.n_clipart_other])
            images.append(other.render(keep, image_size))
            captions.extend(
                _captions("clipart", [c for _, c in CLIPART_CORPUS_CATEGORIES], other.labels[keep], rng)
            )
        elif step == "patterns" and mix.n_patterns > 0:
            y = _balanced_labels(mix.n_patterns, len(PATTERN_CLASSES), rng)
            images.append(_pattern_images(y, image_size, int(rng.integers(2**31)), "corpus"))
            captions.extend(_captions("patterns", _PATTERN_PHRASES, y, rng))

    all_images = (
        torch.cat(images) if images else torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
    )
    # distinct files can still render identically at this size: drop any image equal to a task-side one
    ok = (
        ~np.isin(_hash_rows(all_images), np.concatenate(forbidden))
        if forbidden
        else np.ones(len(all_images), dtype=bool)
    )
    all_images, captions = (
        all_images[torch.from_numpy(ok)],
        [c for c, k in zip(captions, ok, strict=True) if k],
    )
    n_generic = round(mix.generic_caption_fraction * len(captions))
    for i, g in zip(
        rng.permutation(len(captions))[:n_generic],
        rng.integers(len(GENERIC_CAPTIONS), size=n_generic),
        strict=True,
    ):
        captions[i] = GENERIC_CAPTIONS[g]
    order = rng.permutation(len(captions))
    return all_images[torch.from_numpy(order)].contiguous(), [captions[i] for i in order]


def pretraining_corpus(
    *,
    image_size: int = 32,
    n_per_source: int | None = None,
    seed: int = 0,
    n_digits: int = CorpusMix.n_digits,
    n_letters: int = CorpusMix.n_letters,
    n_fashion: int = CorpusMix.n_fashion,
    n_animals: int = CorpusMix.n_animals,
    n_clipart_task: int = CorpusMix.n_clipart_task,
    n_clipart_other: int = CorpusMix.n_clipart_other,
    n_patterns: int = CorpusMix.n_patterns,
    generic_caption_fraction: float = CorpusMix.generic_caption_fraction,
    unnamed: Sequence[str] = (),
    n_lowercase: int = CorpusMix.n_lowercase,
) -> tuple[torch.Tensor, list[str]]:
    """Captioned images (uint8 [N, 3, H, W], captions) to pretrain the mini CLIP, in a seeded shuffled order.

    The corpus shows the tasks' *concepts* but never their evaluation images, so the base
    model is above chance zero-shot yet well below fine-tuned accuracy (the gap task
    vectors are made of). What goes in (each knob is a count; `n_per_source` caps all):

    - n_digits, n_letters: digits 0-9 and capitals A-Z rendered from the font families the
      `letters` task does NOT use (`font_split()`), randomly scaled/rotated/coloured;
      captions like "the digit 7", "the number seven", "a capital K". No handwriting.
    - n_fashion, n_animals: images from the fashion / animals pretraining pools, the part
      of each source that `_source_partition` keeps out of every split of that task.
    - n_clipart_task: clip-art of the task's categories from its pool (~230 there, mostly stars and flags).
    - n_clipart_other: clip-art from 41 other openclipart categories (at most 100 each, ~2000 in all).
    - n_patterns: the `patterns` concepts drawn with disjoint parameters (soft edges,
      finer frequencies, small shapes, curved gradients).
    - generic_caption_fraction: the share whose caption is replaced by a generic one
      ("an image.", "a picture of something."), which weakens zero-shot transfer.
    - n_lowercase: lowercase a-z (corpus fonts) captioned with their names ("the letter q"; the
      tokenizer lowercases, so these are the `letters` task's class names), capitals unseen.
    - unnamed: kinds ("letters", "fashion") whose captions never name the class ("a printed
      character.", "a piece of clothing."): the base learns to see them, as CLIP saw most of TA8's
      images, yet cannot name them.
    Nothing is drawn from mnist, digits or textiles. Images identical (at this size) to any
    task-side image of a shared source are dropped.
    """
    counts = {
        "n_digits": n_digits,
        "n_letters": n_letters,
        "n_fashion": n_fashion,
        "n_animals": n_animals,
        "n_clipart_task": n_clipart_task,
        "n_clipart_other": n_clipart_other,
        "n_patterns": n_patterns,
        "n_lowercase": n_lowercase,
    }
    _check_args(image_size, {"n_per_source": n_per_source})
    for k, v in counts.items():
        if not isinstance(v, int) or v < 0:
            raise BVLibError(f"{k} must be a non-negative integer, got {v!r}")
    if not 0.0 <= generic_caption_fraction <= 1.0:
        raise BVLibError(f"generic_caption_fraction must be in [0, 1], got {generic_caption_fraction}")
    if n_per_source is not None:
        counts = {k: min(v, n_per_source) for k, v in counts.items()}
    unknown = sorted(set(unnamed) - set(_UNNAMED_CAPTIONS))
    if unknown:
        raise BVLibError(f"unnamed takes kinds among: {', '.join(_UNNAMED_CAPTIONS)}; got {unknown[0]!r}")
    mix = CorpusMix(**counts, generic_caption_fraction=generic_caption_fraction, unnamed=tuple(unnamed))
    config = {"image_size": image_size, "seed": seed, "mix": mix.config(), "fonts": _fonts_fingerprint()}

    def build():
        images, captions = _build_corpus(image_size, mix, seed)
        return {"images": images}, {"captions": captions}

    tensors, meta = cached_data("corpus", config, build)
    return tensors["images"], list(meta["captions"])
