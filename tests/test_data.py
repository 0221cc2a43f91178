"""Tests of bvlib.data (mini-world tasks, pretraining corpus, batching) and bvlib.data.paper (paper datasets).

The full-size mini tasks and the default corpus are built once into a cache kept in
pytest's own cache folder (.pytest_cache), so reruns are warm and the user's cache is
never touched; tests that must build from scratch use a fresh tmp_path cache.
"""

from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from bvlib import data
from bvlib.data import (
    MINI_TASKS,
    PAPER_TASKS,
    Split,
    Task,
    iterate_batches,
    load_paper_task,
    load_task,
    pretraining_corpus,
)
from bvlib.data.mini import corpus as corpus_module
from bvlib.data.mini import generated, registry, sources
from bvlib.errors import BVLibError


def image_hashes(images: torch.Tensor) -> set[str]:
    """sha1 of each image's bytes (independent of the library's own hashing)."""
    flat = images.reshape(len(images), -1).numpy()
    return {hashlib.sha1(row.tobytes()).hexdigest() for row in flat}


@pytest.fixture(scope="session")
def session_cache(request):
    path = request.config.cache.mkdir("bvlib-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BVLIB_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tasks(session_cache) -> dict[str, Task]:
    return {name: load_task(name) for name in MINI_TASKS}


@pytest.fixture(scope="session")
def corpus(session_cache) -> tuple[torch.Tensor, list[str]]:
    return pretraining_corpus()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BVLIB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------------
# mini-world tasks
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MINI_TASKS)
def test_task_shapes_labels_and_prompts(tasks, name):
    task = tasks[name]
    assert task.name == name
    assert 2 <= len(task.templates) <= 4 and all(t.count("{}") == 1 for t in task.templates)
    assert len(set(task.classnames)) == task.n_classes >= 2
    for split_name in ("train", "val", "test"):
        split = getattr(task, split_name)
        assert isinstance(split, Split) and len(split) > 0
        assert split.images.dtype == torch.uint8 and split.images.shape == (len(split), 3, 32, 32)
        assert split.labels.dtype == torch.int64 and split.labels.shape == (len(split),)
        assert 0 <= int(split.labels.min()) and int(split.labels.max()) < task.n_classes
    assert set(task.test.labels.tolist()) == set(range(task.n_classes)), (
        "every class must be in the test split"
    )
    assert set(task.train.labels.tolist()) == set(range(task.n_classes))
    assert len(task.train) > len(task.test) >= len(task.val)


@pytest.mark.parametrize("name", MINI_TASKS)
def test_splits_share_no_image(tasks, name):
    # duplicates are removed at build time for every task, so this holds for glyphs and patterns too
    task = tasks[name]
    train, val, test = (image_hashes(s.images) for s in (task.train, task.val, task.test))
    assert len(train) == len(task.train) and len(test) == len(task.test)
    assert not train & test and not train & val and not val & test


def test_grey_sources_are_replicated_to_three_channels(tasks):
    x = tasks["mnist"].test.images
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert x.float().std() > 20  # real content, not a blank tensor


def test_caps_and_split_fractions(fresh_cache):
    task = load_task("mnist", max_train_per_class=30, max_test_per_class=8, seed=1)
    for split, cap in ((task.train, 30), (task.val, 8), (task.test, 8)):
        counts = torch.bincount(split.labels, minlength=10)
        assert int(counts.max()) <= cap and int(counts.min()) > 0
    assert torch.bincount(task.train.labels).tolist() == [30] * 10  # class-balanced when the cap binds
    full = load_task("digits")
    n = len(full.train) + len(full.val) + len(full.test)
    assert abs(len(full.test) / n - 0.2) < 0.02 and abs(len(full.val) / n - 0.1) < 0.02


