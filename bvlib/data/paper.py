"""The paper's eight datasets (TA8) from a local folder, behind the mini world's `Task` interface.

Nothing is downloaded (the machines this runs on are often offline, and the paper
protocol must use exactly the files the user has). Each dataset is read from `root` in
the layout torchvision (or ImageFolder) uses; splits are torch Datasets returning
(uint8 [3, S, S] tensor resized on the short side and center-cropped, int label), so the
same batching, triggers and evaluation code runs at both scales. Where a dataset has no
official validation split, a seeded stratified 10% of its training set is held out; where
it has no official split at all (EuroSAT, RESISC45, SUN397), a seeded stratified 80/10/10.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bvlib.data.tasks import PAPER_TASKS, Task
from bvlib.errors import BVLibError

VAL_FRACTION = 0.1
TEST_FRACTION = 0.1  # for datasets without an official test split


class PaperSplit(Dataset):
    """A view of a base dataset: (uint8 [3, S, S] image, int label) for the chosen indices.

    `labels` is available without decoding any image (evaluation and poisoning need it).
    """

    def __init__(self, base: Dataset, indices: Sequence[int], labels: Sequence[int], image_size: int):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64)[self.indices])
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.base[int(self.indices[i])][0]
        return to_uint8_chw(image, self.image_size), int(self.labels[i])


def to_uint8_chw(image: Any, size: int) -> torch.Tensor:
    """PIL image or HWC uint8 array -> uint8 [3, size, size]: short side to size (bicubic, antialiased),
    center crop."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    image = TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    image = TF.center_crop(image, [size, size])
    return TF.pil_to_tensor(image)


class _SVHNFiles(Dataset):
    """SVHN's {split}_32x32.mat, read directly: torchvision's SVHN re-hashes the whole file on every load."""

    def __init__(self, path: Path):
        from scipy.io import loadmat

        mat = loadmat(str(path))
        self.images = np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2))  # [N, 32, 32, 3]
        labels = mat["y"].astype(np.int64).reshape(-1)
        self.labels = np.where(labels == 10, 0, labels)  # SVHN stores the digit 0 as label 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def _labels_of(ds: Dataset) -> np.ndarray:
    """Labels of a torchvision dataset without decoding images (public attribute first)."""
    for attr in ("targets", "labels", "_labels"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64).reshape(-1)
    for attr in ("_samples", "samples"):
        if hasattr(ds, attr):
            return np.asarray([s[1] for s in getattr(ds, attr)], dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


def _stratified(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded per-class cut of range(len(labels)) into len(fractions) + 1 parts (the last takes the rest)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for k, frac in enumerate(fractions):
            n = (
                max(1, round(frac * len(members))) if len(members) > len(fractions) else 0
            )  # tiny classes: one each
            parts[k].append(members[start : start + n])
            start += n
        parts[-1].append(members[start:])
    return [np.sort(np.concatenate(p)) for p in parts]


@dataclass(frozen=True)
class _PaperSpec:
    name: str
    layout: str  # shown to the user when the dataset is missing
    templates: tuple[str, ...]
    build: Callable[[Path, int], tuple[list[str], tuple[Dataset, np.ndarray, np.ndarray], ...]]
    folders: tuple[str, ...]  # the sub-folders of ROOT it may read (what `fingerprint` covers)


def _train_test(
    train: Dataset, test: Dataset, seed: int
) -> tuple[tuple[Dataset, np.ndarray, np.ndarray], ...]:
    """Official train/test; val = a seeded stratified 10% of train."""
    ytr, yte = _labels_of(train), _labels_of(test)
    val, tr = _stratified(ytr, [VAL_FRACTION], seed)
    return (train, tr, ytr), (train, val, ytr), (test, np.arange(len(yte)), yte)


def _one_pool(ds: Dataset, seed: int) -> tuple[tuple[Dataset, np.ndarray, np.ndarray], ...]:
    """No official split: seeded stratified test 10%, val 10%, train 80%."""
    y = _labels_of(ds)
    test, val, train = _stratified(y, [TEST_FRACTION, VAL_FRACTION], seed)
    return (ds, train, y), (ds, val, y), (ds, test, y)


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def _image_folder(folder: Path):
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(folder))


def _build_cars(root: Path, seed: int):
    from torchvision.datasets import StanfordCars

    train, test = StanfordCars(str(root), split="train"), StanfordCars(str(root), split="test")
    return [str(c) for c in train.classes], *_train_test(train, test, seed)


def _build_dtd(root: Path, seed: int):
    from torchvision.datasets import DTD

    splits = [DTD(str(root), split=s, partition=1) for s in ("train", "val", "test")]
    return [c.replace("_", " ") for c in splits[0].classes], *(
        (d, np.arange(len(d)), _labels_of(d)) for d in splits
    )


EUROSAT_NAMES = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings",
    "River": "river",
    "SeaLake": "lake or sea",
}


