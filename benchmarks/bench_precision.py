"""Fine-tuning speed and quality of each precision policy, and the speed of a test pass.

bf16 autocast pays on CPUs with AMX (and on GPUs) if it lands on the right ops: this prints, per
policy, the time of a fine-tuning step, the training loss along the way, the test accuracy of the
fine-tune (from the same base, seed and batches) and the time of its test pass.
    fp32                    every pass in float32
    bf16 (blocks)           the shipped "bf16": the transformer blocks under bf16 autocast
    bf16 (whole pass)       the whole pass under bf16 autocast, projection and head included (as
                            bvlib's loop did on CUDA before precision was a preset setting)
    bf16 (blocks, fused)    the blocks in bf16 with PyTorch's fused attention kernel (CPU)
    python benchmarks/bench_precision.py [--preset cpu] [--tasks mnist letters] [--steps 60]
"""

import argparse
import dataclasses
import time
from contextlib import nullcontext
from unittest import mock

import torch
import torch.nn.functional as F

from bvlib.evaluation import evaluate
from bvlib.training import finetune
from bvlib.world import World

POLICIES = ("fp32", "bf16 (blocks)", "bf16 (whole pass)", "bf16 (blocks, fused)")


def run(world: World, task: str, policy: str, steps: int) -> dict:
    world.preset = dataclasses.replace(
        world.preset, precision="fp32" if policy in ("fp32", "bf16 (whole pass)") else "bf16"
    )
    model = world.classifier(task)
    losses = []
    whole = (
        torch.autocast(world.device.type, dtype=torch.bfloat16)
        if policy == "bf16 (whole pass)"
        else nullcontext()
    )

    def loss_fn(classifier, x, y):
        with whole:
            loss = F.cross_entropy(classifier(x).float(), y)
        losses.append(float(loss.detach()))
        return loss

    fused = (
        mock.patch("bvlib.models.sdpa_kernel", lambda backend: nullcontext())
        if "fused" in policy
        else nullcontext()
    )
    cfg = world.train_config(task, steps=steps, warmup_steps=max(1, steps // 10))
    with fused:
        t = time.perf_counter()
        finetune(model, world.task(task).train, cfg, device=world.device, progress=False, loss_fn=loss_fn)
        seconds = time.perf_counter() - t
        t = time.perf_counter()
        acc = evaluate(model, world.task(task).test, device=world.device)["acc"]
        eval_s = time.perf_counter() - t
    third = max(1, steps // 3)
    return {
        "ms_step": 1e3 * seconds / steps,
        "loss": [sum(losses[i : i + third]) / len(losses[i : i + third]) for i in (0, third, steps - third)],
        "acc": acc,
        "eval_s": eval_s,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--tasks", nargs="*", default=["mnist", "letters"])
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    world = World(args.preset, progress=False)
    print(
        f"preset {world.name}, device {world.device}, {torch.get_num_threads()} threads, {args.steps} "
        "fine-tuning steps"
    )
    print(
        f"{'task':8} {'policy':22} {'ms/step':>8} {'x fp32':>7}  {'loss (thirds of the run)':26} "
        f"{'test acc':>8} {'test pass':>9}"
    )
    for task in args.tasks:
        base = None
        for policy in POLICIES:
            r = run(world, task, policy, args.steps)
            base = base or r
            loss = " ".join(f"{v:.3f}" for v in r["loss"])
            print(
                f"{task:8} {policy:22} {r['ms_step']:8.1f} {base['ms_step'] / r['ms_step']:7.2f}  {loss:26} "
                f"{r['acc']:8.3f} "
                f"{r['eval_s']:7.3f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
