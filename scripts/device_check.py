"""The GPU path in one prepared check (`make device-check`): writes one JSON of results and a table.

1. the CUDA-only tests;  2. merging 8 × 88M-parameter vectors (ViT-B-32's image encoder) in fp32 and
bf16 next to the memory floor (one read of the stack) and the naive kthvalue TIES;  3. fine-tuning
throughput of ViT-B-32 at 224 px, batch 128, bvlib's loop (bf16 autocast) against a plain fp32 loop;
4. the `paper` preset end to end on fabricated data (a random ViT-B-32 saved as safetensors, tiny TA8
folders), each stage timed;  5. the `gpu` preset's world card built cold (on random images of its
tasks' split sizes where the machine lacks the mini world's image sources: the time is the world's
compute, its accuracies mean nothing). Two probes for what is still slow: where DARE's time goes
(`dare`: its kernels and two candidate generators) and the gpu preset's time per step of each loop
next to the GPU's busy time in it (`steps`: the world's time predicted, host- or GPU-bound).

    python scripts/device_check.py                 # on a GPU: the real sizes
    python scripts/device_check.py --tiny          # on a CPU: every part at toy sizes (CI runs this)

Accuracies on random data mean nothing: parts 4 and 5 report times only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FUSED = ("ties", "tall", "consensus", "sparse_backdoor_vector")  # compiled into fused kernels on CUDA
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_stage(times: dict, label: str, fn, device: torch.device):
    """fn()'s result; its wall time (GPU work included) goes to times[label]."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    times[label] = time.perf_counter() - t0
    return out


def cuda_tests(tiny: bool) -> dict:
    """The tests that only run with CUDA (they skip on a CPU)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rf",
            "-p",
            "no:cacheprovider",
            "-k",
            "cuda",
            "tests/test_merging.py",
            "tests/test_world.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = proc.stdout.strip().splitlines() or [""]
    failed = [line[:300] for line in lines if line.startswith("FAILED")]
    if failed:
        print("\n".join(lines[-60:]), flush=True)
    return {"returncode": proc.returncode, "summary": lines[-1], "failed": failed}


def merge_bench(device: torch.device, tiny: bool, methods: tuple[str, ...] = ()) -> dict:
    """Each method's time at 8 × ViT-B-32 (fp32, bf16) next to the floor, and the naive kthvalue TIES."""
    from bench_merging import NAIVE, PARAMS, timed, vit_b_32_layout, vit_layout

    from bvlib.attacks.sbv import sparse_backdoor_vector
    from bvlib.merging import METHODS, dare_keys, merge
    from bvlib.weights import Weights

    layout = vit_layout(64, 2) if tiny else vit_b_32_layout()
    out = {"parameters": layout.numel, "k": 8}
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device=device).manual_seed(0)
        stack = (torch.randn(8, layout.numel, generator=gen, device=device) * 1e-3).to(dtype)
        floor, _, _ = timed(lambda: stack.sum(0), device, 5)  # noqa: B023
        tag = "fp32" if dtype == torch.float32 else "bf16"
        for name in [m for m in [*METHODS, "sparse_backdoor_vector"] if not methods or m in methods]:
            fn = (
                (lambda stack=stack: sparse_backdoor_vector(stack))
                if name == "sparse_backdoor_vector"
                else (
                    lambda stack=stack, name=name: merge(stack, name, layout=layout, **PARAMS.get(name, {}))
                )
            )
            t, _, first = timed(fn, device, 3)
            out.setdefault(name, {})[f"{tag}_ms"] = t * 1e3
            out[name][f"{tag}_first_ms"] = first * 1e3  # the first call: compiling the fused kernels
            out[name][f"{tag}_floor_ms"] = floor * 1e3
            out[name]["floor_ms"] = out[name].get("floor_ms", floor * 1e3)
            if name in FUSED:  # the same merge with the eager ops, for the fused kernels' gain
                os.environ["BVLIB_COMPILE"] = "0"
                out[name][f"{tag}_eager_ms"] = timed(fn, device, 3)[0] * 1e3
                del os.environ["BVLIB_COMPILE"]
        if dtype == torch.float32:
            out["ties_stages_ms"] = ties_stages(stack, device, timed)
            out["dare_keys_ms"] = timed(lambda: dare_keys(stack, 0, layout), device, 3)[0] * 1e3  # noqa: B023
            dicts = [{n: v.clone() for n, v in Weights(row, layout).state_dict().items()} for row in stack]
            t, _, _ = timed(lambda: NAIVE["ties"](dicts, **PARAMS["ties"]), device, 2)  # noqa: B023
            out["naive_ties_fp32_ms"] = t * 1e3
    return out