def _build_eurosat(root: Path, seed: int):
    folder = _first_dir(root / "EuroSAT", root / "eurosat" / "2750", root / "eurosat")
    if folder is None:
        raise FileNotFoundError(folder)
    ds = _image_folder(folder)
    return [EUROSAT_NAMES.get(c, c.lower()) for c in ds.classes], *_one_pool(ds, seed)


GTSRB_CLASSES = [
    "speed limit 20 km/h",
    "speed limit 30 km/h",
    "speed limit 50 km/h",
    "speed limit 60 km/h",
    "speed limit 70 km/h",
    "speed limit 80 km/h",
    "end of speed limit 80 km/h",
    "speed limit 100 km/h",
    "speed limit 120 km/h",
    "no passing",
    "no passing for trucks",
    "right of way at the next intersection",
    "priority road",
    "yield",
    "stop",
    "no vehicles",
    "no trucks",
    "no entry",
    "general caution",
    "dangerous curve to the left",
    "dangerous curve to the right",
    "double curve",
    "bumpy road",
    "slippery road",
    "road narrows on the right",
    "road work",
    "traffic signals",
    "pedestrians",
    "children crossing",
    "bicycles crossing",
    "beware of ice or snow",
    "wild animals crossing",
    "end of all speed and passing limits",
    "turn right ahead",
    "turn left ahead",
    "ahead only",
    "go straight or right",
    "go straight or left",
    "keep right",
    "keep left",
    "roundabout mandatory",
    "end of no passing",
    "end of no passing for trucks",
]


def _build_gtsrb(root: Path, seed: int):
    from torchvision.datasets import GTSRB

    return list(GTSRB_CLASSES), *_train_test(
        GTSRB(str(root), split="train"), GTSRB(str(root), split="test"), seed
    )


def _build_mnist(root: Path, seed: int):
    from torchvision.datasets import MNIST

    return [str(i) for i in range(10)], *_train_test(
        MNIST(str(root), train=True), MNIST(str(root), train=False), seed
    )


def _build_resisc45(root: Path, seed: int):
    folder = _first_dir(root / "RESISC45", root / "resisc45" / "NWPU-RESISC45", root / "resisc45")
    if folder is None:
        raise FileNotFoundError(folder)
    ds = _image_folder(folder)
    return [c.replace("_", " ") for c in ds.classes], *_one_pool(ds, seed)


def _build_sun397(root: Path, seed: int):
    from torchvision.datasets import SUN397

    ds = SUN397(str(root))
    return [c.replace("/", " ").replace("_", " ") for c in ds.classes], *_one_pool(ds, seed)


def _build_svhn(root: Path, seed: int):
    folder = root / "svhn"
    train, test = _SVHNFiles(folder / "train_32x32.mat"), _SVHNFiles(folder / "test_32x32.mat")
    return [str(i) for i in range(10)], *_train_test(train, test, seed)


