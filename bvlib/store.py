"""Artifact store and safe checkpoint loading.

Every trained model or vector is saved as safetensors plus a JSON sidecar, under a key that
hashes its full config, so a re-run (or another notebook) recomputes nothing it already has.
Writes are atomic: a killed run leaves either the old state or the complete new one. Loads are
verified (the sidecar's sha256 of the tensor file, finite values): a damaged entry is moved
aside in one line and rebuilt. One lock per key lets concurrent builders (two notebooks, Ray
workers on a shared filesystem) build an artifact once. Loading never unpickles code: this is
a security tool and will be pointed at untrusted files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import socket
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file

from bvlib.errors import BVLibError

_UMASK = os.umask(0)
os.umask(_UMASK)
_HOST = socket.gethostname().replace(".", "-")


def bvlib_home() -> Path:
    """`.bvlib/` of the checkout when bvlib runs from one (an editable install, as `make` sets up),
    else ~/.cache/bvlib: `make book` and a bare `bvlib` command share one store."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "notebooks").is_dir():
        return checkout / ".bvlib"
    return Path.home() / ".cache" / "bvlib"


def default_root() -> Path:
    """$BVLIB_STORE, else `bvlib_home()/store`."""
    return Path(os.environ.get("BVLIB_STORE") or bvlib_home() / "store")


def config_key(config: Mapping) -> str:
    """A stable short hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temporary file in the same folder, then rename: readers never see half a file.
    The temporary name carries host and pid so that `remove_stale_temporaries` knows a dead one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a shared store needs the group to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files that runs killed on this host left behind (their pid is gone)."""
    removed = 0
    for tmp in folder.glob(".*.tmp"):
        parts = tmp.name.split(".")
        try:
            host, pid = parts[-4], int(parts[-3])
        except (IndexError, ValueError):
            continue
        if host == _HOST and not _pid_alive(pid):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


class _Damaged(Exception):
    """A store entry that cannot be trusted (the message says why)."""


def _check_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    return f"NaN/inf values in '{bad[0]}'" if bad else None


