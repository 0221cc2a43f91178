"""Time every merging method on K random task vectors against the memory floor and a naive reference.

The floor is reading the [K, D] stack once (`stack.sum(0)`); the naive reference is how merging code
is usually written (mlfoundations/task_vectors, the TIES and TSV repositories): Python loops over a
dict of per-layer tensors, and TIES with `torch.kthvalue` on each task's whole flattened vector.
`max|Δ|` is the largest difference between the two results (DARE's masks come from other RNG calls).

    python benchmarks/bench_merging.py                          # CPU: mini layout (ViT-B-32 at width 256,
    10M)
    python benchmarks/bench_merging.py --size vit-b-32 --device cuda
    python benchmarks/bench_merging.py --methods ties,sparse_backdoor_vector --repeats 5
"""

import argparse
import os
import statistics
import time

import torch

from bvlib.attacks.sbv import sparse_backdoor_vector
from bvlib.merging import METHODS, NOT_MATRICES, merge
from bvlib.weights import Layout, Weights

PARAMS = {  # the literature defaults, as in bvlib.merging
    "task_arithmetic": {"lam": 0.3},
    "ties": {"k": 0.2, "lam": 1.0},
    "dare": {"p": 0.9, "lam": 0.3},
    "tall": {"lam": 0.3, "tall_lambda": 0.4},
    "consensus": {"lam": 0.3, "k": 2, "tall_lambda": 0.4},
    "tsv": {"lam": 1.0},
    "iso_c": {"lam": 1.0},
}