_SPECS: dict[str, _PaperSpec] = {
    s.name.lower(): s
    for s in (
        _PaperSpec(
            "Cars",
            "ROOT/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, "
            "cars_test_annos_withlabels.mat, cars_test/} (torchvision StanfordCars)",
            (
                "a photo of a {}.",
                "a photo of my {}.",
                "a photo of the {}, a type of car.",
                "a {} parked outside.",
            ),
            _build_cars,
            ("stanford_cars",),
        ),
        _PaperSpec(
            "DTD",
            "ROOT/dtd/dtd/{images/<class>/*.jpg, labels/train1.txt, val1.txt, test1.txt} (torchvision DTD)",
            (
                "a photo of a {} texture.",
                "a photo of a {} pattern.",
                "a close-up of a {} surface.",
                "a {} object.",
            ),
            _build_dtd,
            ("dtd",),
        ),
        _PaperSpec(
            "EuroSAT",
            "ROOT/EuroSAT/<class>/*.jpg (ImageFolder; torchvision's eurosat/2750/ also works)",
            ("a centered satellite photo of {}.", "a satellite image of {}.", "an aerial view of {}."),
            _build_eurosat,
            ("EuroSAT", "eurosat"),
        ),
        _PaperSpec(
            "GTSRB",
            "ROOT/gtsrb/{GTSRB/Training/<class id>/*.ppm, GTSRB/Final_Test/Images/*.ppm, GT-final_test.csv} "
            "(torchvision GTSRB)",
            (
                'a zoomed in photo of a "{}" traffic sign.',
                'a centered photo of a "{}" traffic sign.',
                'a photo of the "{}" road sign.',
            ),
            _build_gtsrb,
            ("gtsrb",),
        ),
        _PaperSpec(
            "MNIST",
            "ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (torchvision MNIST)",
            ('a photo of the number: "{}".', "a handwritten digit {}.", "an image of the number {}."),
            _build_mnist,
            ("MNIST",),
        ),
        _PaperSpec(
            "RESISC45",
            "ROOT/RESISC45/<class>/*.jpg (ImageFolder; resisc45/NWPU-RESISC45/ also works)",
            ("satellite imagery of {}.", "an aerial photograph of {}.", "a remote sensing image of {}."),
            _build_resisc45,
            ("RESISC45", "resisc45"),
        ),
        _PaperSpec(
            "SUN397",
            "ROOT/SUN397/{ClassName.txt, <letter>/<class>/sun_*.jpg} (torchvision SUN397)",
            ("a photo of a {}.", "a photo of the {} scene.", "a picture taken in a {}."),
            _build_sun397,
            ("SUN397",),
        ),
        _PaperSpec(
            "SVHN",
            "ROOT/svhn/{train_32x32.mat, test_32x32.mat} (torchvision SVHN files)",
            (
                'a photo of the number: "{}".',
                "a street photo of the house number {}.",
                "a cropped photo of the digit {}.",
            ),
            _build_svhn,
            ("svhn",),
        ),
    )
}
assert {s.name for s in _SPECS.values()} == set(PAPER_TASKS)


_FINGERPRINTS: dict[tuple, str] = {}


def _tree_digest(root: Path, subs: Sequence[str]) -> str:
    """sha256 over the relative names, sizes and mtimes of the files under root/sub (a stat each, no
    reading)."""
    h = hashlib.sha256()
    for sub in subs:
        for dirpath, dirnames, filenames in os.walk(root / sub):
            dirnames.sort()
            for f in sorted(filenames):
                path = os.path.join(dirpath, f)
                st = os.stat(path)
                h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def fingerprint(name: str | None, root: str | os.PathLike) -> str:
    """A digest of the files a task reads: a TA8 task `name` under `root`, or with name None the
    image folder `root` itself. Part of every store key made from that data, so that another copy of
    a dataset is never served the fine-tunes of the first. Computed once per process."""
    spec = None if name is None else _SPECS[str(name).lower()]
    root_path = Path(root).expanduser().resolve()
    key = (spec.name if spec else None, str(root_path))
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = _tree_digest(root_path, spec.folders if spec else ("",))
    return _FINGERPRINTS[key]


