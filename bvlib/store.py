"""Artifact store and safe checkpoint loading.

Every trained model or vector is saved as safetensors plus a JSON sidecar, under a key that
hashes its full config, so a re-run (or another notebook) recomputes nothing it already has.
Writes are atomic: a killed run leaves either the old state or the complete new one.
Loading never unpickles code: this is a security tool and will be pointed at untrusted files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bvlib.errors import BVLibError


def default_root() -> Path:
    return Path(os.environ.get("BVLIB_STORE", Path.home() / ".cache" / "bvlib" / "store"))


def config_key(config: Mapping) -> str:
    """A stable short hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Store:
    """Tensors and JSON results keyed by (kind, config hash), on local disk."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()

    def _paths(self, kind: str, config: Mapping) -> tuple[Path, Path]:
        if not kind or not kind.replace("_", "").replace("-", "").isalnum():
            raise BVLibError(f"a store kind is a plain name (letters, digits, - and _), got {kind!r}")
        base = self.root / kind / config_key(config)
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    def has(self, kind: str, config: Mapping) -> bool:
        return self._paths(kind, config)[1].exists()

    def save(self, kind: str, config: Mapping, tensors: Mapping[str, torch.Tensor] | None = None, meta: Mapping | None = None) -> str:
        """Write tensors (optional) then the JSON sidecar; the sidecar marks the entry complete."""
        st_path, js_path = self._paths(kind, config)
        if tensors is not None:
            cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            _atomic_write(st_path, lambda tmp: save_file(cpu, tmp))
        record = {"kind": kind, "key": config_key(config), "config": config, "meta": dict(meta or {}), "tensors": tensors is not None}
        _atomic_write(js_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1, default=str)))
        return record["key"]

    def load(self, kind: str, config: Mapping) -> tuple[dict[str, torch.Tensor] | None, dict] | None:
        """(tensors or None, meta) for a stored entry, or None if absent."""
        st_path, js_path = self._paths(kind, config)
        if not js_path.exists():
            return None
        record = json.loads(js_path.read_text())
        tensors = load_file(st_path) if record.get("tensors") else None
        return tensors, record["meta"]

    def cached(self, kind: str, config: Mapping, build: Callable[[], tuple[Mapping[str, torch.Tensor] | None, Mapping]]):
        """Load (tensors, meta) if stored, else build, save and return them."""
        hit = self.load(kind, config)
        if hit is not None:
            return hit
        tensors, meta = build()
        self.save(kind, config, tensors, meta)
        return (dict(tensors) if tensors is not None else None), dict(meta)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or a torch file with `weights_only=True`.

    A pickle that needs code execution (a whole pickled model, custom classes) is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise BVLibError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except SafetensorError as e:
            raise BVLibError(f"{path} is not a valid safetensors file ({e})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BVLibError(
                f"refusing to load {path}: it is not a plain tensor checkpoint ({first[:120]}); "
                "save it with safetensors or as a state_dict of tensors"
            ) from None
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BVLibError(f"{path} does not hold a state_dict of tensors")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise BVLibError(f"{path} has NaN/inf values in {len(bad)} tensors (e.g. '{bad[0]}'); the checkpoint is corrupt")
    return dict(state)
