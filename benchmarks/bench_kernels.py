"""The mini CLIP's passes with bvlib's kernels against open_clip's defaults, on one thread.

Every expensive artifact of a book is one of four passes of the image encoder: a fine-tuning step
(gradients to the weights), a trigger-search step (gradients to the pixels only), a test pass (no
gradients) and a DAM step (both, through a mask over the flat weights). Each runs with
    open_clip default    nn.MultiheadAttention blocks and an nn.Conv2d patchify
    bvlib                open_clip's own attention block ("block_type": "custom" in the mini
                         configs) and `bvlib.models.PatchEmbedding`, the patchify as a matmul
from the same weights, in the preset's precision, and also with the fused attention kernel where
a pass backpropagates. Prints ms per pass, the speed-up and the largest logit difference between
the two (rounding only: the same function). One thread, as the book's processes compute.
    python benchmarks/bench_kernels.py [--preset cpu] [--task mnist] [--repeats 10]
"""

import argparse
import contextlib
import time
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bvlib.defenses.dam import _run_dam
from bvlib.world import World


def default_encoder(world: World) -> nn.Module:
    """The world's encoder as open_clip builds it by default, holding the same weights."""
    import open_clip

    reference = open_clip.create_model(
        world.preset.model,
        vision_cfg={**open_clip.get_model_config(world.preset.model)["vision_cfg"], "block_type": "default"},
    ).visual
    state = world.classifier(world.task_names[0]).encoder.state_dict()
    reference.load_state_dict(state)
    return reference


def passes(world: World, task: str, encoder: nn.Module | None) -> tuple[dict, Callable]:
    """The three passes of `task`'s classifier (around `encoder`, default the world's) on one training
    batch, by name, and its test pass alone (for comparing logits)."""
    clf = world.classifier(task)
    if encoder is not None:
        clf.encoder = encoder
    split = world.task(task).train
    x, y = split.images[:128].float() / 255, split.labels[:128]
    params = list(clf.encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)

    def finetune_step():
        clf.train().requires_grad_(True)
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def trigger_step():
        clf.eval().requires_grad_(False)
        pixels = x.clone().requires_grad_(True)
        F.cross_entropy(clf(pixels), y).backward()

    def test_pass():
        clf.eval()
        with torch.no_grad():
            return clf(x)

    return {
        "fine-tuning step": finetune_step,
        "trigger step": trigger_step,
        "test pass": test_pass,
    }, test_pass


def timed(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t) / repeats)
    return 1e3 * best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--task", default="mnist")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = World(args.preset, progress=False)
    print(
        f"preset {world.name} ({world.preset.model}, {world.preset.precision}), one thread, batch 128, best "
        f"of 3 x {args.repeats}"
    )
    fused = mock.patch("bvlib.models.sdpa_kernel", lambda backend: contextlib.nullcontext())
    rows = {}
    ref_passes, ref_logits = passes(world, args.task, default_encoder(world))
    new_passes, new_logits = passes(world, args.task, None)
    diff = float((ref_logits() - new_logits()).abs().max())  # before any step moves the weights
    for name in ref_passes:
        rows[name] = [timed(ref_passes[name], args.repeats), timed(new_passes[name], args.repeats)]
        with fused:
            rows[name].append(timed(new_passes[name], args.repeats))
    names, reference, plain = world.task_names, default_encoder(world), world.classifier
    vectors = torch.stack([(world.finetune(t) - world.base_weights).flat for t in names])
    dam_args = dict(
        lam=0.2,
        steps=3,
        lr=1e-2,
        temperature=0.5,
        init=0.0,
        batch_size=16,
        adv_lr=1e-3,
        adv_weight=0.1,
        adapt_lam=True,
        final="expectation",
        seed=0,
        progress=False,
    )

    def dam_step():
        _run_dam(world, names, vectors, **dam_args)

    def with_default(task, weights=None):  # DAM builds its classifier itself
        clf = plain(task, weights)
        clf.encoder = reference
        return clf

    with mock.patch.object(world, "classifier", with_default):
        rows["DAM step (8 tasks)"] = [timed(dam_step, 1) / 3]
    rows["DAM step (8 tasks)"].append(timed(dam_step, 1) / 3)
    with fused:
        rows["DAM step (8 tasks)"].append(timed(dam_step, 1) / 3)
    print(
        f"{'pass':22} {'open_clip default':>18} {'bvlib':>9} {'speed-up':>9} {'bvlib, fused attention':>23}"
    )
    for name, (ref, new, fus) in rows.items():
        print(f"{name:22} {ref:15.1f} ms {new:6.1f} ms {ref / new:8.2f}x {fus:20.1f} ms")
    print(
        f"largest logit difference between the two on a batch: {diff:.3g} (logit scale "
        f"{world.classifier(args.task).logit_scale:.0f})"
    )
    with sdpa_kernel(SDPBackend.MATH):
        print(
            f"test pass with the math attention: {timed(new_passes['test pass'], args.repeats):.1f} ms "
            "(bvlib keeps the fused one there)"
        )
    patchify(world, args.repeats)


def patchify(world: World, repeats: int) -> None:
    """The patch embedding alone: nn.Conv2d against `PatchEmbedding` (same weight), forward and backward."""
    embed = world.classifier(world.task_names[0]).encoder.conv1
    conv = nn.Conv2d(embed.in_channels, embed.out_channels, embed.kernel_size, embed.stride, bias=False)
    conv.weight = embed.weight
    side = world.task(world.task_names[0]).test.images.shape[-1]
    x = torch.rand(128, 3, side, side)
    print(f"patch embedding ({embed.kernel_size[0]} px patches, batch 128): {'conv':>8} {'matmul':>8}")
    for what, needs_grad in (
        ("forward", None),
        ("backward to the weight", False),
        ("backward to the pixels", True),
    ):
        pixels = x.clone().requires_grad_(bool(needs_grad))

        def run(module, pixels=pixels, needs_grad=needs_grad):
            if needs_grad is None:
                with torch.no_grad():
                    module(pixels)
            else:
                module(pixels).sum().backward()

        times = [timed(lambda m=m: run(m), repeats) for m in (conv, embed)]
        print(f"  {what:24} {times[0]:6.2f} ms {times[1]:6.2f} ms  x{times[0] / times[1]:.2f}")


if __name__ == "__main__":
    main()
