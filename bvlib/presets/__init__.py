"""Presets: a world's whole recipe (model, base, tasks, data, training, attack), typed.

The JSON files beside this module are the presets a `World` runs, as open_clip keeps its model
configs. `load_preset` is the one reader: a name, a .json path, a dict or a `Preset`, with nested
overrides, into a `Preset`; any key it does not know, a missing one or a wrong type is one line
naming the preset and the key. Store keys are built from a preset's parts (`World.artifact_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bvlib.errors import BVLibError
from bvlib.models import PRECISIONS
from bvlib.training import TrainConfig

PRESET_DIR = Path(__file__).parent


@dataclass(frozen=True)
class DataSpec:
    """Where a world's images come from and how many: the mini world's caps, or your own folders."""

    image_size: int
    max_train_per_class: int | None = None
    max_test_per_class: int | None = None
    seed: int = 0
    folders: Mapping[str, str] = field(default_factory=dict)  # task -> image folder (`World.from_files`)

    def config(self) -> dict:
        """What store keys cover: the fields that are set; folders aside (their data is keyed by content)."""
        return {k: v for k, v in asdict(self).items() if v is not None and k != "folders"}


@dataclass(frozen=True)
class BaseCheckpoint:
    """A base model shipped in bvlib/bases (file name) and the sha256 it must have."""

    file: str
    sha256: str


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # an open_clip architecture (bvlib/model_configs for the mini ones)
    tasks: tuple[str, ...]
    data: DataSpec
    finetune: TrainConfig
    badnets: (
        Mapping  # the BadNets attack as `badnets_poison` reads it: trigger, target, rate, loss_weight, mode
    )
    description: str = ""
    pretrained: str | None = None  # an open_clip tag or a checkpoint file: the paper's protocol
    base_checkpoint: BaseCheckpoint | None = (
        None  # else the base is pretrained here with `pretrain` on `corpus`
    )
    corpus: Mapping = field(default_factory=dict)  # `CorpusMix` fields
    pretrain: TrainConfig | None = None
    epochs: Mapping[str, float] = field(default_factory=dict)  # per task: fine-tuning epochs instead of steps
    notebooks: Mapping[str, Mapping] = field(default_factory=dict)  # per notebook: its parameters
    precision: str = (
        "fp32"  # of every encoder pass (fp32, or bf16 autocast: `bvlib.models.encoder_precision`)
    )

    @property
    def is_paper(self) -> bool:
        """The base comes from `pretrained` (open_clip weights), not from the mini corpus."""
        return self.pretrained is not None

    def to_dict(self) -> dict:
        """The preset as its JSON file has it (what overrides apply to)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("data", "finetune", "pretrain", "base_checkpoint"):
            out[key] = None if out[key] is None else asdict(out[key])
        out["data"] = {
            k: v for k, v in out["data"].items() if v is not None and not (k == "folders" and not v)
        }
        out["tasks"] = list(self.tasks)
        return copy.deepcopy({k: v for k, v in out.items() if v is not None or k == "pretrained"})


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _merge(base: Mapping, overrides: Mapping) -> dict:
    """`base` with `overrides` applied, nested dicts merged key by key (a deep copy)."""
    out = copy.deepcopy(dict(base))
    for k, v in overrides.items():
        out[k] = (
            _merge(out[k], v)
            if isinstance(v, Mapping) and isinstance(out.get(k), Mapping)
            else copy.deepcopy(v)
        )
    return out


def _read(preset: str | Mapping | Preset) -> tuple[dict, str]:
    if isinstance(preset, Preset):
        return preset.to_dict(), preset.name
    if isinstance(preset, Mapping):
        return dict(preset), "given as a dict"
    path = PRESET_DIR / f"{preset}.json"
    if not path.exists() and Path(preset).suffix == ".json":
        path = Path(preset)
    if not path.exists():
        raise BVLibError(
            f"unknown preset '{preset}'; choose one of: {', '.join(preset_names())} or a .json path"
        )
    try:
        return json.loads(path.read_text()), str(preset)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BVLibError(f"preset {path} is not valid JSON ({e})") from None