def ties_stages(stack: torch.Tensor, device: torch.device, timed) -> dict:
    """Where exact TIES (k 0.2) spends its time, stage by stage (ms): the exact threshold (sample, its
    sort or kthvalue, the fused bracket pass, the gather of the values inside it) and the fused merge."""
    from bvlib import merging

    K, D = stack.shape
    ms = {}

    def stage(name, fn):
        t, result, _ = timed(fn, device, 3)
        ms[name] = t * 1e3
        return result

    thresholds = stage("threshold", lambda: merging.ties_thresholds(stack, 0.2))
    stage("merge_columns", lambda: merging._ties_columns(stack, thresholds, True))
    stage("part_and_tail", lambda: merging.ties_part(stack, thresholds))
    gen = torch.Generator(device=device).manual_seed(0)
    cols = torch.randint(D, (1 << 20,), generator=gen, device=device)
    picked = stage("sample_gather", lambda: stack[:, cols].abs())
    stage("sample_sort", lambda: picked.sort(dim=1))
    stage("sample_kthvalue_x2", lambda: (picked.kthvalue(800_000, dim=1), picked.kthvalue(840_000, dim=1)))
    lo, hi = (picked.sort(dim=1).values[:, i : i + 1] for i in (836_000, 841_000))
    above, inside, n_in = stage("bracket", lambda: merging._bracket(stack, lo, hi, True))
    stage("gather_inside", lambda: stack[inside])
    return ms


def dare_probe(device: torch.device, tiny: bool) -> dict:
    """Where DARE's time goes (it is 4.1× the floor on both cards, and as slow in bf16 as in fp32, so
    the kernel is compute-bound): the kernels a profiler sees in one merge of 8 × ViT-B-32 (fp32),
    and two candidate generators timed beside the shipped one in this process (neither is in bvlib;
    the next session chooses from these numbers):
    - `counters_inside`: the same bits, the [D] int64 counters computed inside the kernel from the
      coordinate and its tensor's base (bucketize over the offsets) instead of built and read;
    - `hash32`: other bits, a 32-bit hash (lowbias32) of int32 counters, no 64-bit op at all."""
    from bench_merging import PARAMS, timed, vit_b_32_layout, vit_layout

    from bvlib import merging

    layout = vit_layout(64, 2) if tiny else vit_b_32_layout()
    p, lam = PARAMS["dare"]["p"], PARAMS["dare"]["lam"]
    K, D = 8, layout.numel
    stack = torch.randn(K, D, generator=torch.Generator(device=device).manual_seed(0), device=device) * 1e-3
    compile_ = torch.compile if device.type == "cuda" else (lambda fn: fn)
    out: dict = {"parameters": D, "k": K}
    shipped = lambda: merging.merge(stack, "dare", layout=layout, p=p, lam=lam)  # noqa: E731
    t, reference, _ = timed(shipped, device, 5)
    out["shipped_ms"] = t * 1e3
    keys, rows = merging.dare_keys(stack, 0, layout), merging.dare_row_offsets(K, device)
    starts = torch.tensor(layout.offsets, dtype=torch.int64, device=device)
    bases = keys[starts] - starts * merging._GOLDEN  # coordinate i of tensor t: bases[t] + i·golden

    @compile_
    def counters_inside(x, starts, bases, rows):
        i = torch.arange(x.shape[1], device=x.device, dtype=torch.int64)
        counters = bases[torch.bucketize(i, starts, right=True) - 1] + i * merging._GOLDEN
        return torch.where(merging.dare_uniform(counters, rows) >= p, x, 0.0).sum(0) * (lam / (1 - p))

    def logical_shift(x, s):
        return x.bitwise_right_shift(s).bitwise_and((1 << (32 - s)) - 1)

    def hash32_uniform(x, rows32):
        h = torch.arange(x.shape[1], device=x.device, dtype=torch.int32) + rows32
        h = h ^ logical_shift(h, 16)
        h = h * 0x7FEB352D
        h = h ^ logical_shift(h, 15)
        h = h * (0x846CA68B - (1 << 32))
        h = h ^ logical_shift(h, 16)
        return logical_shift(h, 8).to(torch.float32) * 2.0**-24

    @compile_
    def hash32(x, rows32):
        return torch.where(hash32_uniform(x, rows32) >= p, x, 0.0).sum(0) * (lam / (1 - p))

    rows32 = (torch.arange(K, device=device, dtype=torch.int32) * 0x3C6EF372).unsqueeze(1)
    candidates = {
        "counters_inside": lambda: counters_inside(stack, starts, bases, rows),
        "hash32": lambda: hash32(stack, rows32),
    }
    for name, fn in candidates.items():
        try:  # one candidate that fails to compile must not lose the other's numbers
            t, result, first = timed(fn, device, 5)
            out[name] = {
                "ms": t * 1e3,
                "first_ms": first * 1e3,
                "same_bits": bool(torch.equal(result, reference)),
            }
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    out["hash32"]["kept"] = float((hash32_uniform(stack[:, : 1 << 22], rows32) >= p).float().mean())
    floor, _, _ = timed(lambda: stack.sum(0), device, 5)
    out["floor_ms"] = floor * 1e3
    out["keys_ms"] = timed(lambda: merging.dare_keys(stack, 0, layout), device, 5)[0] * 1e3
    out["kernels"] = profiled_kernels(shipped, device)
    return out


