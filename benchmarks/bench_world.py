"""Time the mini world on this machine: data, pretraining, one fine-tune, evaluation.

Prints measured numbers; uses a fresh temporary store so nothing is reused.
    python benchmarks/bench_world.py [--preset cpu] [--device cpu|cuda]
"""

import argparse
import os
import tempfile
import time

import torch

from bvlib.store import Store
from bvlib.world import World


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BVLIB_CACHE"] = os.path.join(tmp, "data")
        world = World(args.preset, store=Store(tmp), device=args.device, progress=False)
        rows = []

        def timed(label, fn):
            t = time.perf_counter()
            out = fn()
            rows.append((label, time.perf_counter() - t))
            return out

        name = world.task_names[0]
        timed("load all tasks (cold)", lambda: [world.task(n) for n in world.task_names])
        timed("pretrain base (corpus + contrastive)", lambda: world.clip)
        timed("zero-shot heads", lambda: [world.head(n) for n in world.task_names])
        w = timed(
            f"one clean fine-tune ({name}, {world.preset.finetune.steps} steps)", lambda: world.finetune(name)
        )
        timed(f"one BadNets fine-tune ({name})", lambda: world.finetune(name, poison=world.badnets()))
        timed("evaluate CA + ASR on one task", lambda: world.evaluate(name, w, world.badnets().trigger, 0))
        cached = timed("the same fine-tune from the store", lambda: world.finetune(name))
        assert torch.equal(cached.flat.cpu(), w.flat.cpu())
    print(
        f"preset {world.name}, device {world.device}, torch {torch.__version__}, {torch.get_num_threads()} "
        "threads"
    )
    for label, s in rows:
        print(f"{label:<55s} {s:8.2f} s")
    steps = world.preset.finetune.steps
    print(f"{'fine-tune time per step':<55s} {rows[3][1] / steps * 1000:8.1f} ms")
    n_ft = 2 * len(world.task_names)
    est = rows[1][1] + n_ft * rows[3][1]
    print(f"estimated cold world build ({n_ft} fine-tunes + pretraining): {est / 60:.1f} min")


if __name__ == "__main__":
    main()