@pytest.mark.parametrize("name", MINI_TASKS)
def test_builds_are_deterministic_and_cached(tmp_path, monkeypatch, name):
    args = {"max_train_per_class": 12, "max_test_per_class": 5, "seed": 3}
    monkeypatch.setenv("BVLIB_CACHE", str(tmp_path / "a"))
    first = load_task(name, **args)
    cached = list((tmp_path / "a").rglob("*.safetensors"))  # one verified Store entry, no temporaries left
    assert (
        len(cached) == 1
        and cached[0].with_suffix(".json").is_file()
        and not list((tmp_path / "a").rglob("*.tmp"))
    )
    warm = load_task(name, **args)
    monkeypatch.setenv("BVLIB_CACHE", str(tmp_path / "b"))
    second = load_task(name, **args)  # built again from scratch
    for other in (warm, second):
        for s in ("train", "val", "test"):
            assert torch.equal(getattr(first, s).images, getattr(other, s).images)
            assert torch.equal(getattr(first, s).labels, getattr(other, s).labels)
    other_seed = load_task(name, **{**args, "seed": 4})
    assert not torch.equal(first.test.images, other_seed.test.images)


def test_pretraining_pool_is_fixed_and_disjoint():
    for name in ("fashion", "animals", "clipart"):
        src, task_side, pool = registry._source_partition(name, 32)
        assert len(pool) > 0 and len(task_side) > 0
        assert not set(task_side.tolist()) & set(pool.tolist())
        assert not set(src.keys[task_side].tolist()) & set(src.keys[pool].tolist())
        _, task_again, pool_again = registry._source_partition(name, 64)  # independent of size (and of seeds)
        assert np.array_equal(pool, pool_again) and np.array_equal(task_side, task_again)


def test_generated_images_are_deterministic():
    labels = np.arange(40) % 8
    assert torch.equal(
        generated._pattern_images(labels, 32, 7, "task"), generated._pattern_images(labels, 32, 7, "task")
    )
    assert not torch.equal(
        generated._pattern_images(labels, 32, 7, "task"), generated._pattern_images(labels, 32, 8, "task")
    )
    bank = generated._glyph_bank("task", generated.LETTERS, 64)
    glyphs = generated._glyph_images(bank, labels, 32, 7)
    assert torch.equal(glyphs, generated._glyph_images(bank, labels, 32, 7)) and glyphs.shape == (
        40,
        3,
        32,
        32,
    )


def test_house_numbers_print_the_task_side_fonts_digits():
    """The corpus names digits printed in its side's fonts; the house numbers are in the other side's."""
    labels = np.arange(40) % 10
    task_bank = generated._glyph_bank("task", "0123456789", 64)
    corpus_bank = generated._glyph_bank("corpus", "0123456789", 64)
    images = generated._house_number_images(task_bank, labels, 32, 7)
    assert images.shape == (40, 3, 32, 32) and torch.equal(
        images, generated._house_number_images(task_bank, labels, 32, 7)
    )
    source = generated._house_numbers_source(32)
    seed = data.cache._name_seed("house-numbers-source", data.DATA_VERSION)
    expected = generated._house_number_images(task_bank, source.labels, 32, seed)
    assert torch.equal(source.render(np.arange(len(source.labels)), 32), expected)
    assert not torch.equal(expected, generated._house_number_images(corpus_bank, source.labels, 32, seed))


def test_fabric_is_textiles_without_its_local_defects():
    """Same files as textiles' nominal and global classes, relabelled 0 and 1; no local defect."""
    textiles, fabric = sources._textiles_source(), sources._textiles_source(sources.FABRIC_CLASSES)
    nominal, local, glob = (textiles.keys[textiles.labels == c] for c in range(3))
    assert np.array_equal(fabric.keys[fabric.labels == 0], nominal)
    assert np.array_equal(fabric.keys[fabric.labels == 1], glob)
    assert len(fabric.labels) == len(nominal) + len(glob) and not set(local.tolist()) & set(
        fabric.keys.tolist()
    )
    task = load_task("fabric", max_train_per_class=20, max_test_per_class=5)
    assert task.classnames == ["no defect", "a global defect"] and set(task.test.labels.tolist()) == {0, 1}