def profiled_busy_ms(fn, device: torch.device) -> float:
    """Milliseconds the GPU (on a CPU: the ops) spent in one call of fn, summed over its kernels."""
    return sum(k["ms"] for k in profiled_kernels(fn, device, top=None))


def profiled_kernels(fn, device: torch.device, top: int | None = 8) -> list[dict]:
    """The `top` kernels (CPU ops on a CPU) of one call of fn, by their own time (ms). On a GPU only
    the device's own events count: each kernel's time is also booked to the op that launched it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if (e.device_type != DeviceType.CPU) == cuda]
    events = sorted(events, key=own, reverse=True)[:top]
    return [{"name": e.key[:100], "ms": own(e) / 1e3, "calls": e.count} for e in events if own(e) > 0]


def svd_bench(device: torch.device, tiny: bool) -> dict:
    """Seconds per matrix of the batched SVDs TSV-M and Iso-C run (ViT-B-32's shapes), by cuSOLVER driver,
    through the Gram matrix's eigh, and on the CPU: which one the per-layer methods should use."""
    from bvlib.merging import _svd, svd_errors

    shapes = [(4, 64, 32)] if tiny else [(16, 3072, 768), (16, 768, 768), (16, 768, 3072)]
    out = {}
    for b, m, n in shapes:
        x = torch.randn(b, m, n, device=device)
        runs = {
            "cpu": lambda x=x: torch.linalg.svd(x.cpu(), full_matrices=False),
            "eigh_gram": lambda x=x: torch.linalg.eigh(x.mT @ x),
        }
        if device.type == "cuda":
            runs |= {
                d: (lambda d=d, x=x: torch.linalg.svd(x, full_matrices=False, driver=d))
                for d in ("gesvdj", "gesvd", "gesvda")
            }
        runs["checked"] = lambda x=x: _svd(x)  # what TSV-M and Iso-C call: gesvda, checked, on CUDA
        row = {}
        for label, fn in runs.items():
            try:
                fn()
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                row[label] = (time.perf_counter() - t) / b
            except Exception as e:  # noqa: BLE001
                row[label] = f"{type(e).__name__}: {e}"[:120]
        if (
            device.type == "cuda"
        ):  # how exact gesvda is here (the checked SVD redoes a matrix past ~8·sqrt(m)·eps)
            u, sv, vh = (
                torch.linalg.svd(x, full_matrices=False, driver="gesvda") if m >= n else (None, None, None)
            )
            if u is not None:
                recon, orth = svd_errors(x, u, sv, vh)
                row["gesvda_max_rel_error"], row["gesvda_max_orth_error"] = (
                    float(recon.max()),
                    float(orth.max()),
                )
        out[f"{m}x{n}"] = row
    out["cpu_threads"] = torch.get_num_threads()
    return out


def best_rate(run, images: int, device: torch.device, repeats: int = 2) -> float:
    """Images/s of the best of `repeats` timed runs (a shared machine's hiccups only slow a run down)."""
    rates = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        run()
        sync(device)
        rates.append(images / (time.perf_counter() - t))
    return max(rates)


def finetune_bench(device: torch.device, tiny: bool) -> dict:
    """Images/s of bvlib's fine-tuning loop (the presets' "bf16": the transformer blocks under bf16
    autocast) and of a plain fp32 loop."""
    from bvlib.data import Split
    from bvlib.models import build_classifier, create_clip
    from bvlib.training import TrainConfig, finetune

    name, size, batch, steps = ("mini-clip-w64-l2", 32, 32, 6) if tiny else ("ViT-B-32", 224, 128, 60)
    model, _ = create_clip(name, device=device)
    head = torch.nn.functional.normalize(torch.randn(10, model.visual.output_dim, device=device), dim=-1)
    images = torch.randint(0, 256, (batch * 4, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch * 4,))
    split = Split(images, labels)
    result = {"model": name, "image_size": size, "batch": batch}

    clf = build_classifier(model, head, precision="bf16").to(device)
    finetune(clf, split, TrainConfig(steps=2, batch_size=batch), device=device, progress=False)  # warm-up
    result["bvlib_img_s"] = best_rate(
        lambda: finetune(
            clf, split, TrainConfig(steps=steps, batch_size=batch), device=device, progress=False
        ),
        steps * batch,
        device,
    )

    plain = build_classifier(create_clip(name, device=device)[0], head).to(device).train()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-5)
    x_all, y_all = images.to(device).float().div(255), labels.to(device)

    def step(i):
        x, y = x_all[(i % 4) * batch : (i % 4 + 1) * batch], y_all[(i % 4) * batch : (i % 4 + 1) * batch]
        loss = torch.nn.functional.cross_entropy(plain(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(0)
    result["plain_img_s"] = best_rate(lambda: [step(i) for i in range(steps)], steps * batch, device)
    result["ratio"] = result["bvlib_img_s"] / result["plain_img_s"]
    return result


def _fake_ta8(root: Path, size: int) -> list[str]:
    """Tiny MNIST (raw idx files) and EuroSAT (ImageFolder) in their torchvision layouts."""
    from PIL import Image

    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 200), ("t10k", 50)):
        for kind, arr, dims in (
            ("images-idx3", rng.integers(0, 256, (n, 28, 28)), (n, 28, 28)),
            ("labels-idx1", np.arange(n) % 10, (n,)),
        ):
            header = bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + np.asarray(arr, dtype=np.uint8).tobytes())
    for cls in ("AnnualCrop", "Forest", "River"):
        folder = root / "EuroSAT" / cls
        folder.mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return ["MNIST", "EuroSAT"]


