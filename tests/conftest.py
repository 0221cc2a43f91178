import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("MPLBACKEND", None)  # Agg would hide the figures of notebooks executed by the tests
ROOT = Path(__file__).resolve().parents[1]
# One store for the whole suite (and the nbval run after it): the smoke world is built once.
os.environ.setdefault("BVLIB_STORE", str(ROOT / ".bvlib" / "store"))
os.environ.setdefault("BVLIB_CACHE", str(ROOT / ".bvlib" / "data"))


@pytest.fixture(scope="session")
def smoke_world():
    from bvlib.world import World

    return World("smoke", device="cpu", progress=False)