class Store:
    """Tensors and JSON results keyed by (kind, config hash), on local disk.

    An entry is `KIND/KEY.safetensors` (optional) plus `KIND/KEY.json`, written in that order;
    the sidecar marks the entry complete and records the tensor file's sha256.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()

    def _paths(self, kind: str, config: Mapping) -> tuple[Path, Path]:
        if not kind or not kind.replace("_", "").replace("-", "").isalnum():
            raise BVLibError(f"a store kind is a plain name (letters, digits, - and _), got {kind!r}")
        base = self.root / kind / config_key(config)
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    def has(self, kind: str, config: Mapping) -> bool:
        return self._paths(kind, config)[1].exists()

    def check_writable(self) -> None:
        """Fail in one line *before* expensive work when nothing could be saved here."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".write-check.", suffix=".tmp"):
                pass
        except OSError as e:
            raise BVLibError(
                f"the store {self.root} is not writable ({e.strerror or e}); "
                "set BVLIB_STORE to a folder you can write"
            ) from None

    def save(
        self,
        kind: str,
        config: Mapping,
        tensors: Mapping[str, torch.Tensor] | None = None,
        meta: Mapping | None = None,
        build_s: float | None = None,
    ) -> str:
        """Write tensors (optional) then the JSON sidecar; the sidecar marks the entry complete and
        says how long the entry took to build (`build_s`, outside `meta`: meta is what loads return)."""
        st_path, js_path = self._paths(kind, config)
        record = {
            "kind": kind,
            "key": config_key(config),
            "config": config,
            "meta": dict(meta or {}),
            "tensors": tensors is not None,
        }
        if build_s is not None:
            record["build_s"] = round(build_s, 3)
        if tensors is not None:
            cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            _atomic_write(st_path, lambda tmp: save_file(cpu, tmp))
            record["sha256"] = file_sha256(st_path)
        _atomic_write(js_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1, default=str)))
        remove_stale_temporaries(js_path.parent)
        return record["key"]

    def built_since(self, since: float) -> dict[str, dict[str, float]]:
        """Per kind, how many entries were written at or after `since` (a `time.time()`) and the
        seconds their builds took: where a build's time went, whichever process built them. A build
        that judges through other entries (merge curves through evaluations) counts in both kinds."""
        out: dict[str, dict[str, float]] = {}
        for path in self.root.glob("*/*.json") if self.root.is_dir() else ():
            try:
                if path.stat().st_mtime < since:
                    continue
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if "build_s" in record:
                row = out.setdefault(record.get("kind", path.parent.name), {"n": 0, "seconds": 0.0})
                row["n"] += 1
                row["seconds"] += record["build_s"]
        return {k: {"n": v["n"], "seconds": round(v["seconds"], 1)} for k, v in sorted(out.items())}

    def load(self, kind: str, config: Mapping) -> tuple[dict[str, torch.Tensor] | None, dict] | None:
        """(tensors or None, meta) for a stored entry, or None if absent. A damaged entry
        (unreadable sidecar, tensor file missing, truncated, swapped or non-finite) is moved
        aside with one line on stderr and reported absent, so that the caller rebuilds it."""
        st_path, js_path = self._paths(kind, config)
        if not js_path.exists():
            return None
        try:
            return self._read(st_path, js_path, config_key(config))
        except _Damaged as e:
            self._quarantine(kind, config, st_path, js_path, str(e))
            return None

    @staticmethod
    def _read(st_path: Path, js_path: Path, key: str) -> tuple[dict[str, torch.Tensor] | None, dict]:
        try:
            record = json.loads(js_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise _Damaged(f"its sidecar is not readable JSON ({type(e).__name__})") from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("meta"), dict)
            or not isinstance(record.get("tensors"), bool)
        ):
            raise _Damaged("its sidecar lacks the fields an entry has")
        if record.get("key") != key:
            raise _Damaged(f"its sidecar belongs to entry {str(record.get('key'))[:20]!r}")
        if not record["tensors"]:
            return None, record["meta"]
        try:
            blob = st_path.read_bytes()
        except OSError as e:
            raise _Damaged(f"its tensor file cannot be read ({e.strerror or e})") from None
        digest = hashlib.sha256(blob).hexdigest()
        if record.get("sha256") not in (None, digest):
            raise _Damaged("its tensor file is not the one saved with it (sha256 differs)")
        try:
            tensors = load_safetensors_bytes(blob)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise _Damaged(f"its tensor file is not valid safetensors ({str(e)[:80]})") from None
        problem = _check_finite(tensors)
        if problem:
            raise _Damaged(problem)
        if "sha256" not in record:  # an entry from before hashes were recorded: trust it once, then pin it
            record["sha256"] = digest
            with contextlib.suppress(OSError):
                _atomic_write(
                    js_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1, default=str))
                )
        return tensors, record["meta"]

    def _quarantine(self, kind: str, config: Mapping, st_path: Path, js_path: Path, reason: str) -> None:
        dest = self.root / "damaged" / kind
        stamp = time.strftime("%Y%m%d-%H%M%S")
        with contextlib.suppress(OSError):
            dest.mkdir(parents=True, exist_ok=True)
            for p in (js_path, st_path):  # sidecar first: the entry stops being complete at once
                if p.exists():
                    os.replace(p, dest / f"{p.name}.{stamp}")
        made = json.dumps(config, sort_keys=True, default=str)
        made = made if len(made) <= 100 else made[:97] + "..."
        print(
            f"bvlib store: {kind}/{st_path.stem} is damaged ({reason}); moved to {dest}, it will be rebuilt. "
            f"It was made from {made}",
            file=sys.stderr,
        )

    # resumable work: a long build (pretraining) checkpoints its state here, atomically ------------
    def _checkpoint_path(self, kind: str, config: Mapping) -> Path:
        st_path, _ = self._paths(kind, config)
        return self.root / "checkpoints" / kind / f"{st_path.stem}.pt"

    def save_checkpoint(self, kind: str, config: Mapping, state: Mapping) -> None:
        """Keep the partial state of the build of entry (kind, config); a failed write is only a warning."""
        try:
            _atomic_write(self._checkpoint_path(kind, config), lambda tmp: torch.save(dict(state), tmp))
        except OSError as e:
            print(
                f"bvlib store: could not checkpoint {kind}/{config_key(config)} ({e.strerror or e})",
                file=sys.stderr,
            )

    def load_checkpoint(self, kind: str, config: Mapping) -> dict | None:
        """The partial state saved by `save_checkpoint` (tensors and plain values only), or None."""
        path = self._checkpoint_path(kind, config)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- any damage: start over rather than fail
            print(
                f"bvlib store: ignoring the unreadable checkpoint {path.name} ({type(e).__name__}); starting "
                "over",
                file=sys.stderr,
            )
            return None

    def drop_checkpoint(self, kind: str, config: Mapping) -> None:
        self._checkpoint_path(kind, config).unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, kind: str, config: Mapping) -> Iterator[None]:
        """Exclusive per-entry lock (a lock file beside the entry), for build-once across processes."""
        st_path, _ = self._paths(kind, config)
        st_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(st_path.with_suffix(".lock")), mode=0o666 & ~_UMASK):
            yield

    def cached(
        self,
        kind: str,
        config: Mapping,
        build: Callable[[], tuple[Mapping[str, torch.Tensor] | None, Mapping]],
    ):
        """Load (tensors, meta) if stored, else build, save and return them. A second process asking
        for the same entry meanwhile waits for the first and loads its result. If saving fails
        (disk full), the result is still returned and one line says it was not stored."""
        hit = self.load(kind, config)
        if hit is not None:
            return hit
        self.check_writable()
        with self.lock(kind, config):
            hit = self.load(kind, config)
            if hit is not None:
                return hit
            t = time.perf_counter()
            tensors, meta = build()
            try:
                self.save(kind, config, tensors, meta, build_s=time.perf_counter() - t)
            except OSError as e:
                print(
                    f"bvlib store: could not save {kind}/{config_key(config)} ({e.strerror or e}); "
                    "the result is used but not stored",
                    file=sys.stderr,
                )
        return (dict(tensors) if tensors is not None else None), dict(meta)