def paper_dry_run(device: torch.device, tiny: bool) -> dict:
    """The paper preset's protocol on fabricated data: every stage runs, each timed."""
    from safetensors.torch import save_file

    from bvlib.defenses import ibvs_vector, merge_with_ibvs, tbar
    from bvlib.merging import merge
    from bvlib.models import create_clip
    from bvlib.store import Store
    from bvlib.weights import backdoor_vector
    from bvlib.world import World, load_preset

    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        name, size = ("mini-clip-w64-l2", 32) if tiny else ("ViT-B-32", 224)
        t = time.perf_counter()
        model, _ = create_clip(name)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "base.safetensors")
        tasks = _fake_ta8(tmp / "data", size)
        os.environ["BVLIB_DATA_ROOT"] = str(tmp / "data")
        times["fabricate_s"] = time.perf_counter() - t
        steps = 4 if tiny else 30
        preset = load_preset(
            "paper",
            {
                "model": name,
                "pretrained": str(tmp / "base.safetensors"),
                "tasks": tasks,
                "data": {"image_size": size},
                "finetune": {"steps": steps, "batch_size": 32, "warmup_steps": 2},
            },
        )
        preset = dataclasses.replace(preset, epochs={})  # steps, not the paper's epochs
        world = World(preset, store=Store(tmp / "store"), device=device, progress=False)

        def stage(label, fn):
            return timed_stage(times, label, fn, device)

        attack = world.badnets()
        clean = stage("finetune_clean_s", lambda: {t: world.finetune(t) for t in tasks})
        bad = stage("finetune_backdoored_s", lambda: world.finetune(tasks[0], poison=attack))
        bv = stage("bv_s", lambda: backdoor_vector(bad, clean[tasks[0]]))
        taus = [bad - world.base_weights] + [clean[t] - world.base_weights for t in tasks[1:]]
        merged = stage("merge_s", lambda: world.base_weights + merge(taus, "ties", lam=0.5))
        stage("evaluate_s", lambda: world.evaluate(tasks[0], merged, attack.trigger, attack.target))
        defender = stage("ibvs_vector_s", lambda: ibvs_vector(world, tasks[-1]))
        stage("ibvs_merge_s", lambda: merge_with_ibvs(taus, "ties", defender, 1.0, lam=0.5))
        stage(
            "tbar_s",
            lambda: tbar(world, merged, tasks[0], trigger=attack.trigger, target=attack.target, steps=steps),
        )
        times["bv_norm"] = bv.norm()
    times["total_s"] = sum(v for k, v in times.items() if k.endswith("_s"))
    return times