def vit_layout(width: int, layers: int, patch: int = 32, image: int = 224, output_dim: int = 512) -> Layout:
    """Names and shapes of an open_clip ViT image encoder (width 768, 12 layers: ViT-B-32, 88M)."""
    tokens = (image // patch) ** 2 + 1
    shapes = {
        "class_embedding": (width,),
        "positional_embedding": (tokens, width),
        "proj": (width, output_dim),
        "conv1.weight": (width, 3, patch, patch),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
    }
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        shapes |= {
            b + "ln_1.weight": (width,),
            b + "ln_1.bias": (width,),
            b + "attn.in_proj_weight": (3 * width, width),
            b + "attn.in_proj_bias": (3 * width,),
            b + "attn.out_proj.weight": (width, width),
            b + "attn.out_proj.bias": (width,),
            b + "ln_2.weight": (width,),
            b + "ln_2.bias": (width,),
            b + "mlp.c_fc.weight": (4 * width, width),
            b + "mlp.c_fc.bias": (4 * width,),
            b + "mlp.c_proj.weight": (width, 4 * width),
            b + "mlp.c_proj.bias": (width,),
        }
    shapes |= {"ln_post.weight": (width,), "ln_post.bias": (width,)}
    return Layout(tuple(shapes), tuple(shapes.values()))


def vit_b_32_layout() -> Layout:
    """The real open_clip ViT-B-32 image encoder's layout (no weights are downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    layout = Layout.of(dict(open_clip.create_model("ViT-B-32", pretrained=None).visual.named_parameters()))
    assert layout == vit_layout(768, 12), "open_clip's ViT-B-32 changed: update vit_layout"
    return layout


SIZES = {
    "mini": lambda: vit_layout(256, 12),  # ViT-B-32's structure at width 256: 10.2M parameters
    "vit-b-32": vit_b_32_layout,
}


# naive references: per-key loops over dicts of per-layer tensors -----------------------------------
def naive_average(dicts, **_):
    return {n: sum(d[n] for d in dicts) / len(dicts) for n in dicts[0]}


def naive_task_arithmetic(dicts, lam, **_):
    return {n: lam * sum(d[n] for d in dicts) for n in dicts[0]}


def naive_ties(dicts, k, lam, **_):
    trimmed = []
    for d in dicts:
        flat = torch.cat([v.reshape(-1) for v in d.values()])
        n_keep = max(1, int(k * flat.numel()))
        thr = flat.abs().kthvalue(flat.numel() - n_keep + 1).values
        trimmed.append({n: torch.where(v.abs() >= thr, v, 0) for n, v in d.items()})
    elected = {n: torch.sign(sum(t[n] for t in trimmed)) for n in dicts[0]}
    majority = torch.sign(sum(e.sum() for e in elected.values()))
    out = {}
    for n, e in elected.items():
        e = torch.where(e == 0, majority, e)
        agree = [(t[n] * e > 0) for t in trimmed]
        total = sum(t[n] * a for t, a in zip(trimmed, agree))
        out[n] = lam * total / sum(a.float() for a in agree).clamp_min(1)
    return out


def naive_dare(dicts, p, lam, **_):
    out = {}
    for n in dicts[0]:
        out[n] = lam * sum(torch.bernoulli(torch.full_like(d[n], 1 - p)) * d[n] / (1 - p) for d in dicts)
    return out


def _naive_tall_masks(dicts, tall_lambda):
    total = {n: sum(d[n] for d in dicts) for n in dicts[0]}
    return total, [{n: d[n].abs() > (total[n] - d[n]).abs() * tall_lambda for n in d} for d in dicts]


def naive_tall(dicts, lam, tall_lambda, **_):
    _, masks = _naive_tall_masks(dicts, tall_lambda)
    return {n: lam * sum(d[n] * m[n] for d, m in zip(dicts, masks)) for n in dicts[0]}


def naive_consensus(dicts, lam, k, tall_lambda, **_):
    total, masks = _naive_tall_masks(dicts, tall_lambda)
    return {n: lam * total[n] * (sum(m[n].float() for m in masks) >= k) for n in dicts[0]}


def _is_matrix(name, v):
    return v.dim() == 2 and not any(tag in name for tag in NOT_MATRICES)


def naive_tsv(dicts, lam, **_):
    out, K = {}, len(dicts)
    for n, v0 in dicts[0].items():
        if not _is_matrix(n, v0):
            out[n] = lam * sum(d[n] for d in dicts) / K
            continue
        us, ss, vs = [], [], []
        for d in dicts:
            u, s, vh = torch.linalg.svd(d[n], full_matrices=False)
            r = max(1, int(len(s) / K))
            us.append(u[:, :r])
            ss.append(s[:r])
            vs.append(vh[:r])
        pu, _, qu = torch.linalg.svd(torch.cat(us, 1), full_matrices=False)
        pv, _, qv = torch.linalg.svd(torch.cat(vs, 0), full_matrices=False)
        out[n] = lam * torch.linalg.multi_dot([pu, qu, torch.diag(torch.cat(ss)), pv, qv])
    return out


def naive_iso_c(dicts, lam, **_):
    out = {}
    for n, v0 in dicts[0].items():
        total = sum(d[n] for d in dicts)
        if not _is_matrix(n, v0):
            out[n] = lam * total / len(dicts)
            continue
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        out[n] = lam * s.mean() * u @ vh
    return out


def naive_sbv(dicts, **_):
    out = {}
    for n in dicts[0]:
        s = torch.stack([d[n] for d in dicts])
        pos, neg = (s > 0).sum(0), (s < 0).sum(0)
        out[n] = s.mean(0) * ((pos == len(dicts)) | (neg == len(dicts)))
    return out


NAIVE = {name: globals()[f"naive_{name}"] for name in METHODS} | {"sparse_backdoor_vector": naive_sbv}


def timed(fn, device: torch.device, repeats: int, budget_s: float = 20.0) -> tuple[float, object, float]:
    """(median seconds over `repeats` runs after one warm-up, the result, the warm-up's seconds).

    The warm-up holds one-time costs (torch.compile of the fused GPU kernels, cuSOLVER's set-up); on
    CPU a warm-up over 2 s (SVDs) is itself the measurement: nothing is run again.
    """

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t0
    if first > 2.0 and device.type == "cpu":
        return first, out, first
    times = []
    for _ in range(max(1, min(repeats, int(budget_s / max(first, 1e-6))))):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out, first


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size", choices=list(SIZES), default=None, help="default: vit-b-32 on CUDA, mini on CPU"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default=",".join([*METHODS, "sparse_backdoor_vector"]))
    ap.add_argument("--k", type=int, default=8, help="number of task vectors")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-naive", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    size = args.size or ("vit-b-32" if device.type == "cuda" else "mini")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in NAIVE]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(NAIVE)}")

    layout = SIZES[size]()
    gen = torch.Generator(device=device).manual_seed(0)
    stack = torch.randn(args.k, layout.numel, generator=gen, device=device) * 1e-3
    vectors = [Weights(row, layout) for row in stack]
    dicts = [{n: v.clone() for n, v in w.state_dict().items()} for w in vectors]

    floor, _, _ = timed(lambda: stack.sum(0), device, max(args.repeats, 5))
    gbps = stack.numel() * stack.element_size() / floor / 1e9
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    print(
        f"{size}: K={args.k} × D={layout.numel / 1e6:.2f}M float32 on {device} ({where}), "
        f"torch {torch.__version__}"
    )
    print(f"floor = stack.sum(0), one read of the stack: {floor * 1e3:.1f} ms ({gbps:.0f} GB/s)\n")
    head = f"{'method':<24}{'merge ms':>10}{'× floor':>9}{'naive ms':>11}{'speed-up':>10}{'max|Δ|':>10}"
    print(head)
    print("-" * len(head))
    for name in methods:
        params = PARAMS.get(name, {})
        if name == "sparse_backdoor_vector":
            fast = lambda: sparse_backdoor_vector(stack)  # noqa: B023
        else:
            fast = lambda: merge(stack, name, layout=layout, **params)  # noqa: B023
        t, out, _ = timed(fast, device, args.repeats)
        row = f"{name:<24}{t * 1e3:>10.1f}{t / floor:>9.1f}"
        if not args.no_naive:
            tn, ref, _ = timed(lambda: NAIVE[name](dicts, **params), device, args.repeats)  # noqa: B023
            ref_flat = torch.cat([ref[n].reshape(-1) for n in layout.names])
            diff = "n/a" if name == "dare" else f"{(out - ref_flat).abs().max().item():.1e}"
            row += f"{tn * 1e3:>11.1f}{tn / t:>9.1f}×{diff:>10}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
