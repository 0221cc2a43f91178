"""Training loops: contrastive pretraining of the mini base, and (poisoned) fine-tuning.

Fine-tuning follows the task-vector protocol: frozen zero-shot head, AdamW, linear warm-up
then cosine decay, gradient clipping; the encoder runs in the classifier's precision (bf16
autocast of the transformer blocks in the presets, `bvlib.models.encoder_precision`). A BadNets poison pastes
a
trigger on part of each batch and relabels it to the target class. Any poison with a
`make_loss(classifier, seed)` method plugs into the same loop (BadMerging does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from tqdm import tqdm

from bvlib.data import Split, iterate_batches
from bvlib.errors import BVLibError
from bvlib.weights import Weights

if (
    TYPE_CHECKING
):  # attacks plug into the loop by interface (make_loss, trigger, target); no import at run time
    from bvlib.attacks.badnets import LossFn, Poison


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 30
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise BVLibError(f"steps and batch_size must be positive (got {self.steps}, {self.batch_size})")

    def config(self) -> dict:
        return asdict(self)


def _schedule(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _autocast(device: torch.device):
    """Pretraining's precision: bf16 autocast on CUDA."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _endless(split, batch_size: int, generator: torch.Generator):
    """Endless stream of shuffled (uint8 images, labels) batches, a fresh permutation each epoch."""
    while True:
        yield from iterate_batches(
            split, batch_size, shuffle=True, generator=generator, drop_last=len(split) >= batch_size
        )


def _image_hw(split) -> tuple[int, int]:
    images = split.images if isinstance(split, Split) else split[0][0]
    return tuple(images.shape[-2:])


def _to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).float().div_(255)


def clean_loss(classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on a clean batch."""
    return F.cross_entropy(classifier(x), y)


def finetune(
    classifier,
    split,
    cfg: TrainConfig,
    poison: Poison | None = None,
    device: torch.device | str = "cpu",
    desc: str = "finetune",
    progress: bool = True,
    loss_fn: LossFn | None = None,
) -> Weights:
    """Fine-tune `classifier.encoder` in place on a split of uint8 images; return its weights.

    The loss of each batch is `loss_fn(classifier, x, y)` (x float images in [0, 1] on the
    device), by default `poison.make_loss(classifier, cfg.seed)` for a poison (BadNets, or any
    attack with the same interface such as `bvlib.attacks.badmerging.BadMergingPoison`) and plain
    cross-entropy without one. A poison's trigger and target are checked either way.
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    classifier.to(device).train()
    params = [p for p in classifier.encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type in ("cpu", "cuda")
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    if poison is not None:
        poison.trigger.check_fits(*_image_hw(split))
        n_classes = classifier.head.shape[0]
        if not 0 <= poison.target < n_classes:
            raise BVLibError(
                f"target class {poison.target} is out of range for a task with {n_classes} classes"
            )
    if loss_fn is None:
        loss_fn = poison.make_loss(classifier, cfg.seed) if poison is not None else clean_loss
    stream = _endless(split, cfg.batch_size, g)
    for _ in tqdm(range(cfg.steps), desc=desc, leave=False, mininterval=2, disable=not progress):
        images, labels = next(stream)
        x, y = _to_float(images, device), labels.to(device)
        loss = loss_fn(classifier, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
    if not torch.isfinite(loss):
        raise BVLibError(f"fine-tuning diverged (loss {float(loss)}); lower the learning rate")
    classifier.eval()
    return Weights.from_module(classifier.encoder)


def pretrain_clip(
    model,
    tokenizer,
    images: torch.Tensor,
    captions: list[str],
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    max_shift: int = 2,
    progress: bool = True,
    resume: Mapping | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 250,
) -> dict[str, float]:
    """Contrastive (CLIP) pretraining in place on uint8 images and their captions.

    Light augmentation: a random shift of up to `max_shift` pixels per batch. Every
    `checkpoint_every` steps `checkpoint(state)` receives the whole training state; passing that
    state back as `resume` continues the run to bit-identical weights (the data stream is replayed).
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model.to(device).train()
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    tokens = tokenizer(unique).to(device)
    cap_ids = torch.tensor([index[c] for c in captions])
    mean = torch.tensor(model.visual.preprocess_cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"], device=device).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    loss_fn = ClipLoss()
    stream = _endless(Split(images, cap_ids), cfg.batch_size, g)
    losses, start = [], 0
    recent: list[torch.Tensor] = []  # this run's losses, on the device: no host sync per step

    def all_losses() -> list[float]:
        return losses + (torch.stack(recent).double().tolist() if recent else [])

    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        start, losses = int(resume["step"]), resume["losses"].tolist()
        for _ in range(start):  # replay the shuffles and shifts drawn so far
            next(stream)
            if max_shift:
                torch.randint(-max_shift, max_shift + 1, (2,), generator=g)
        torch.set_rng_state(resume["torch_rng"])
    for step in tqdm(
        range(start, cfg.steps),
        desc="pretrain",
        leave=False,
        mininterval=2,
        disable=not progress,
        initial=start,
        total=cfg.steps,
    ):
        if checkpoint is not None and step > start and step % checkpoint_every == 0:
            checkpoint(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "step": step,
                    "losses": torch.tensor(all_losses(), dtype=torch.float64),
                    "torch_rng": torch.get_rng_state(),
                }
            )
        batch, ids = next(stream)
        x = _to_float(batch, device)
        if max_shift:
            dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        with _autocast(device):
            img = model.encode_image((x - mean) / std, normalize=True)
            txt = model.encode_text(tokens[ids.to(device)], normalize=True)
            loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        recent.append(loss.detach())
    model.eval()
    last = all_losses()[-20:]
    return {"final_loss": sum(last) / len(last)}
