"""Tasks and data: the mini world's eight tasks, its pretraining corpus, and batching.

The mini world mirrors the paper's eight-task suite with data that installs from package
registries (PyPI, Debian), so a newcomer needs no download. Every task is a `Task`: class
names and prompt templates (to build zero-shot heads exactly as at paper scale) plus
train / val / test splits. In-memory splits are uint8 [N, 3, H, W] tensors; the paper's
TA8 datasets (`load_paper_task`, in `bvlib.data.paper`) are torch Datasets behind the same
interface.

Leakage is the thing to get right here. Task vectors are the difference between what
fine-tuning learns and what the base already knows, so the pretraining corpus must never
contain a task's evaluation images. Sources that feed both sides (fashion, animals, the
clip-art task categories) are cut in two by one shared function, `_source_partition`,
that assigns each image to the task side or to the pretraining pool from a hash of its
*content* (so the cut does not depend on seeds, caps or image size, and exact duplicates
land on the same side). Glyphs and patterns in the corpus come from disjoint font families
and disjoint parameter ranges.

Built tensors are cached as safetensors under $BVLIB_CACHE (default `data/` beside the store),
keyed by a hash of everything that determines them, and written atomically.

The package: `tasks` (Task, Split, batching), `cache` (hashing, resizing, the cache), `mini/`
(`sources` bundled with packages, `generated` glyphs and patterns, `registry` of the eight tasks and
`load_task`, `corpus` for pretraining), `paper` (the TA8 datasets from a local folder).
"""

from bvlib.data.cache import cache_dir
from bvlib.data.mini.corpus import CorpusMix, pretraining_corpus
from bvlib.data.mini.generated import font_split
from bvlib.data.mini.registry import load_task
from bvlib.data.paper import load_folder_task, load_paper_task, write_image_folder
from bvlib.data.tasks import (
    DATA_VERSION,
    MINI_TASKS,
    PAPER_TASKS,
    Split,
    SplitLike,
    Task,
    head,
    iterate_batches,
    outside,
)

__all__ = [
    "DATA_VERSION",
    "MINI_TASKS",
    "PAPER_TASKS",
    "CorpusMix",
    "Split",
    "SplitLike",
    "Task",
    "cache_dir",
    "font_split",
    "head",
    "outside",
    "iterate_batches",
    "load_folder_task",
    "load_paper_task",
    "load_task",
    "pretraining_corpus",
    "write_image_folder",
]
