"""Sequential fine-tunes against the job executor, on this machine's cores.

Builds the same K fine-tunes of a preset (its shipped or stored base, `--steps` each) three ways
into fresh temporary stores: in this process with torch's default threads (what `make book` does),
in this process with one thread, and with `bvlib.jobs.run_jobs` (local single-threaded workers).
Prints the wall times and the speed-up; also checks the executor's bits against the one-thread run.

    python benchmarks/bench_jobs.py                        # cpu preset, 4 fine-tunes of 100 steps, 2 workers
    python benchmarks/bench_jobs.py --executor ray --k 8
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--k", type=int, default=4, help="fine-tunes (clean and BadNets of the first k/2 tasks)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--executor", default="local")
    args = ap.parse_args()
    from bvlib.jobs import Job, run_jobs
    from bvlib.store import Store
    from bvlib.world import World

    src = World(args.preset, progress=False)
    src.base_weights  # noqa: B018 -- the base exists before any timing
    preset = src.preset.to_dict()
    tasks = src.task_names[: max(1, args.k // 2)]
    jobs = [Job(preset, t, a, {"steps": args.steps}) for t in tasks for a in (None, {})][: args.k]
    times, flats = {}, {}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sequential", "sequential_1_thread", "executor"):
            root = Path(tmp) / mode
            for kind in ("base", "head"):  # share what is not being measured
                if (src.store.root / kind).is_dir():
                    shutil.copytree(src.store.root / kind, root / kind)
            world = World(preset, store=Store(root), device="cpu", progress=False)
            world.base_weights  # noqa: B018
            for j in jobs:
                world.task(j.task)  # data loaded before the clock starts
            t = time.perf_counter()
            if mode == "executor":
                report = run_jobs(world, jobs, executor=args.executor, workers=args.workers, progress=False)
                assert not report["failed"], report["failed"]
            else:
                torch.set_num_threads(1 if mode.endswith("1_thread") else threads)
                for j in jobs:
                    j.run(world)
            times[mode] = time.perf_counter() - t
            flats[mode] = [
                world.finetune(j.task, world.badnets() if j.attack is not None else None, **j.train).flat
                for j in jobs
            ]
    torch.set_num_threads(threads)
    same = all(torch.equal(a, b) for a, b in zip(flats["executor"], flats["sequential_1_thread"]))
    print(
        f"{len(jobs)} fine-tunes of {args.steps} steps ({args.preset}), {os.cpu_count()} cores, torch "
        f"threads {threads}"
    )
    for mode, s in times.items():
        print(f"  {mode:22s} {s:7.1f} s   x{times['sequential'] / s:.2f} vs sequential")
    print(f"  executor bits equal the one-thread run: {same}")


if __name__ == "__main__":
    main()