# ----------------------------------------------------------------------------------------
# User checkpoints: read by content, never by unpickling code; written as their suffix says
# ----------------------------------------------------------------------------------------
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


def checkpoint_format(path: str | os.PathLike) -> str:
    """ "safetensors", "torch" (zip or legacy pickle container) or "unknown", from the file's bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if head[:4] == b"PK\x03\x04" or (
        len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5
    ):  # zip, or a pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return "unknown"


def _refusal_reason(e: BaseException) -> str:
    """The useful part of torch's weights-only refusal (the forbidden global), without its advice."""
    text = str(e)
    for line in text.splitlines():
        if "unsupported" in line.lower() or "Unpickler error" in line:
            return line.split("WeightsUnpickler error:")[-1].strip().rstrip(".")[:160]
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return type(e).__name__ if "weights_only" in first else first.split(" Please ")[0][:160]


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or a torch file with `weights_only=True`, told apart by
    content (a `.pt` name holding safetensors bytes is read as safetensors).

    A pickle that needs code execution (a whole pickled model, custom classes) is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise BVLibError(
            f"checkpoint {path} does not exist" + (" (it is a directory)" if path.is_dir() else "")
        )
    fmt = checkpoint_format(path)
    if fmt == "safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise BVLibError(f"{path} is not a valid safetensors file ({str(e)[:120]})") from None
    elif fmt == "torch":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (
            pickle.UnpicklingError,
            RuntimeError,
            EOFError,
            AttributeError,
            ValueError,
            KeyError,
            IndexError,
            TypeError,
            OSError,
            zipfile.BadZipFile,
            UnicodeDecodeError,
        ) as e:
            raise BVLibError(
                f"refusing to load {path}: it is not a plain tensor checkpoint ({_refusal_reason(e)}); "
                "save it with safetensors or as a state_dict of tensors"
            ) from None
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
    else:
        raise BVLibError(f"{path} is not a checkpoint (neither safetensors nor a torch file)")
    if (
        not isinstance(state, Mapping)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise BVLibError(f"{path} does not hold a state_dict of tensors")
    problem = _check_finite(state)
    if problem:
        raise BVLibError(f"{path} has {problem}; the checkpoint is corrupt")
    return dict(state)


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output that could not be written: a folder, a missing parent,
    no write permission, or a suffix that names no checkpoint format."""
    path = Path(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise BVLibError(f"--out {path}: name the format with the suffix ({', '.join(CHECKPOINT_SUFFIXES)})")
    if path.is_dir():
        raise BVLibError(f"--out {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BVLibError(f"--out {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise BVLibError(f"--out {path}: no permission to write there")
    return path


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write `state` in the format its suffix names (safetensors, or plain tensors for torch suffixes),
    atomically. If the write fails (disk full), the state goes to a file in the temporary folder and
    the error names it, so that finished work is not lost."""
    path = check_output_path(path)
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    write = (
        (lambda tmp: save_file(cpu, tmp))
        if path.suffix == ".safetensors"
        else (lambda tmp: torch.save(cpu, tmp))
    )
    try:
        _atomic_write(path, write)
    except OSError as e:
        fd, fallback = tempfile.mkstemp(prefix=f"{path.stem}.", suffix=path.suffix)
        os.close(fd)
        try:
            write(fallback)
        except OSError:
            raise BVLibError(f"could not write {path} ({e.strerror or e}), nor a fallback copy") from None
        raise BVLibError(
            f"could not write {path} ({e.strerror or e}); the result was saved to {fallback} instead"
        ) from None
    return path
