"""Your own checkpoints: merge and inspect open_clip image encoders from files, streamed.

The practitioner's side of the library (`bvlib merge`, `bvlib inspect`): a base encoder and K
fine-tuned ones, as safetensors or plain-tensor torch files (never unpickled code), image-encoder
state dicts or whole CLIP state dicts (tower under `visual.`). Models are never stacked whole: the
parameters are read lazily and merged a group of tensors at a time (`budget_bytes` of task-vector
values per group), so eight ViT-L-14 encoders merge in a few GB. Every method of
`bvlib.merging` gives exactly what it gives on the whole stack: TIES takes its trim thresholds
and its sign majority over whole vectors, DARE draws its mask per named tensor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from bvlib.errors import BVLibError
from bvlib.merging import _call, kth_largest, ties_finish, ties_part
from bvlib.store import checkpoint_format, file_sha256, load_state_dict
from bvlib.weights import Layout, Weights

PREFIX = "visual."
DEFAULT_BUDGET = 1 << 28  # 256 MB of task-vector values per group of tensors


class EncoderFile:
    """Lazy access to the image-encoder tensors of one checkpoint file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise BVLibError(f"checkpoint {self.path} does not exist")
        fmt = checkpoint_format(self.path)
        if fmt == "safetensors":
            try:
                self._file = safe_open(str(self.path), framework="pt")
                keys = list(self._file.keys())
            except Exception as e:  # noqa: BLE001 -- any damage is one line
                raise BVLibError(f"{self.path} is not a valid safetensors file ({str(e)[:120]})") from None
            self._get = self._file.get_tensor
            self._shape = lambda k: tuple(self._file.get_slice(k).get_shape())
        else:  # torch files and anything else go through the safe loader (refusals, NaN checks)
            state = load_state_dict(self.path)
            keys = list(state)
            self._get = state.__getitem__
            self._shape = lambda k: tuple(state[k].shape)
        self.keys = keys
        self.prefix = PREFIX if any(k.startswith(PREFIX) for k in keys) else ""
        self.names = [k[len(self.prefix) :] for k in keys if k.startswith(self.prefix)]
        if not self.names:
            raise BVLibError(f"{self.path} holds no tensors")
        self._checked: set[str] = set()

    @cached_property
    def layout(self) -> Layout:
        return Layout(tuple(self.names), tuple(self._shape(self.prefix + n) for n in self.names))

    def check_like(self, layout: Layout, what: str) -> None:
        """Same parameter names and shapes as `layout` (in any order: files list keys as they please)."""
        mine = self.layout
        if set(mine.names) != set(layout.names):
            diff = sorted(set(mine.names) ^ set(layout.names))[:3]
            raise BVLibError(
                f"{self.path} and {what} come from different architectures: parameter names differ (e.g. "
                f"{diff})"
            )
        shapes = dict(zip(mine.names, mine.shapes))
        for name, shape in zip(layout.names, layout.shapes):
            if shapes[name] != shape:
                raise BVLibError(
                    f"{self.path} and {what} come from different architectures: '{name}' has shape "
                    f"{list(shapes[name])} vs {list(shape)}"
                )

    def tensor(self, name: str) -> torch.Tensor:
        t = self._get(self.prefix + name)
        if t.is_floating_point() and name not in self._checked:
            if not torch.isfinite(t).all():
                raise BVLibError(f"{self.path} has NaN/inf values in '{name}'; the checkpoint is corrupt")
            self._checked.add(name)
        return t

    def flat(self, names: Sequence[str]) -> torch.Tensor:
        return torch.cat([self.tensor(n).reshape(-1).float() for n in names])

    def other_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors outside the image tower (a whole CLIP's text tower), as they are."""
        return {k: self._get(k) for k in self.keys if not k.startswith(self.prefix)} if self.prefix else {}

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)


def open_encoders(
    base: str | os.PathLike, others: Sequence[str | os.PathLike]
) -> tuple[EncoderFile, list[EncoderFile], Layout]:
    """The base and the other files, checked to be the same architecture (one line naming the file)."""
    if not others:
        raise BVLibError("give at least one fine-tuned checkpoint besides the base")
    base_file = EncoderFile(base)
    layout = base_file.layout
    files = []
    for path in others:
        f = EncoderFile(path)
        f.check_like(layout, "the base")
        files.append(f)
    return base_file, files, layout


