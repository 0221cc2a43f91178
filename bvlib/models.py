"""Models and heads: the open_clip factory (mini configs and real CLIPs) and zero-shot heads.

The classifier is the image encoder plus a frozen zero-shot head built from class names ×
prompt templates with the text encoder, as in the task-vector literature; only the image
encoder is fine-tuned, so task vectors and Backdoor Vectors live in its weight space.

The mini configs (model_configs/) ask for open_clip's own attention block ("block_type":
"custom": batch-first, PyTorch's scaled_dot_product_attention), the same function with the same
parameter names as nn.MultiheadAttention's blocks. With `PatchEmbedding` it fine-tunes 1.1x,
searches triggers 1.3x and runs DAM 1.2x faster on one CPU thread (`benchmarks/bench_kernels.py`).
The smoke config keeps open_clip's default block: its base is pretrained from scratch, and the
other block's initialisation would give the tests another tiny world.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bvlib.errors import BVLibError
from bvlib.store import load_state_dict

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


def default_device() -> torch.device:
    """BVLIB_DEVICE if set, else CUDA when available, else CPU."""
    name = os.environ.get("BVLIB_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def create_clip(name: str, pretrained: str | None = None, device: torch.device | str = "cpu"):
    """(model, tokenizer) for an open_clip architecture.

    `pretrained` is None (random init), a local checkpoint path (safetensors, or a torch file
    of tensors loaded with weights_only), or an open_clip tag such as "openai" (needs the hub).
    """
    if name not in open_clip.list_models():
        raise BVLibError(
            f"unknown model '{name}'; choose an open_clip model such as ViT-B-32 or one of: "
            + ", ".join(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))
        )
    local = pretrained is not None and (
        os.sep in pretrained or Path(pretrained).suffix in {".safetensors", ".pt", ".pth", ".bin"}
    )
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # open_clip warns that a model without `pretrained` is randomly initialised
    try:
        model = open_clip.create_model(name, pretrained=None if local else pretrained, device=device)
    except (
        OSError,
        RuntimeError,
        ValueError,
    ) as e:  # offline hub, unknown tag: a chained download traceback otherwise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise BVLibError(
            f"could not get the '{pretrained}' weights of {name} ({first}); offline, set the preset's "
            '"pretrained" to a local checkpoint file'
        ) from None
    finally:
        quiet.setLevel(level)
    _patchify_as_matmul(model.visual)
    if local:
        state = load_state_dict(pretrained)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise BVLibError(
                f"{pretrained} is not a {name} checkpoint: {len(missing)} parameters missing (e.g. "
                f"'{missing[0]}')"
            )
    model.eval()
    return model, open_clip.get_tokenizer(name)


class PatchEmbedding(nn.Conv2d):
    """A ViT's patchify convolution (kernel = stride, no padding, no bias) computed as one matmul over
    the image's patches: the same function, with the same parameter. On a CPU PyTorch's convolution
    kernels are slow at these shapes, above all to backpropagate to the pixels (trigger search, DAM's
    perturbations): at the mini world's 32 px, 8 px patches and batch 128 the matmul is 1.3-1.4x
    faster forward, 1.3-1.5x to the weights and 3.5-4x to the pixels (`benchmarks/bench_kernels.py`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (p, _), (b, c, h, w) = self.kernel_size, x.shape
        x = x[..., : h - h % p, : w - w % p]  # a convolution drops the remainder too
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        out = patches @ self.weight.reshape(self.out_channels, -1).T
        return out.transpose(1, 2).reshape(b, self.out_channels, h // p, w // p)


def _patchify_as_matmul(visual: nn.Module) -> None:
    """Swap a vision tower's patchify convolution (`conv1`, as open_clip names it) for `PatchEmbedding`."""
    conv = getattr(visual, "conv1", None)
    if (
        type(conv) is nn.Conv2d
        and conv.kernel_size == conv.stride
        and conv.kernel_size[0] == conv.kernel_size[1]
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is None
    ):
        embed = PatchEmbedding(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            bias=False,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        embed.weight = conv.weight
        visual.conv1 = embed


@torch.no_grad()
def zeroshot_head(
    model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[n_classes, embed_dim] unit-norm class embeddings averaged over templates."""
    weights = build_zero_shot_classifier(
        model, tokenizer, list(classnames), list(templates), num_classes_per_batch=None, device=device
    )
    return weights.T.contiguous()


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    """`precision` if bvlib knows it, else one line naming the choices."""
    if precision not in PRECISIONS:
        raise BVLibError(f"unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    return precision


@contextmanager
def encoder_precision(encoder: nn.Module, precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the next passes of `encoder` with its transformer blocks (`encoder.transformer`, else the
    whole encoder) in `precision`: "fp32" changes nothing; "bf16" is bf16 autocast with float32
    weights, optimiser and gradient accumulation. The blocks hold nearly all the work; the patch
    embedding, final norm and projection stay float32 at no measurable cost, so the features the
    head reads keep float32 precision. On a CPU with AMX this fine-tunes the mini CLIP 1.6x faster
    to the same loss and accuracy (`benchmarks/bench_precision.py`). There, passes that backpropagate
    take PyTorch's math attention, as the fused bf16 kernel's backward is 2.4x slower at the mini
    world's 17 tokens; passes without gradients keep the fused kernel, 1.2-1.3x faster than the
    math one (`benchmarks/bench_kernels.py`)."""
    if check_precision(precision) == "fp32":
        yield
        return
    blocks = getattr(encoder, "transformer", None)
    blocks = blocks if isinstance(blocks, nn.Module) else encoder
    device_type = torch.device(device).type
    stack = ExitStack()

    def enter(module, args):
        stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16))
        if device_type == "cpu" and torch.is_grad_enabled():
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))

    def leave(module, args, out):
        stack.close()
        return out.float() if isinstance(out, torch.Tensor) else out

    handles = [blocks.register_forward_pre_hook(enter), blocks.register_forward_hook(leave)]
    try:
        yield
    finally:
        stack.close()  # a pass that raised inside the blocks
        for handle in handles:
            handle.remove()


class ImageClassifier(nn.Module):
    """Image encoder + frozen zero-shot head. Takes float images in [0, 1]; normalises itself.

    Keeping normalisation inside lets triggers be pasted in pixel space. The encoder runs in
    `precision` (see `encoder_precision`) wherever the classifier is used (training, judging,
    trigger search, defenses); features and logits are float32.
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: torch.Tensor,
        logit_scale: float,
        mean: Sequence[float],
        std: Sequence[float],
        precision: str = "fp32",
    ):
        super().__init__()
        self.precision = check_precision(precision)
        self.encoder = encoder
        self.register_buffer("head", head.detach().clone())
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.logit_scale = float(logit_scale)

    def features(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The encoder's outputs, L2-normalised as the zero-shot head reads them (or raw)."""
        with encoder_precision(self.encoder, self.precision, images.device):
            out = self.encoder((images - self.mean) / self.std)
        return F.normalize(out, dim=-1) if normalize else out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.features(images) @ self.head.T


def build_classifier(clip_model, head: torch.Tensor, precision: str = "fp32") -> ImageClassifier:
    """An ImageClassifier around a *copy* of clip_model's image encoder."""
    import copy

    cfg = getattr(clip_model.visual, "preprocess_cfg", {}) or {}
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    scale = float(clip_model.logit_scale.detach().exp().clamp(max=100))
    encoder = copy.deepcopy(clip_model.visual)
    return ImageClassifier(encoder, head.to(next(encoder.parameters()).device), scale, mean, std, precision)
