"""A world: one preset's base model, tasks, heads and fine-tuned models, all cached in the store.

Notebooks and the CLI talk to a `World`; it is the one place that knows how a preset's
pieces fit together, and every artifact it builds is keyed by the full config that made it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from bvlib import data
from bvlib.attacks.badnets import Poison, badnets_poison
from bvlib.errors import BVLibError
from bvlib.evaluation import evaluate, trigger_scores
from bvlib.models import ImageClassifier, build_classifier, create_clip, default_device, zeroshot_head
from bvlib.presets import BaseCheckpoint, Preset, _merge, load_preset, preset_names  # noqa: F401 (re-exported)
from bvlib.store import Store, config_key, file_sha256, load_state_dict
from bvlib.training import TrainConfig, finetune, pretrain_clip
from bvlib.triggers import PatchTrigger
from bvlib.weights import Layout, Weights

BASE_DIR = (
    Path(__file__).parent / "bases"
)  # pretrained mini bases shipped with the package (see `World.export_base`)
LAM_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5)
SCALE_GRID = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)  # the other methods' λ, chosen on val over fewer points
VALIDATED = ("task_arithmetic", "ties")  # the regime's methods: their λ curves on val and test (chapter 00)
SCALED = (
    "dare",
    "tall",
    "consensus",
    "tsv",
    "iso_c",
)  # the other methods: their λ chosen on val the same way
VERSION = 3  # bump to invalidate every stored artifact after a change in how they are made


def _paper_root() -> Path:
    root = os.environ.get("BVLIB_DATA_ROOT")
    if not root:
        raise BVLibError(
            "the paper preset reads the TA8 datasets from a local folder: set BVLIB_DATA_ROOT to it"
        )
    return Path(root)


class World:
    """The preset's models and tasks, built lazily and cached in `store`."""

    def __init__(
        self,
        preset: str | Mapping | Preset = "cpu",
        store: Store | None = None,
        device: str | torch.device | None = None,
        overrides: Mapping | None = None,
        progress: bool = True,
    ):
        self.preset = load_preset(preset, overrides)
        self.name = self.preset.name
        self.store = store or Store()
        self.device = torch.device(device) if device is not None else default_device()
        self.progress = progress
        self._tasks: dict[str, data.Task] = {}
        self._heads: dict[str, torch.Tensor] = {}
        self._frozen: ImageClassifier | None = None  # `classifier(frozen=True)`'s model
        self._curves: dict[str, dict] = {}
        self._labels: dict[tuple[str, str], torch.Tensor] = {}
        self.timings: dict[str, float] = {}

    @classmethod
    def from_files(
        cls,
        base: str | os.PathLike,
        model: str,
        folders: Mapping[str, str | os.PathLike],
        preset: str | Mapping = "paper",
        **kwargs,
    ) -> World:
        """A world over your own files: `base` a whole CLIP checkpoint of architecture `model` (an
        open_clip name; its text tower makes the zero-shot heads), one task per image folder
        ({name: folder in ImageFolder layout}, see `bvlib.data.load_folder_task`). Training
        settings (TBAR's fine-tuning) and the trigger size a defense searches for come from
        `preset`, the trigger scaled from the preset's image size to the model's."""
        import open_clip

        from bvlib.checkpoints import PREFIX, EncoderFile

        if not folders:
            raise BVLibError("give at least one task as an image folder")
        arch = open_clip.get_model_config(model)
        if arch is None:
            raise BVLibError(f"unknown model '{model}'; give an open_clip architecture name such as ViT-B-32")
        if EncoderFile(base).prefix != PREFIX:
            raise BVLibError(
                f"{base} holds an image encoder only; the defenses need the whole CLIP checkpoint of the "
                "base "
                "(its text tower makes the zero-shot heads of your tasks)"
            )
        cfg = load_preset(preset).to_dict()
        size = int(arch["vision_cfg"]["image_size"])
        trigger = cfg["badnets"]["trigger"]
        trigger["size"] = max(1, round(trigger["size"] * size / cfg["data"]["image_size"]))
        for key in ("base_checkpoint", "epochs", "corpus", "pretrain", "notebooks"):
            cfg.pop(key, None)
        cfg |= {
            "name": "own",
            "model": model,
            "pretrained": str(Path(base).expanduser().resolve()),
            "tasks": list(folders),
            "data": {
                "image_size": size,
                "seed": 0,
                "folders": {t: str(Path(f).expanduser().resolve()) for t, f in folders.items()},
            },
        }
        return cls(cfg, **kwargs)

    # tasks -------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self.preset.tasks)

    def check_task(self, name: str) -> str:
        if name not in self.task_names:
            raise BVLibError(
                f"unknown task '{name}' for preset '{self.name}'; choose one of: {', '.join(self.task_names)}"
            )
        return name

    def task(self, name: str) -> data.Task:
        self.check_task(name)
        if name not in self._tasks:
            d = self.preset.data
            if name in d.folders:
                self._tasks[name] = data.load_folder_task(name, d.folders[name], image_size=d.image_size)
            elif self.is_paper:
                self._tasks[name] = data.load_paper_task(
                    name, _paper_root(), image_size=d.image_size, split_seed=d.seed
                )
            else:
                self._tasks[name] = data.load_task(
                    name,
                    image_size=d.image_size,
                    max_train_per_class=d.max_train_per_class,
                    max_test_per_class=d.max_test_per_class,
                    seed=d.seed,
                )
        return self._tasks[name]

    @property
    def is_paper(self) -> bool:
        return self.preset.is_paper

    # base model ----------------------------------------------------------------------
    @property
    def shipped_base(self) -> BaseCheckpoint | None:
        """The preset's `base_checkpoint` (a file in bvlib/bases and its sha256), if it ships one."""
        return None if self.is_paper else self.preset.base_checkpoint

    @cached_property
    def base_config(self) -> dict:
        p = self.preset
        cfg = {
            "version": VERSION,
            "data_version": data.DATA_VERSION,
            "model": p.model,
            "pretrained": p.pretrained,
        }
        if self.is_paper and Path(p.pretrained).expanduser().is_file():
            # the bytes, not the path, make the base: a moved checkout or copied store keeps its keys
            cfg["pretrained"] = f"sha256:{file_sha256(Path(p.pretrained).expanduser())}"
        if self.shipped_base:
            cfg |= {"checkpoint_sha256": self.shipped_base.sha256, "image_size": p.data.image_size}
        elif (
            not self.is_paper
        ):  # pretrained here: the architecture's config (widths, block type) makes the base too
            cfg |= {
                "pretrain": p.pretrain.config(),
                "corpus": dict(p.corpus),
                "image_size": p.data.image_size,
                "corpus_seed": p.data.seed,
                "model_config": config_key(open_clip.get_model_config(p.model) or {}),
            }
        return cfg

    def _load_shipped_base(self, model) -> None:
        spec = self.shipped_base
        path = BASE_DIR / spec.file
        if not path.is_file():
            raise BVLibError(
                f"the preset's base model {path} is missing; rebuild it with `bvlib pretrain --preset "
                f"{self.name} --out {path}`"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != spec.sha256:
            raise BVLibError(
                f"{path} has sha256 {digest[:12]}…, the preset expects {spec.sha256[:12]}…: the file was "
                "changed; "
                "restore it from the repository or set the preset's base_checkpoint to the new hash"
            )
        state = {k: v.float() for k, v in load_state_dict(path).items()}
        model.load_state_dict(state)

    def export_base(self, path: str | os.PathLike) -> str:
        """Write the base (the whole CLIP, image tower in float32, the rest in float16) for shipping;
        returns its sha256. The text tower only makes the frozen heads, so half precision suffices."""
        state = {
            k: (v if k.startswith("visual.") else v.half()).contiguous()
            for k, v in self.clip.state_dict().items()
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
        return hashlib.sha256(path.read_bytes()).hexdigest()

    @cached_property
    def base_key(self) -> str:
        return config_key(self.base_config)

    @cached_property
    def _base(self):
        """(clip model, tokenizer): pretrained here on the mini corpus, or loaded from `pretrained`."""
        p = self.preset
        if self.is_paper:
            return create_clip(p.model, p.pretrained, device=self.device)
        with torch.random.fork_rng(devices=[]):  # a seeded init: torch's own default seed differs per process
            torch.manual_seed(p.pretrain.seed if p.pretrain else 0)
            model, tokenizer = create_clip(p.model, device=self.device)
        if self.shipped_base:
            self._load_shipped_base(model)
            return model.eval(), tokenizer

        def build():
            t = time.perf_counter()
            images, captions = data.pretraining_corpus(
                image_size=p.data.image_size, seed=p.data.seed, **p.corpus
            )
            cfg, train = self.base_config, p.pretrain  # a killed pretraining resumes from its last checkpoint
            stats = pretrain_clip(
                model,
                tokenizer,
                images,
                captions,
                train,
                device=self.device,
                progress=self.progress,
                resume=self.store.load_checkpoint("base", cfg),
                checkpoint_every=max(10, train.steps // 20),
                checkpoint=lambda state: self.store.save_checkpoint("base", cfg, state),
            )
            stats |= {"seconds": time.perf_counter() - t, "n_images": len(images)}
            self.timings["pretrain"] = stats["seconds"]
            return model.state_dict(), stats

        tensors, _ = self.store.cached("base", self.base_config, build)
        self.store.drop_checkpoint("base", self.base_config)
        model.load_state_dict(tensors)
        model.eval()
        return model, tokenizer

    @property
    def clip(self):
        return self._base[0]

    @property
    def tokenizer(self):
        return self._base[1]

    @cached_property
    def base_weights(self) -> Weights:
        """θ0: the pretrained image encoder as a flat vector."""
        return Weights.from_module(self.clip.visual)

    @property
    def layout(self) -> Layout:
        return self.base_weights.layout

    @property
    def patch_size(self) -> int:
        """Side of the image encoder's tokens in px (ViT patch size): where a trigger falls in its token."""
        size = getattr(self.clip.visual, "patch_size", None)
        return int(size[0] if isinstance(size, tuple) else size) if size else 0

    # heads and classifiers -----------------------------------------------------------
    def head(self, name: str) -> torch.Tensor:
        """The frozen zero-shot head of a task (cached)."""
        if name not in self._heads:
            task = self.task(name)
            cfg = {
                "base": self.base_key,
                "task": name,
                "classnames": task.classnames,
                "templates": task.templates,
            }
            build = lambda: (
                {
                    "head": zeroshot_head(
                        self.clip, self.tokenizer, task.classnames, task.templates, self.device
                    )
                },
                {},
            )  # noqa: E731
            tensors, _ = self.store.cached("head", cfg, build)
            self._heads[name] = tensors["head"].to(self.device)
        return self._heads[name]

    def classifier(
        self, name: str, weights: Weights | None = None, *, frozen: bool = False
    ) -> ImageClassifier:
        """Task `name`'s classifier with encoder weights `weights` (θ0 if None), its own copy of the
        encoder. `frozen=True` is for a pass that reads the weights and does not keep the model (a
        judgement, a trigger search): one encoder of the world, in eval mode without gradients, takes
        the weights in place: a copy of the encoder costs about 10 ms, a sixth of a 128-image test pass."""
        if not frozen:
            model = build_classifier(self.clip, self.head(name), self.preset.precision)
            if weights is not None:
                weights.load_into(model.encoder)
            return model.to(self.device)
        if self._frozen is None:
            self._frozen = build_classifier(self.clip, self.head(name), self.preset.precision).to(self.device)
        model = self._frozen
        (self.base_weights if weights is None else weights).load_into(model.encoder)
        model.head = self.head(name)
        return model.eval().requires_grad_(False)

    # fine-tuning -------------------------------------------------------------------------
    def train_config(self, name: str, **overrides) -> TrainConfig:
        cfg = self.preset.finetune
        epochs = self.preset.epochs.get(name)
        if epochs is not None:
            overrides = {"steps": math.ceil(epochs * len(self.task(name).train) / cfg.batch_size)} | overrides
        return dataclasses.replace(cfg, **overrides)

    def badnets(self, **overrides) -> Poison:
        """The preset's BadNets attack, with fields (or trigger fields) overridden."""
        spec = _merge(self.preset.badnets, overrides)
        return badnets_poison(spec)

    def data_fingerprint(self, name: str) -> str:
        """What a task's data *is*: the bundled data's version in the mini world, a digest of the
        files read under BVLIB_DATA_ROOT for the paper's tasks or in a task's own image folder."""
        from bvlib.data.paper import fingerprint

        folder = self.preset.data.folders.get(name)
        if folder is not None:
            return fingerprint(None, folder)
        return fingerprint(name, _paper_root()) if self.is_paper else data.DATA_VERSION

    def artifact_config(self, task: str | list[str], **fields) -> dict:
        """The config (hence the store key) of anything made from the base and task `task`'s data (or
        several tasks' data): the one place where keys get what they must cover (code version, base,
        data and its bytes, the precision of the passes)."""
        version = (
            self.data_fingerprint(task)
            if isinstance(task, str)
            else {t: self.data_fingerprint(t) for t in task}
        )
        return {
            "version": VERSION,
            "data_version": version,
            "base": self.base_key,
            "task": task,
            "data": self.preset.data.config(),
            "precision": self.preset.precision,
            **fields,
        }

    def _finetune_config(self, name: str, poison: Poison | None, cfg: TrainConfig) -> dict:
        return self.artifact_config(name, train=cfg.config(), poison=poison.config() if poison else None)

    def finetune_key(self, name: str, poison: Poison | None = None, **train_overrides) -> str:
        """The store key of a fine-tune (what `finetune` would load or build)."""
        return config_key(
            self._finetune_config(self.check_task(name), poison, self.train_config(name, **train_overrides))
        )

    def has_finetune(self, name: str, poison: Poison | None = None, **train_overrides) -> bool:
        """Whether `finetune` would load this fine-tune from the store rather than train it."""
        return self.store.has(
            "finetune",
            self._finetune_config(self.check_task(name), poison, self.train_config(name, **train_overrides)),
        )

    def finetune(self, name: str, poison: Poison | None = None, **train_overrides) -> Weights:
        """θ_t fine-tuned on task `name` (clean, or poisoned), from the store when it was made before."""
        self.check_task(name)
        cfg = self.train_config(name, **train_overrides)

        def build():
            t = time.perf_counter()
            kind = "badnets" if poison else "clean"
            model = self.classifier(name)
            weights = finetune(
                model,
                self.task(name).train,
                cfg,
                poison,
                device=self.device,
                desc=f"{kind} {name} seed {cfg.seed}",
                progress=self.progress,
            )
            self.timings[f"finetune/{name}/{kind}/{cfg.seed}"] = time.perf_counter() - t
            return {"flat": weights.flat}, {"layout": weights.layout.to_json()}

        tensors, meta = self.store.cached("finetune", self._finetune_config(name, poison, cfg), build)
        return Weights(tensors["flat"], Layout.from_json(meta["layout"])).to(self.device)

    # evaluation ------------------------------------------------------------------------
    def evaluate(
        self,
        name: str,
        weights: Weights | None = None,
        trigger: PatchTrigger | None = None,
        target: int | None = None,
        split: str = "test",
    ) -> dict[str, float]:
        """CA (and ASR with a trigger) of encoder `weights` (θ0 if None) on task `name`. Cached in the
        store (kind "evaluation") under the weights' digest, so a re-run of a chapter re-judges nothing."""
        return self._judged(evaluate, name, weights, trigger, target, split)

    def trigger_scores(
        self,
        name: str,
        weights: Weights | None,
        trigger: PatchTrigger,
        target: int,
        split: str = "test",
        images: int | None = None,
    ) -> dict[str, float]:
        """`bvlib.evaluation.trigger_scores` (ASR and the target's mean probability, one triggered
        pass, no clean one) of encoder `weights` (θ0 if None) on task `name`, stored as `evaluate`;
        on the split's first `images` images only if given (a cheap screen: the splits are shuffled)."""
        return self._judged(
            trigger_scores, name, weights, trigger, target, split, images, score="asr+target_prob"
        )

    def _judged(
        self,
        judge,
        name: str,
        weights: Weights | None,
        trigger: PatchTrigger | None,
        target: int | None,
        split: str,
        images: int | None = None,
        **key_fields,
    ) -> dict[str, float]:
        """`judge(classifier, split, trigger, target, device=...)` of encoder `weights` on task `name`
        (on the split's first `images` images if given), from the store (kind "evaluation") under the
        weights' digest, or judged and stored."""
        self.check_task(name)
        if images is not None:  # keyed only when given: whole-split entries keep their keys
            key_fields["images"] = int(images)
        if trigger is not None:  # the triggered pass sees the non-target images only (`data.outside`)
            key_fields["triggered"] = "non-target images"
        key = self.artifact_config(
            name,
            split=split,
            weights=None if weights is None else f"sha256:{weights.digest()}",
            trigger=trigger.config() if trigger is not None else None,
            target=target,
            **key_fields,
        )
        _, result = self.store.cached(
            "evaluation",
            key,
            lambda: (
                None,
                judge(
                    self.classifier(name, weights, frozen=True),
                    data.head(getattr(self.task(name), split), images),
                    trigger,
                    target,
                    device=self.device,
                ),
            ),
        )
        return result

    def judged_counts(self, name: str, target: int | None = None, split: str = "test") -> dict[str, int]:
        """How many images stand behind a CA ("acc") and an ASR for `target` ("asr": those whose label
        is not the target) on task `name`'s split: the n of their bootstrap intervals."""
        key = (name, split)
        if key not in self._labels:  # a Dataset split reads every image to give its labels: once
            part = getattr(self.task(name), split)
            self._labels[key] = (
                part.labels
                if isinstance(part, data.Split)
                else torch.tensor([int(part[i][1]) for i in range(len(part))])
            )
        labels = self._labels[key]
        return {"acc": len(labels), "asr": int((labels != target).sum()) if target is not None else 0}

    def evaluate_merged(
        self,
        weights: Weights,
        tasks: list[str] | None = None,
        attacked: str | None = None,
        trigger: PatchTrigger | None = None,
        target: int | None = None,
    ) -> dict[str, float]:
        """One merged encoder judged on every task (each with its own head): mean CA, per-task CA,
        and, for an attack on task `attacked`, that task's CA (BA) and the ASR there."""
        if trigger is not None and target is None:  # before any pass, not after eight of them
            raise BVLibError("ASR needs the target class as well as the trigger")
        tasks = list(tasks or self.task_names)
        accs = {t: self.evaluate(t, weights)["acc"] for t in tasks}
        out = {"mean_acc": sum(accs.values()) / len(accs), **{f"acc/{t}": a for t, a in accs.items()}}
        if (
            attacked is not None
        ):  # its CA from the clean pass above when it is among `tasks`, its ASR from one triggered pass
            acc = accs[attacked] if attacked in accs else self.evaluate(attacked, weights)["acc"]
            asr = (
                self.trigger_scores(attacked, weights, trigger, target)["asr"]
                if trigger is not None
                else float("nan")
            )
            out |= {"attacked_acc": acc, "asr": asr}
        return out

    def merge_curves(
        self,
        methods: tuple[str, ...] = VALIDATED,
        lams: tuple[float, ...] = LAM_GRID,
        tasks: list[str] | None = None,
    ) -> dict[str, dict]:
        """Is this world in the task-arithmetic regime? Each method merges the clean task vectors
        of `tasks` at every λ of `lams`; λ is chosen on the validation split (never the test split).

        Per method: `lams`, `val` and `test` mean-accuracy curves, `lam` (validated), `mean_acc`,
        `normalized_acc` (mean over tasks of merged / single fine-tuned accuracy, on test) and
        `acc` / `normalized` per task at the validated λ. Cached in the store.
        """
        tasks = list(tasks or self.task_names)
        cfg = {
            "version": VERSION,
            "base": self.base_key,
            "finetuned": {t: self.finetune_key(t) for t in tasks},
            "methods": list(methods),
            "lams": list(lams),
        }
        key = config_key(cfg)
        if key not in self._curves:  # merge_params asks for it on every merge: read the store once
            self._curves[key] = self.store.cached(
                "merge_curves", cfg, lambda: (None, self._merge_curves(methods, lams, tasks))
            )[1]
        return self._curves[key]

    def _merge_curves(self, methods, lams, tasks) -> dict[str, dict]:
        from bvlib.merging import merge

        finetuned = {t: self.finetune(t) for t in tasks}
        taus = [w - self.base_weights for w in finetuned.values()]
        single = {t: self.evaluate(t, w)["acc"] for t, w in finetuned.items()}
        out = {}
        for method in methods:
            unit = merge(taus, method, lam=1.0)  # both methods are linear in lam
            curves = {"val": [], "test": []}
            per_task = []
            for lam in lams:
                merged = self.base_weights + unit * lam
                val = {t: self.evaluate(t, merged, split="val")["acc"] for t in tasks}
                test = {t: self.evaluate(t, merged)["acc"] for t in tasks}
                curves["val"].append(sum(val.values()) / len(tasks))
                curves["test"].append(sum(test.values()) / len(tasks))
                per_task.append(test)
            best = max(range(len(lams)), key=lambda i: curves["val"][i])
            acc = per_task[best]
            normalized = {t: acc[t] / single[t] for t in tasks}
            out[method] = {
                "lams": list(lams),
                **curves,
                "lam": lams[best],
                "mean_acc": curves["test"][best],
                "normalized_acc": sum(normalized.values()) / len(tasks),
                "acc": acc,
                "normalized": normalized,
            }
        return out

    def merge_scales(
        self, methods: tuple[str, ...] = SCALED, lams: tuple[float, ...] = SCALE_GRID
    ) -> dict[str, dict]:
        """The scale λ of every other merging method, chosen on the validation split as task
        arithmetic's is (each method's other parameters at their published defaults): per method
        `lams`, the `val` curve, the chosen `lam` and the test `mean_acc` there. Every method is linear
        in λ, so one merge at λ = 1 gives the whole curve. Cached in the store."""
        from bvlib.merging import merge

        tasks = self.task_names
        cfg = {
            "version": VERSION,
            "base": self.base_key,
            "finetuned": {t: self.finetune_key(t) for t in tasks},
            "methods": list(methods),
            "lams": list(lams),
        }
        key = config_key(cfg)

        def build():
            taus = [self.finetune(t) - self.base_weights for t in tasks]
            out = {}
            for method in methods:
                unit = merge(taus, method, lam=1.0)
                val = [
                    sum(self.evaluate(t, self.base_weights + unit * lam, split="val")["acc"] for t in tasks)
                    / len(tasks)
                    for lam in lams
                ]
                best = max(range(len(lams)), key=lambda i: val[i])
                test = sum(
                    self.evaluate(t, self.base_weights + unit * lams[best])["acc"] for t in tasks
                ) / len(tasks)
                out[method] = {"lams": list(lams), "val": val, "lam": lams[best], "mean_acc": test}
            return None, out

        if key not in self._curves:
            self._curves[key] = self.store.cached("merge_scales", cfg, build)[1]
        return self._curves[key]

    def merge_params(self, method: str) -> dict:
        """The parameters every chapter merges with: λ chosen on validation data (on the clean task
        vectors of all the world's tasks) for every method that has one, as for task arithmetic."""
        if method in VALIDATED:
            return {"lam": self.merge_curves()[method]["lam"]}
        if method in SCALED:
            return {"lam": self.merge_scales()[method]["lam"]}
        return {}

    def card(self) -> list[dict]:
        """The world card: per task, sizes, zero-shot CA, clean CA, BadNets CA and ASR."""
        rows = []
        attack = self.badnets()
        for name in tqdm(self.task_names, desc=f"world {self.name}", disable=not self.progress):
            task = self.task(name)
            clean = self.finetune(name)
            backdoored = self.finetune(name, poison=attack)
            bd = self.evaluate(name, backdoored, attack.trigger, attack.target)
            rows.append(
                {
                    "task": name,
                    "n_classes": len(task.classnames),
                    "n_train": len(task.train),
                    "n_test": len(task.test),
                    "zeroshot_acc": self.evaluate(name)["acc"],
                    "clean_acc": self.evaluate(name, clean)["acc"],
                    "backdoor_clean_acc": bd["acc"],
                    "backdoor_asr": bd["asr"],
                }
            )
        return rows