def test_letter_fonts_are_disjoint_from_corpus_fonts():
    split = data.font_split()
    assert split["task"] and split["corpus"]
    assert not set(split["task"]) & set(split["corpus"])
    group_of = {face: group for group, face, _ in generated._font_faces()}
    assert not {group_of[f] for f in split["task"]} & {
        group_of[f] for f in split["corpus"]
    }  # whole designs, not faces
    assert len(split["task"]) >= 10 and len(split["corpus"]) >= 10


def test_unknown_task_and_bad_arguments():
    with pytest.raises(BVLibError, match="unknown task 'nope'; choose one of: mnist, digits"):
        load_task("nope")
    with pytest.raises(BVLibError, match="image_size"):
        load_task("mnist", image_size=2)
    with pytest.raises(BVLibError, match="max_train_per_class"):
        load_task("mnist", max_train_per_class=0)


def test_missing_debian_source_names_the_package(fresh_cache, monkeypatch):
    sources._fashion_source.cache_clear()
    monkeypatch.setattr(sources, "FASHION_DIR", "/nonexistent/fashion-mnist")
    try:
        with pytest.raises(BVLibError, match="apt-get install dataset-fashion-mnist"):
            load_task("fashion")
    finally:
        sources._fashion_source.cache_clear()


def test_other_image_size(fresh_cache):
    task = load_task("mnist", image_size=24, max_train_per_class=4, max_test_per_class=2)
    assert task.train.images.shape[1:] == (3, 24, 24)


# ------------------------------------------------------------------------------------------
# pretraining corpus
# ------------------------------------------------------------------------------------------
def test_corpus_shape_and_captions(corpus):
    images, captions = corpus
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
    assert 15_000 <= len(images) <= 40_000 and len(captions) == len(images)
    assert all(isinstance(c, str) and c for c in captions)
    generic = sum(c in corpus_module.GENERIC_CAPTIONS for c in captions) / len(captions)
    assert 0.15 < generic < 0.25
    text = " ".join(captions)
    for word in ("digit", "letter", "sneaker", "zebra", "stripes", "clip art"):
        assert word in text


def test_corpus_holds_no_task_image(corpus, tasks):
    corpus_hashes = image_hashes(corpus[0])
    for name, task in tasks.items():
        for split in (task.test, task.val, task.train):
            assert not corpus_hashes & image_hashes(split.images), f"corpus overlaps a split of {name}"


def test_a_damaged_cache_entry_is_moved_aside_and_rebuilt(fresh_cache):
    """The data cache is the artifact Store: a truncated file is noticed, kept aside, rebuilt the same."""
    args = {"max_train_per_class": 12, "max_test_per_class": 5, "seed": 3}
    first = load_task("digits", **args)
    (entry,) = (fresh_cache / "task").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    again = load_task("digits", **args)
    assert torch.equal(first.train.images, again.train.images) and list(
        (fresh_cache / "damaged" / "task").iterdir()
    )


def test_corpus_is_deterministic_and_knobs_work(fresh_cache, tmp_path, monkeypatch):
    kw = {"n_per_source": 40, "n_clipart_other": 10, "seed": 5}
    images, captions = pretraining_corpus(**kw)
    # 40 each of digits, letters, fashion, animals, patterns, clipart task pool, plus 10 other clip-art; a few
    # clip-art
    # images are dropped because they equal (at 32 px) a task-side image of another file
    assert 240 <= len(images) <= 40 * 6 + 10
    monkeypatch.setenv("BVLIB_CACHE", str(tmp_path / "other"))
    images2, captions2 = pretraining_corpus(**kw)
    assert torch.equal(images, images2) and captions == captions2
    images3, _ = pretraining_corpus(**{**kw, "seed": 6})
    assert not torch.equal(images, images3)
    only_fashion, caps = pretraining_corpus(
        n_digits=0,
        n_letters=0,
        n_fashion=30,
        n_animals=0,
        n_clipart_task=0,
        n_clipart_other=0,
        n_patterns=0,
        generic_caption_fraction=0.0,
    )
    assert len(only_fashion) == 30 and all(any(n in c for n in registry.FASHION_CLASSES) for c in caps)
    with pytest.raises(BVLibError, match="generic_caption_fraction"):
        pretraining_corpus(generic_caption_fraction=2.0)


