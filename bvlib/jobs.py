"""The expensive artifacts of a world as a list of jobs, built concurrently (local processes or Ray).

Every fine-tune is a store entry keyed by its config, so what a book or a grid needs can be listed
before any notebook runs (`world_jobs`, `grid_jobs`) and built by independent workers: each job
opens the world from its preset and builds its one entry into the shared store (atomic writes, a
lock per key: two workers asking for one entry leave one good file). The base comes first, in the
calling process, since every fine-tune starts from it. A failed job is reported with its config and
the others go on; a re-run builds only what is missing.

Workers run single-threaded: for models this small two one-thread processes on two cores beat one
two-thread process (`benchmarks/bench_jobs.py`). A fine-tune's bits depend on the thread count, so
artifacts built by workers equal each other across executors, and may differ in the last ulp from
one built by a multi-threaded process.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from bvlib.errors import BVLibError

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Job:
    """One fine-tune of a world: `task`, clean or with the preset's BadNets attack (fields of `attack`
    override it), with training overrides `train` (e.g. {"seed": 1})."""

    preset: Mapping  # the world's preset as a JSON-able dict (`Preset.to_dict()`)
    task: str
    attack: Mapping | None = None
    train: Mapping = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.train.items())
        return f"{self.task} {'badnets' if self.attack is not None else 'clean'}{extra}"

    def _args(self, world):
        return (self.task, world.badnets(**self.attack) if self.attack is not None else None), dict(
            self.train
        )

    def done(self, world) -> bool:
        args, train = self._args(world)
        return world.has_finetune(*args, **train)

    def run(self, world) -> None:
        args, train = self._args(world)
        world.finetune(*args, **train)


@dataclass(frozen=True)
class SceneJob:
    """The fine-tunes behind one member of an attack family of `bvlib.scenes.AttackedScene` on `task`
    (the attacker's model and the clean one of its seed; for BadMerging its trigger first): what the
    merging and defenses chapters share, built before they start so that neither waits on the other."""

    preset: Mapping
    task: str
    family: str
    seeds: tuple[int, ...]
    member: int

    @property
    def label(self) -> str:
        return f"{self.task} {self.family} {self.member + 1}/{len(self.seeds)}"

    def done(self, world) -> bool:
        return False  # a member already built only loads from the store

    def run(self, world) -> None:
        from bvlib.scenes import AttackedScene

        AttackedScene(world, self.task).member_bv(self.family, self.seeds, self.member)


def scene_jobs(
    world, tasks: Sequence[str], families: Sequence[str], seeds: Sequence[int] = (0, 1, 2)
) -> list[SceneJob]:
    """Every member of every family on every attacked task, the longest (BadMerging) first."""
    preset, seeds = world.preset.to_dict(), tuple(seeds)
    order = sorted(families, key=lambda f: f != "BadMerging")
    return [SceneJob(preset, t, f, seeds, i) for f in order for i in range(len(seeds)) for t in tasks]


def world_jobs(world, seeds: Sequence[int] = (0,)) -> list[Job]:
    """The world card's fine-tunes: per task and seed, a clean one and one with the preset's BadNets."""
    preset = world.preset.to_dict()
    train = [{} if s == world.preset.finetune.seed else {"seed": s} for s in seeds]
    return [Job(preset, t, attack, tr) for tr in train for t in world.task_names for attack in (None, {})]


_WORLDS: dict[str, object] = {}


def _run_job(job: Job | SceneJob, store_root: str) -> tuple[str, float]:
    """Build one job in this process (a pool or Ray worker); returns (label, seconds)."""
    import json

    import torch

    from bvlib.store import Store
    from bvlib.world import World

    torch.set_num_threads(1)
    key = json.dumps(job.preset, sort_keys=True) + store_root
    if key not in _WORLDS:  # a worker keeps its world: the base and the tasks are read once
        _WORLDS[key] = World(dict(job.preset), store=Store(store_root), device="cpu", progress=False)
    t = time.perf_counter()
    job.run(_WORLDS[key])
    return job.label, time.perf_counter() - t


def run_jobs(
    world,
    jobs: Sequence[Job | SceneJob],
    *,
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
) -> dict:
    """Build the jobs not yet in `world.store`, `workers` at a time (default: one per core).

    executor "local": a pool of single-threaded processes on this machine; "ray": Ray tasks of one
    CPU each, on the cluster at `address` (default: a local one started here). Workers write to
    `world.store`, which every worker must see (a shared filesystem on a cluster). Returns
    {"built": [(label, seconds)], "skipped": n, "failed": [(label, error line)], "seconds": wall}.
    """
    if executor not in EXECUTORS:
        raise BVLibError(f"unknown executor '{executor}'; choose one of: {', '.join(EXECUTORS)}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise BVLibError(f"workers must be at least 1, got {workers}")
    t0 = time.perf_counter()
    world.store.check_writable()
    world.base_weights  # noqa: B018 -- the base first, here: every fine-tune starts from it
    report = {"built": [], "skipped": 0, "failed": [], "seconds": 0.0}
    root = str(world.store.root.resolve())

    def finished(job: Job | SceneJob, outcome) -> None:
        if isinstance(outcome, BaseException):
            line = (str(outcome).strip().splitlines() or [type(outcome).__name__])[0][:200]
            report["failed"].append((job.label, line))
            print(
                f"job failed: {job.label} ({line}); config "
                f"{dict(job.preset.get('finetune', {})) | dict(getattr(job, 'train', {}))}",
                file=sys.stderr,
            )
        else:
            report["built"].append(outcome)
            if progress:
                print(
                    f"built {outcome[0]} in {outcome[1]:.1f} s ({len(report['built'])}/{len(todo)})",
                    flush=True,
                )

    todo = []
    for job in jobs:
        try:
            if job.done(world):
                report["skipped"] += 1
            else:
                todo.append(job)
        except BVLibError as e:  # a job that cannot be made (unknown task, bad attack) fails alone
            finished(job, e)
    if todo and executor == "local":
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no torch state forked into the workers
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
            futures = {pool.submit(_run_job, j, root): j for j in todo}
            for fut in as_completed(futures):
                finished(futures[fut], fut.exception() or fut.result())
    elif todo:
        _run_on_ray(todo, root, workers, address, finished)
    report["seconds"] = time.perf_counter() - t0
    return report


def _run_on_ray(
    todo: Sequence[Job | SceneJob], root: str, workers: int, address: str | None, finished
) -> None:
    try:
        import ray
    except ImportError:
        raise BVLibError("the ray executor needs Ray: pip install ray") from None
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address,
            num_cpus=None if address else workers,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"BVLIB_STORE": root, "OMP_NUM_THREADS": "1"}},
        )
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_run_job)
        pending = {remote.remote(j, root): j for j in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                outcome = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 -- a job's failure is reported, the others go on
                outcome = getattr(e, "cause", None) or e
            finished(job, outcome)
    finally:
        if started:
            ray.shutdown()