def tensor_groups(layout: Layout, rows: int, budget_bytes: int = DEFAULT_BUDGET) -> Iterator[Layout]:
    """Consecutive parameter tensors in groups of about `budget_bytes` of float32 values for `rows`
    vectors."""
    names, shapes, size = [], [], 0
    for name, shape, numel in zip(layout.names, layout.shapes, layout.numels):
        if names and size + rows * numel * 4 > budget_bytes:
            yield Layout(tuple(names), tuple(shapes))
            names, shapes, size = [], [], 0
        names.append(name)
        shapes.append(shape)
        size += rows * numel * 4
    if names:
        yield Layout(tuple(names), tuple(shapes))


def _vector_rows(
    base: EncoderFile,
    files: Sequence[EncoderFile],
    names: Sequence[str],
    extra: Sequence[tuple[EncoderFile, float]] = (),
) -> torch.Tensor:
    """[K(+extra), d] task vectors τ = θ_file − θ_base on `names`; `extra` rows are scale · file (vectors)."""
    theta0 = base.flat(names)
    return torch.stack(
        [_vector_row(base, files, names, extra, i, theta0) for i in range(len(files) + len(extra))]
    )


def _vector_row(base, files, names, extra, i: int, theta0: torch.Tensor | None = None) -> torch.Tensor:
    if i < len(files):
        return files[i].flat(names) - (theta0 if theta0 is not None else base.flat(names))
    f, scale = extra[i - len(files)]
    return f.flat(names) * scale


def _check_params(method: str, params: Mapping, rows: int) -> None:
    """Refuse a bad method or parameter in one line before any file is read: run it on a tiny stack."""
    if method == "dare" and params.get("base", "task_arithmetic") != "task_arithmetic":
        raise BVLibError(
            "bvlib merge streams DARE over task arithmetic only; DARE over TIES is `bvlib.merging.merge` in "
            "Python"
        )
    _call(method, torch.zeros(rows, 4), Layout(("w",), ((2, 2),)), dict(params))


def merge_files(
    base: str | os.PathLike,
    finetuned: Sequence[str | os.PathLike],
    method: str = "task_arithmetic",
    *,
    params: Mapping | None = None,
    defender_bv: str | os.PathLike | None = None,
    strength: float = 1.0,
    budget_bytes: int = DEFAULT_BUDGET,
) -> tuple[dict[str, torch.Tensor], dict]:
    """θ0 + merge(τ_1..τ_K [, −strength·BV]) in the base file's own key layout, and a report.

    With `defender_bv` (a Backdoor Vector file, `bvlib.defenses.ibvs_vector` saved), the merge is
    IBVS: the defender's −strength·BV joins the task vectors inside the merge, at its scale.
    """
    params = dict(params or {})
    base_file, files, layout = open_encoders(base, finetuned)
    extra: list[tuple[EncoderFile, float]] = []
    if defender_bv is not None:
        bv = EncoderFile(defender_bv)
        bv.check_like(layout, "the base (as the defender BV)")
        extra.append((bv, -float(strength)))
    rows = len(files) + len(extra)
    stats = VectorStats(rows)
    _check_params(method, params, rows)
    thresholds = None
    if method == "ties":
        thresholds = _whole_vector_thresholds(
            base_file, files, extra, layout, params.get("k", 0.2), budget_bytes
        )
    merged_tau, parts = {}, []
    for group in tensor_groups(layout, rows, budget_bytes):
        x = _vector_rows(base_file, files, group.names, extra)
        stats.add(x)
        if method == "ties":
            parts.append((group, ties_part(x, thresholds, disjoint=params.get("disjoint", "mean"))))
            continue
        out = _call(method, x, group, params)
        merged_tau.update(_split(out, group))
    if parts:
        lam = float(params.get("lam", 1.0))
        for (group, _), out in zip(
            parts, ties_finish([p for _, p in parts], disjoint=params.get("disjoint", "mean"))
        ):
            merged_tau.update(_split(out.mul_(lam), group))
    state = dict(base_file.other_tensors())
    for name in layout.names:
        theta0 = base_file.tensor(name)
        state[base_file.prefix + name] = (theta0.float() + merged_tau[name]).to(theta0.dtype)
    report = {
        "method": method,
        "params": params,
        "base": {"path": str(base_file.path), "sha256": base_file.sha256},
        "inputs": [{"path": str(f.path), "sha256": f.sha256} for f in files],
        "defense": None
        if defender_bv is None
        else {"name": "ibvs", "defender_bv": str(defender_bv), "strength": float(strength)},
        "parameters": layout.numel,
        "key_prefix": base_file.prefix,
        **stats.report([f.path.name for f in files] + (["-BV"] if extra else [])),
    }
    return state, report