# (train, val, test) images per task of the gpu preset as the bundled sources give them (`_split_indices`
# before de-duplication), and its corpus's size (CorpusMix's defaults): the sizes a fabricated world uses
GPU_SPLITS = {
    "mnist": (3500, 500, 1000),
    "digits": (1259, 179, 359),
    "fashion": (6965, 994, 1989),
    "animals": (5449, 777, 1557),
    "housenumbers": (3500, 500, 1000),
    "fabric": (700, 100, 200),
    "letters": (5460, 780, 1560),
    "patterns": (2800, 400, 800),
}
GPU_CORPUS = 20_700
SMOKE_SPLITS, SMOKE_CORPUS = (
    {"mnist": (600, 100, 200), "fashion": (600, 100, 200), "patterns": (480, 80, 160)},
    2100,
)


@contextlib.contextmanager
def fabricated_mini_data(splits: dict[str, tuple[int, int, int]], corpus_size: int):
    """`load_task` and `pretraining_corpus` answered with random images of the given sizes (each task's
    class names and templates kept): the mini world's compute without its image sources."""
    from bvlib import data
    from bvlib.data.mini.registry import _spec

    g = torch.Generator().manual_seed(0)

    def images(n: int, size: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)

    def load_task(name, *, image_size=32, **_):
        spec = _spec(name)
        parts = {
            s: data.Split(images(n, image_size), torch.randint(0, len(spec.classnames), (n,), generator=g))
            for s, n in zip(("train", "val", "test"), splits[name])
        }
        return data.Task(name, list(spec.classnames), list(spec.templates), **parts)

    def pretraining_corpus(*, image_size=32, **_):
        names = [c for task in splits for c in _spec(task).classnames]
        return images(corpus_size, image_size), [
            f"a photo of {names[i % len(names)]}." for i in range(corpus_size)
        ]

    saved = data.load_task, data.pretraining_corpus
    data.load_task, data.pretraining_corpus = load_task, pretraining_corpus
    try:
        yield
    finally:
        data.load_task, data.pretraining_corpus = saved