def load_preset(preset: str | Mapping | Preset = "cpu", overrides: Mapping | None = None) -> Preset:
    """A preset by name (bvlib/presets/NAME.json), JSON path, dict or Preset, with nested overrides."""
    cfg, source = _read(preset)
    if not isinstance(cfg, Mapping):
        raise BVLibError(f"preset {source}: a preset is a JSON object")
    return parse_preset(_merge(cfg, overrides or {}), source)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _part(cls, value, key: str, source: str):
    """`cls(**value)`, or one line naming the preset, the key and what is wrong."""
    if not isinstance(value, Mapping):
        raise BVLibError(f"preset {source}: '{key}' must be a JSON object")
    extra = sorted(set(value) - _fields(cls))
    if extra:
        raise BVLibError(
            f"preset {source}: unknown key '{key}.{extra[0]}'; '{key}' takes: "
            f"{', '.join(sorted(_fields(cls)))}"
        )
    try:
        return cls(**value)
    except TypeError as e:  # a required field missing
        missing = str(e).rsplit(":", 1)[-1].strip().strip("'")
        raise BVLibError(f"preset {source}: the key '{key}.{missing}' is missing") from None


def parse_preset(cfg: Mapping, source: str = "given as a dict") -> Preset:
    """Check a preset's JSON object and type it (one line naming the preset and the key)."""
    from bvlib.attacks.badnets import badnets_poison
    from bvlib.data import CorpusMix

    unknown = sorted(set(cfg) - _fields(Preset))
    if unknown:
        raise BVLibError(
            f"preset {source}: unknown key '{unknown[0]}'; a preset has: {', '.join(sorted(_fields(Preset)))}"
        )
    needs = ["model", "tasks", "data", "finetune", "badnets"]
    if cfg.get("pretrained") is None and not cfg.get("base_checkpoint"):
        needs.append("pretrain")
    for key in needs:
        if key not in cfg:
            raise BVLibError(f"preset {source}: the key '{key}' is missing")
    tasks = cfg["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise BVLibError(f"preset {source}: 'tasks' must be a non-empty list of task names")
    data = _part(DataSpec, cfg["data"], "data", source)
    if not isinstance(data.image_size, int) or data.image_size < 8:
        raise BVLibError(f"preset {source}: 'data.image_size' must be an integer of at least 8")
    base = cfg.get("base_checkpoint")
    badnets = cfg["badnets"]
    if not isinstance(badnets, Mapping) or "trigger" not in badnets:
        raise BVLibError(f"preset {source}: the key 'badnets.trigger' is missing")
    try:
        badnets_poison(badnets)
    except (TypeError, ValueError) as e:
        raise BVLibError(f"preset {source}: 'badnets' is not an attack bvlib can run ({e})") from None
    for key in ("corpus", "epochs", "notebooks"):
        if not isinstance(cfg.get(key, {}), Mapping):
            raise BVLibError(f"preset {source}: '{key}' must be a JSON object")
    _part(
        CorpusMix, {k: v for k, v in cfg.get("corpus", {}).items() if k != "n_per_source"}, "corpus", source
    )
    precision = cfg.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise BVLibError(
            f"preset {source}: 'precision' must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    return Preset(
        name=str(cfg.get("name", "custom")),
        model=cfg["model"],
        tasks=tuple(tasks),
        data=data,
        finetune=_part(TrainConfig, cfg["finetune"], "finetune", source),
        badnets=copy.deepcopy(dict(badnets)),
        description=cfg.get("description", ""),
        pretrained=cfg.get("pretrained"),
        base_checkpoint=None if not base else _part(BaseCheckpoint, base, "base_checkpoint", source),
        corpus=dict(cfg.get("corpus", {})),
        pretrain=None
        if cfg.get("pretrain") is None
        else _part(TrainConfig, cfg["pretrain"], "pretrain", source),
        epochs=dict(cfg.get("epochs", {})),
        notebooks=dict(cfg.get("notebooks", {})),
        precision=precision,
    )