DATA_DEFENSES = ("tbar", "dam")


def _json_safe(info: Mapping) -> dict:
    """A defense's info without its tensors (DAM's mask) and with its loss history cut to its length."""
    out = {}
    for k, v in info.items():
        if isinstance(v, torch.Tensor):
            continue
        out[k] = len(v) if k == "history" else v
    return out


def defend_merge(
    world,
    state: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, str | os.PathLike],
    defense: str,
    params: Mapping | None = None,
    lam: float = 1.0,
) -> tuple[dict[str, torch.Tensor], dict]:
    """A defense that needs data, on files: the merged `state` (a whole CLIP state dict in the base's
    layout, as `merge_files` gives it) cleaned, and what the defense reports.

    `world` is `World.from_files` over the base and the defender's image folders. TBAR runs on the
    merged encoder with the one folder's task (the trigger unknown: reverse-engineered, α chosen on
    that folder). DAM replaces the plain task arithmetic by its masked merge of the `finetuned` files
    ({task name: file}, a folder each) at the merge's `lam`. `params` go to `bvlib.defenses.tbar` /
    `dam` (e.g. steps, alpha, trigger_size; lr, temperature).
    """
    import inspect

    from bvlib.defenses import dam, tbar

    if defense not in DATA_DEFENSES:
        raise BVLibError(
            f"unknown defense '{defense}'; the ones that need data are: {', '.join(DATA_DEFENSES)}"
        )
    params = dict(params or {})
    fn = tbar if defense == "tbar" else dam
    allowed = [
        n
        for n, p in inspect.signature(fn).parameters.items()
        if p.kind is p.KEYWORD_ONLY and n not in ("trigger", "target", "progress")
    ]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise BVLibError(
            f"--defense-param {unknown[0]} is not a parameter of {defense}; it takes: {', '.join(allowed)}"
        )
    layout = world.layout
    prefix = PREFIX if any(k.startswith(PREFIX) for k in state) else ""
    if defense == "tbar":
        (task,) = world.task_names
        merged = Weights.from_state_dict(state, layout)  # recognises the whole CLIP's `visual.` keys
        cleaned, info = tbar(world, merged.to(world.device), task, **({"alpha": "auto"} | params))
    else:
        taus = {}
        for task, path in finetuned.items():
            f = EncoderFile(path)
            f.check_like(layout, "the base")
            taus[task] = Weights(f.flat(layout.names), layout).to(world.device) - world.base_weights
        tau, info = dam(world, taus, **({"lam": lam} | params))
        cleaned = world.base_weights + tau
    out = dict(state)
    for name, t in cleaned.to("cpu").state_dict().items():
        out[prefix + name] = t.to(state[prefix + name].dtype)
    return out, {"name": defense, **_json_safe(info)}


def _whole_vector_thresholds(base_file, files, extra, layout, k, budget_bytes) -> torch.Tensor | None:
    """TIES's per-vector trim thresholds over whole vectors, one vector in memory at a time."""
    rows = len(files) + len(extra)
    n = max(1, int(float(k) * layout.numel))
    if n >= layout.numel:
        return None
    out, theta0 = [], base_file.flat(layout.names)  # the base is read once, not once per vector
    for i in range(rows):
        row = _vector_row(base_file, files, layout.names, extra, i, theta0)
        out.append(kth_largest(row.unsqueeze(0), n, magnitude=True))
    return torch.cat(out).unsqueeze(1)