def world_steps(device: torch.device, tiny: bool) -> dict:
    """Milliseconds per step of the gpu preset's three loops (its model, batch sizes and precision, on
    random images) and the GPU's busy milliseconds in each step: the world's time predicted from its
    step counts, and whether a loop waits on the host (kernel launches) rather than on the GPU."""
    from bvlib.data import Split
    from bvlib.evaluation import eval_batch_size, predict
    from bvlib.models import build_classifier, create_clip
    from bvlib.presets import load_preset
    from bvlib.training import finetune, pretrain_clip

    preset = load_preset("smoke" if tiny else "gpu")
    size, (few, more) = preset.data.image_size, ((2, 4) if tiny else (10, 40))
    model, tokenizer = create_clip(preset.model, device=device)
    batch = eval_batch_size(device)
    n = max(preset.pretrain.batch_size * 4, more * batch)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    captions = [f"a photo of thing {i % 100}." for i in range(n)]
    out = {
        "model": preset.model,
        "precision": preset.precision,
        "pretrain_steps": preset.pretrain.steps,
        "finetune_steps": preset.finetune.steps,
        "eval_batch_size": batch,
    }

    def per_step(label: str, run) -> None:
        """run(steps): its wall ms per step (between `few` and `more` steps: no set-up) and GPU ms.
        One untimed run first: the first call's compilation and allocator warm-up once fell into the
        `few` run alone and made the difference negative (pretraining: -24.8 ms on the H200)."""
        walls: dict = {}
        run(few)
        for steps in (few, more):
            timed_stage(walls, steps, lambda: run(steps), device)  # noqa: B023
        busy = profiled_busy_ms(lambda: run(few), device) / few
        out[label] = {"ms": (walls[more] - walls[few]) / (more - few) * 1e3, "gpu_busy_ms": busy}

    def pretrain_for(steps):
        pretrain_clip(
            model,
            tokenizer,
            images,
            captions,
            dataclasses.replace(preset.pretrain, steps=steps),
            device=device,
            progress=False,
        )

    per_step("pretrain", pretrain_for)
    head = torch.nn.functional.normalize(torch.randn(10, model.visual.output_dim, device=device), dim=-1)
    classifier = build_classifier(model, head, precision=preset.precision).to(device)
    split = Split(images, torch.randint(0, 10, (n,)))

    def finetune_for(steps):
        finetune(
            classifier,
            split,
            dataclasses.replace(preset.finetune, steps=steps),
            device=device,
            progress=False,
        )

    def evaluate_batches(steps):
        predict(classifier, Split(images[: steps * batch], split.labels[: steps * batch]), device=device)

    per_step("finetune", finetune_for)
    per_step("eval_batch", evaluate_batches)
    fits = 2 * len(preset.tasks)  # the card: a clean and a BadNets fine-tune per task
    training_ms = (
        preset.pretrain.steps * out["pretrain"]["ms"] + fits * preset.finetune.steps * out["finetune"]["ms"]
    )
    out["card_training_s"] = training_ms / 1e3
    return out


def gpu_world(
    device: torch.device, tiny: bool, fabricate: bool = False, on_stage=lambda partial: None
) -> dict:
    """The gpu preset's world card (and validated merge) built cold in a fresh store: seconds, and
    which data. A machine without the mini world's image sources builds it on fabricated images."""
    from bvlib import BVLibError
    from bvlib.store import Store
    from bvlib.world import World

    def build(data: str) -> dict:
        out = {"data": data[:300]}
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            world = World("smoke" if tiny else "gpu", store=Store(tmp), device=device, progress=False)
            for stage, fn in (
                ("pretrain_s", lambda: world.base_weights),
                ("card_s", world.card),
                ("merge_curves_s", world.merge_curves),
            ):
                out["running"] = stage
                on_stage(dict(out))  # into the JSON before each stage: a check cut short keeps how far it got
                timed_stage(out, stage, fn, device)
                print(f"  gpu world {stage} {out[stage]:.1f} s", flush=True)
            out.pop("running")
            out["total_s"] = time.perf_counter() - t
        return out

    reason = "asked for"
    if not fabricate:
        try:
            return build("the bundled image sources")
        except BVLibError as e:
            if "install" not in str(e):
                raise
            reason = str(e)
    with fabricated_mini_data(*((SMOKE_SPLITS, SMOKE_CORPUS) if tiny else (GPU_SPLITS, GPU_CORPUS))):
        return build(f"fabricated: random images of the tasks' split sizes ({reason})")