# ------------------------------------------------------------------------------------------
# batching
# ------------------------------------------------------------------------------------------
def _toy_split(n: int = 53) -> Split:
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 2, 2).contiguous()
    return Split(images, torch.arange(n, dtype=torch.int64))


class _ToyDataset(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((3, 2, 2), i, dtype=torch.uint8), i


@pytest.mark.parametrize("source", [_toy_split, _ToyDataset])
def test_iterate_batches_covers_each_index_once(source):
    split = source(53)
    for shuffle in (False, True):
        seen = []
        for images, labels in iterate_batches(
            split, 10, shuffle=shuffle, generator=torch.Generator().manual_seed(0)
        ):
            assert (
                images.dtype == torch.uint8
                and labels.dtype == torch.int64
                and len(images) == len(labels) <= 10
            )
            assert torch.equal(images[:, 0, 0, 0].long(), labels)  # images stay paired with their labels
            seen += labels.tolist()
        assert sorted(seen) == list(range(53))
        assert (seen == list(range(53))) == (not shuffle)
    sizes = [len(y) for _, y in iterate_batches(split, 10, shuffle=True, drop_last=True)]
    assert sizes == [10] * 5


@pytest.mark.parametrize("source", [_toy_split, _ToyDataset])
def test_iterate_batches_is_deterministic_with_a_seeded_generator(source):
    split = source(40)

    def order(seed):
        return torch.cat(
            [
                y
                for _, y in iterate_batches(
                    split, 7, shuffle=True, generator=torch.Generator().manual_seed(seed)
                )
            ]
        )

    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))


# ------------------------------------------------------------------------------------------
# paper-scale (TA8) loaders on fabricated on-disk fixtures
# ------------------------------------------------------------------------------------------
def _jpeg(path, value: int, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 128)).save(path)


def _image_folder(root, classes, per_class=5):
    for c, cls in enumerate(classes):
        for i in range(per_class):
            _jpeg(root / cls / f"{cls}_{i}.jpg", 20 * c + 3 * i)