def _split(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    return {
        n: flat[o : o + k].view(s)
        for n, s, o, k in zip(layout.names, layout.shapes, layout.offsets, layout.numels)
    }


class VectorStats:
    """Norms, pairwise cosines and sign agreement of K vectors, accumulated group by group."""

    def __init__(self, k: int):
        self.gram = torch.zeros(k, k, dtype=torch.float64)
        self.nonzero = torch.zeros(k, dtype=torch.float64)
        self.count = 0
        self.unanimous = (
            0.0  # coordinates where every nonzero value has the same sign (of those with 2+ nonzero)
        )
        self.contested = 0.0

    def add(self, x: torch.Tensor) -> None:
        x64 = x.double()
        self.gram += x64 @ x64.T
        nz = x != 0
        self.nonzero += nz.sum(1).double()
        self.count += x.shape[1]
        pos, neg = (x > 0).sum(0), (x < 0).sum(0)
        several = (pos + neg) >= 2
        self.unanimous += float(((pos == 0) | (neg == 0))[several].sum())
        self.contested += float(several.sum())

    def report(self, names: Sequence[str]) -> dict:
        norms = self.gram.diagonal().sqrt()
        cos = self.gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
        return {
            "vectors": [
                {
                    "name": n,
                    "norm": float(norms[i]),
                    "nonzero_share": float(self.nonzero[i] / max(self.count, 1)),
                }
                for i, n in enumerate(names)
            ],
            "cosine": [[round(float(v), 6) for v in row] for row in cos],
            "sign_agreement": {
                "unanimous_share": self.unanimous / max(self.contested, 1.0),
                "coordinates_with_two_or_more_nonzero": int(self.contested),
            },
        }


def inspect_files(
    base: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    *,
    bv: tuple[str, str] | None = None,
    budget_bytes: int = DEFAULT_BUDGET,
) -> dict:
    """The paper's diagnostics on files: per task vector its norm, sparsity and top-1% mass, their
    cosine matrix, and with `bv=(suspect, clean)` the BV = θ_suspect − θ_clean, its statistics and
    its cosine with every task vector."""
    base_file, files, layout = open_encoders(base, checkpoints)
    names = [f.path.name for f in files]
    extra: list[tuple[EncoderFile, float]] = []
    if bv is not None:
        suspect, clean = (EncoderFile(p) for p in bv)
        for f in (suspect, clean):
            f.check_like(layout, "the base")
        extra = [(suspect, 1.0), (clean, -1.0)]
    rows = len(files) + (1 if bv else 0)
    stats = VectorStats(rows)
    tops = [TopMass(layout.numel) for _ in range(rows)]
    for group in tensor_groups(layout, rows + 2, budget_bytes):
        x = _vector_rows(base_file, files, group.names, extra)
        if bv is not None:
            x = torch.cat([x[: len(files)], x[len(files) :].sum(0, keepdim=True)])  # suspect − clean
        stats.add(x)
        for t, row in zip(tops, x):
            t.add(row)
    rep = stats.report(names + (["BV"] if bv else []))
    for v, t in zip(rep["vectors"], tops):
        v["top1pct_mass"] = t.share()
    out = {
        "base": str(base_file.path),
        "parameters": layout.numel,
        "task_vectors": rep["vectors"][: len(files)],
        "cosine": [row[: len(files)] for row in rep["cosine"][: len(files)]],
        "sign_agreement": rep["sign_agreement"],
    }
    if bv is not None:
        out["bv"] = {
            "suspect": bv[0],
            "clean": bv[1],
            **rep["vectors"][-1],
            "cosine_with": {n: rep["cosine"][-1][i] for i, n in enumerate(names)},
        }
    return out


class TopMass:
    """Share of the squared norm in the largest 1% of coordinates, streamed: keeps the running top-n."""

    def __init__(self, numel: int, share: float = 0.01):
        self.n = max(1, int(share * numel))
        self.top = torch.empty(0, dtype=torch.float64)
        self.total = 0.0

    def add(self, row: torch.Tensor) -> None:
        sq = row.double().pow(2)
        self.total += float(sq.sum())
        both = torch.cat([self.top, sq])
        self.top = both.topk(min(self.n, len(both))).values

    def share(self) -> float:
        return float(self.top.sum() / max(self.total, 1e-30))