PARTS = {  # --skip name: (JSON key, function), in the order they run
    "tests": ("cuda_tests", cuda_tests),
    "merge": ("merge", merge_bench),
    "dare": ("dare_probe", dare_probe),
    "svd": ("svd_s_per_matrix", svd_bench),
    "finetune": ("finetune", finetune_bench),
    "paper": ("paper_dry_run", paper_dry_run),
    "steps": ("world_steps", world_steps),
    "world": ("gpu_world", gpu_world),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU, CI)")
    ap.add_argument(
        "--out", default=None, help="the JSON file (default benchmarks/results/device-<gpu>-<date>.json)"
    )
    ap.add_argument("--methods", default="", help="comma-separated merging methods to time (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: " + ",".join(PARTS))
    ap.add_argument(
        "--fabricated-world",
        action="store_true",
        help="build the world on random images even where its sources exist",
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    skip = set(filter(None, args.skip.split(",")))
    results = {
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tiny": args.tiny,
        "date": datetime.date.today().isoformat(),
    }
    slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    out = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / f"device-{slug}-{results['date']}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for part, (key, fn) in PARTS.items():
        if part in skip:
            continue
        t = time.perf_counter()
        try:
            if part == "tests":
                results[key] = fn(args.tiny)
            elif part == "merge":
                results[key] = fn(device, args.tiny, tuple(filter(None, args.methods.split(","))))
            elif part == "world":

                def partial(value, key=key, t=t):
                    results[key] = value | {"written_after_s": time.perf_counter() - t}
                    out.write_text(json.dumps(results, indent=1))

                results[key] = fn(device, args.tiny, args.fabricated_world, partial)
            else:
                results[key] = fn(device, args.tiny)
        except Exception as e:  # noqa: BLE001 -- one failed part must not lose the others' numbers
            results[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(f"{part}: {time.perf_counter() - t:.1f} s", flush=True)
        out.write_text(
            json.dumps(results, indent=1)
        )  # after each part: a check cut short keeps what it measured
    results["paper_dry_run_s"] = results.get("paper_dry_run", {}).get("total_s")
    results["gpu_world_s"] = results.get("gpu_world", {}).get("total_s")
    results["total_s"] = time.perf_counter() - t0
    out.write_text(json.dumps(results, indent=1))
    print(f"\n{gpu}, torch {torch.__version__}: results in {out}")
    merge_rows = {k: v for k, v in results.get("merge", {}).items() if isinstance(v, dict) and "fp32_ms" in v}
    for name, r in merge_rows.items():
        print(
            f"  {name:<24} fp32 {r.get('fp32_ms', float('nan')):8.2f} ms "
            f"({r.get('fp32_ms', 0) / max(r.get('fp32_floor_ms', 1e-9), 1e-9):4.1f}× floor)"
            f"   bf16 {r.get('bf16_ms', float('nan')):8.2f} ms"
        )
    stages = results.get("merge", {}).get("ties_stages_ms", {})
    if stages:
        print("  ties stages (fp32 ms): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    probe = results.get("dare_probe", {})
    if "shipped_ms" in probe:
        print(
            f"  dare probe (fp32 ms, floor {probe['floor_ms']:.2f}): shipped {probe['shipped_ms']:.2f} (keys "
            f"{probe['keys_ms']:.2f}),"
            f" counters inside {probe['counters_inside'].get('ms', float('nan')):.2f} (same bits: "
            f"{probe['counters_inside'].get('same_bits')}),"
            f" hash32 {probe['hash32'].get('ms', float('nan')):.2f} (kept {probe['hash32']['kept']:.4f})"
        )
        print("    kernels: " + "; ".join(f"{k['name'][:50]} {k['ms']:.2f} ms" for k in probe["kernels"][:4]))
    ft = results.get("finetune", {})
    if "ratio" in ft:
        print(
            f"  fine-tuning {ft['model']} {ft['image_size']} px: bvlib {ft['bvlib_img_s']:.0f} img/s, plain "
            f"fp32 {ft['plain_img_s']:.0f} img/s "
            f"({ft['ratio']:.2f}×)"
        )
    steps = results.get("world_steps", {})
    if "pretrain" in steps:
        print(
            f"  {steps['model']} ({steps['precision']}) ms per step, wall / GPU busy: "
            + ", ".join(
                f"{k} {steps[k]['ms']:.1f} / {steps[k]['gpu_busy_ms']:.1f}"
                for k in ("pretrain", "finetune", "eval_batch")
            )
            + f"; the card's training predicted {steps['card_training_s']:.0f} s"
        )
    print(
        f"  paper dry run {results['paper_dry_run_s']} s; gpu world {results['gpu_world_s']} s "
        f"({results.get('gpu_world', {}).get('data') or results.get('gpu_world', {}).get('error')}); cuda "
        f"tests {results.get('cuda_tests')}"
    )
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