def _idx(path, array: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _check_paper_task(task: Task, n_classes: int, size: int):
    assert task.n_classes == n_classes and all(t.count("{}") == 1 for t in task.templates)
    for split in (task.train, task.val, task.test):
        assert len(split) > 0
        image, label = split[0]
        assert image.dtype == torch.uint8 and image.shape == (3, size, size) and 0 <= label < n_classes
        images, labels = next(iterate_batches(split, 4, shuffle=False))
        assert images.shape[1:] == (3, size, size) and labels.dtype == torch.int64
        assert torch.equal(labels, split.labels[: len(labels)])


def test_paper_eurosat_and_resisc45_image_folders(tmp_path):
    _image_folder(tmp_path / "EuroSAT", ["AnnualCrop", "Forest"])
    task = load_paper_task("EuroSAT", tmp_path, image_size=16)
    _check_paper_task(task, 2, 16)
    assert task.classnames == ["annual crop land", "forest"]
    assert len(task.train) + len(task.val) + len(task.test) == 10
    idx = {s: set(getattr(task, s).indices.tolist()) for s in ("train", "val", "test")}
    assert not idx["train"] & idx["test"] and not idx["val"] & idx["test"] and not idx["train"] & idx["val"]
    again = load_paper_task("eurosat", tmp_path, image_size=16)
    assert again.test.indices.tolist() == task.test.indices.tolist()  # seeded split
    _image_folder(tmp_path / "RESISC45", ["airplane", "baseball_diamond", "beach"])
    task = load_paper_task("RESISC45", tmp_path, image_size=20)
    _check_paper_task(task, 3, 20)
    assert task.classnames[1] == "baseball diamond"


def test_paper_mnist_from_raw_idx(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 12)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    task = load_paper_task("MNIST", tmp_path, image_size=32)
    _check_paper_task(task, 10, 32)
    assert len(task.test) == 12 and len(task.train) + len(task.val) == 40 and len(task.val) == 10
    assert torch.equal(task.test[0][0][0], task.test[0][0][1])  # grey -> 3 channels


def test_paper_svhn_from_mat_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    (tmp_path / "svhn").mkdir()
    for split, n in (("train", 30), ("test", 10)):
        y = (np.arange(n) % 10)[:, None]
        savemat(
            tmp_path / "svhn" / f"{split}_32x32.mat",
            {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": np.where(y == 0, 10, y)},
        )
    task = load_paper_task("svhn", tmp_path, image_size=24)
    _check_paper_task(task, 10, 24)
    assert sorted(task.test.labels.tolist()) == sorted(np.arange(10).tolist())  # label 10 read as digit 0


def test_paper_dtd_and_sun397_layouts(tmp_path):
    base = tmp_path / "dtd" / "dtd"
    (base / "labels").mkdir(parents=True)
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        lines = []
        for cls in ("banded", "zigzagged"):
            for i in range(n):
                _jpeg(base / "images" / cls / f"{cls}_{split}_{i}.jpg", 10 * i)
                lines.append(f"{cls}/{cls}_{split}_{i}.jpg")
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    task = load_paper_task("DTD", tmp_path, image_size=16)
    _check_paper_task(task, 2, 16)
    assert len(task.train) == 6 and len(task.val) == 4 and len(task.test) == 4

    sun = tmp_path / "SUN397"
    sun.mkdir()
    (sun / "ClassName.txt").write_text("/a/abbey\n/b/bus_interior\n")
    for cls in ("a/abbey", "b/bus_interior"):
        for i in range(10):
            _jpeg(sun / cls / f"sun_{cls[-3:]}{i}.jpg", 12 * i)
    task = load_paper_task("SUN397", tmp_path, image_size=16)
    _check_paper_task(task, 2, 16)
    assert task.classnames == ["abbey", "bus interior"]


def test_paper_gtsrb_layout(tmp_path):
    base = tmp_path / "gtsrb"
    for c in range(2):
        for i in range(5):
            _jpeg(base / "GTSRB" / "Training" / f"{c:05d}" / f"{i:05d}_00000.ppm", 30 * c + i)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(4):
        _jpeg(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", 50 + i)
        rows.append(f"{i:05d}.ppm;40;30;0;0;39;29;{i % 2}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    task = load_paper_task("GTSRB", tmp_path, image_size=16)
    assert task.n_classes == 43 and len(task.test) == 4 and len(task.train) + len(task.val) == 10
    image, label = task.test[1]
    assert image.shape == (3, 16, 16) and label == 1


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_paper_missing_dataset_is_a_clear_error(tmp_path, name):
    with pytest.raises(
        BVLibError, match=f"dataset {name} not found under .*expected layout .*download it with torchvision"
    ):
        load_paper_task(name, tmp_path)
    with pytest.raises(BVLibError, match="not found under"):
        load_paper_task(name, tmp_path / "does-not-exist")


def test_paper_unknown_name(tmp_path):
    with pytest.raises(BVLibError, match="unknown paper task 'imagenet'"):
        load_paper_task("imagenet", tmp_path)


def test_idx_reader_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _idx(tmp_path / "x-idx3-ubyte", arr)
    assert np.array_equal(sources._read_idx(tmp_path / "x-idx3-ubyte"), arr)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write((tmp_path / "x-idx3-ubyte").read_bytes())
    assert np.array_equal(sources._read_idx(tmp_path / "x-idx3-ubyte.gz"), arr)


def test_unnamed_letters_are_seen_but_never_named(session_cache):
    """corpus `unnamed`: the glyph images stay, every caption naming a letter is replaced."""
    names_a_letter = ("the letter", "a capital", 'the character "', "a printed letter")
    named_images, named = pretraining_corpus(n_per_source=40)
    images, unnamed = pretraining_corpus(n_per_source=40, unnamed=["letters"])
    assert any(c.startswith(names_a_letter) for c in named) and not any(
        c.startswith(names_a_letter) for c in unnamed
    )
    assert any(c in corpus_module._UNNAMED_CAPTIONS["letters"] for c in unnamed) and len(images) == len(
        named_images
    )
    with pytest.raises(BVLibError, match="unnamed takes"):
        pretraining_corpus(n_per_source=40, unnamed=["animals"])


def test_unnamed_fashion_keeps_its_images_and_drops_its_names(session_cache):
    """corpus `unnamed` on a pool kind: the same fashion images, no caption names a garment, the
    other kinds' captions untouched."""
    from bvlib.data.mini.registry import FASHION_CLASSES

    named_images, named = pretraining_corpus(n_per_source=40)
    images, unnamed = pretraining_corpus(n_per_source=40, unnamed=["fashion"])
    garment = tuple(FASHION_CLASSES)

    def names_garment(c: str) -> bool:
        return any(g in c for g in garment)

    assert (
        torch.equal(images, named_images)
        and any(map(names_garment, named))
        and not any(map(names_garment, unnamed))
    )
    assert sum(c in corpus_module._UNNAMED_CAPTIONS["fashion"] for c in unnamed) > 0
    assert sum(a != b for a, b in zip(named, unnamed)) <= sum(map(names_garment, named))


def test_lowercase_letters_teach_the_names_not_the_capitals(session_cache):
    """corpus `n_lowercase`: a-z glyphs captioned with their names (the task's class names once the
    tokenizer lowercases), no capital glyph; corpora without the option keep their keys."""
    from bvlib.data import CorpusMix

    base = {"n_per_source": 40, "n_letters": 0, "n_clipart_other": 0}
    plain_images, plain = pretraining_corpus(**base)
    images, captions = pretraining_corpus(**base, n_lowercase=52)
    lower = [c for c in captions if c.startswith(("a lowercase", "a small letter"))]
    assert len(images) == len(plain_images) + 40 and lower  # n_per_source caps it too
    assert all(
        c.split()[-1].rstrip(".") in "abcdefghijklmnopqrstuvwxyz"
        for c in lower[:20]
        if c.startswith("a lowercase")
    )
    assert "n_lowercase" not in CorpusMix().config() and CorpusMix(n_lowercase=5).config()["n_lowercase"] == 5


def test_kept_image_folder_is_written_once_and_keeps_its_fingerprint(tmp_path):
    """keep=True: a folder is written whole (no half-written sibling left) and then left alone, so the
    fingerprint in the store keys made from it (file sizes and dates) holds across re-runs."""
    from bvlib.data import load_folder_task, write_image_folder
    from bvlib.data.paper import _tree_digest

    g = torch.Generator().manual_seed(0)
    split = Split(
        torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g), torch.tensor([0, 1, 0, 1, 1, 0])
    )
    folder = write_image_folder(split, ["a cat", "dog"], tmp_path / "own" / "pets", keep=True)
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == ["pets"]
    before = _tree_digest(folder, ("",))
    other = Split(torch.zeros(6, 3, 8, 8, dtype=torch.uint8), split.labels)
    assert write_image_folder(other, ["a cat", "dog"], folder, keep=True) == folder
    assert _tree_digest(folder, ("",)) == before
    task = load_folder_task("pets", folder, image_size=8)
    images, labels = next(iterate_batches(task.val, 6, shuffle=False))  # class a_cat first: images 0, 2, 5
    assert task.classnames == ["a cat", "dog"] and torch.equal(images[:3], split.images[[0, 2, 5]])
    write_image_folder(other, ["a cat", "dog"], folder)  # keep=False writes over the files: a new fingerprint
    assert _tree_digest(folder, ("",)) != before