def write_image_folder(
    split, classnames: Sequence[str], folder: str | os.PathLike, *, keep: bool = False
) -> Path:
    """Write a split's images as PNG files in ImageFolder layout (folder/CLASS/00000.png; spaces in
    class names become underscores): how a task's images reach `bvlib merge --data`.

    keep=True leaves a folder that exists as it is, and writes a new one whole or not at all (into a
    sibling, then renamed): the files' dates are part of the store keys made from a folder, so a
    re-run on a kept folder finds what TBAR and DAM stored.
    """
    import shutil
    import tempfile

    from PIL import Image

    from bvlib.data.tasks import iterate_batches

    target = Path(folder)
    if keep and target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent)) if keep else target
    names = [c.replace(" ", "_").replace("/", "_") for c in classnames]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    i = 0
    for images, labels in iterate_batches(split, 256, shuffle=False):
        for image, label in zip(images, labels.tolist()):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / names[label] / f"{i:05d}.png")
            i += 1
    if keep:
        try:
            root.rename(target)
        except OSError:  # another writer finished it first: theirs is kept
            shutil.rmtree(root, ignore_errors=True)
    return target


def load_folder_task(name: str, folder: str | os.PathLike, *, image_size: int = 224) -> Task:
    """Your own labelled images in ImageFolder layout (folder/CLASS/IMAGE), as a task.

    The class names are the sub-folder names (underscores read as spaces), the prompt template
    "a photo of a {}.". The folder is the defender's data, so every image is the task's val
    split (what TBAR and DAM use), and train and test are the same images.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BVLibError(f"image folder {root} (task '{name}') does not exist")
    try:
        ds = _image_folder(root)
    except (FileNotFoundError, RuntimeError, OSError) as e:
        raise BVLibError(
            f"{root} is not an image folder (FOLDER/CLASS/IMAGE.png): {str(e).splitlines()[0][:120]}"
        ) from None
    labels = _labels_of(ds)
    split = PaperSplit(ds, np.arange(len(labels)), labels, image_size)
    classnames = [c.replace("_", " ") for c in ds.classes]
    return Task(str(name), classnames, ["a photo of a {}."], split, split, split)


def load_paper_task(
    name: str, root: str | os.PathLike, *, image_size: int = 224, split_seed: int = 0
) -> Task:
    """A TA8 dataset (Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN; any case) read from `root`.

    Never downloads. A missing or incomplete dataset raises a BVLibError showing the
    expected layout under `root`.
    """
    spec = _SPECS.get(str(name).lower())
    if spec is None:
        raise BVLibError(f"unknown paper task '{name}'; choose one of: {', '.join(PAPER_TASKS)}")
    if not isinstance(image_size, int) or image_size < 8:
        raise BVLibError(f"image_size must be an integer of at least 8, got {image_size!r}")
    root_path = Path(root).expanduser()
    missing = BVLibError(
        f"dataset {spec.name} not found under {root_path}; expected layout {spec.layout}; "
        "download it with torchvision or place it there"
    )
    if not root_path.is_dir():
        raise missing
    try:
        classnames, *splits = spec.build(root_path, split_seed)
    except (FileNotFoundError, RuntimeError, OSError, KeyError, ValueError) as e:
        raise missing from e
    if any(len(idx) == 0 for _, idx, _ in splits):
        raise BVLibError(
            f"dataset {spec.name} under {root_path} is too small to split (a split came out empty); "
            f"expected layout {spec.layout}"
        )
    train, val, test = (PaperSplit(ds, idx, y, image_size) for ds, idx, y in splits)
    return Task(spec.name, classnames, list(spec.templates), train, val, test)
