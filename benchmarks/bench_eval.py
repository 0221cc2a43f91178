"""Time one test pass (the forward passes behind every CA and ASR) at several batch sizes.

A book build judges a few thousand (model, task) pairs, so the images per forward pass matter:
on a CPU, activations of a small batch stay in cache. Prints, per task and batch size, the best of
3 passes, the ratio to batch 1024 and whether the predictions equal those at the default
(`bvlib.evaluation.eval_batch_size`). Uses the world's clean fine-tunes (built if missing).
    python benchmarks/bench_eval.py [--preset cpu] [--tasks mnist letters]
"""

import argparse
import time

from bvlib.evaluation import eval_batch_size, predict
from bvlib.world import World

SIZES = (64, 128, 256, 512, 1024)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--tasks", nargs="*", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    world = World(args.preset, progress=False)
    default = eval_batch_size(world.device)
    print(f"preset {world.name}, device {world.device}, default eval batch {default}")
    print(f"{'task':10} {'images':>6} " + " ".join(f"{f'bs {b}':>9}" for b in SIZES) + "  same predictions")
    for task in args.tasks or world.task_names:
        model, split = world.classifier(task, world.finetune(task)), world.task(task).test
        reference, _ = predict(model, split, batch_size=default, device=world.device)
        seconds, same = {}, True
        for size in SIZES:
            runs = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                preds, _ = predict(model, split, batch_size=size, device=world.device)
                runs.append(time.perf_counter() - t)
            seconds[size], same = min(runs), same and bool((preds == reference).all())
        cells = " ".join(f"{seconds[b]:6.3f} s" + ("*" if b == default else " ") for b in SIZES)
        print(
            f"{task:10} {len(split):>6} {cells}  {same}  (1024 / {default}: "
            f"x{seconds[1024] / seconds[default]:.2f})"
        )
    print("* the default; times are one clean pass over the test split, best of", args.repeats)


if __name__ == "__main__":
    main()
