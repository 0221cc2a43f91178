"""Peak memory and time of `bvlib merge` on K checkpoint files, against the size of K models.

Writes a base and K fine-tuned image encoders of an open_clip architecture (random weights, nothing
downloaded) as safetensors into a temporary folder, runs `bvlib merge` on them in a fresh process and
reports its wall time and peak resident memory (ru_maxrss), next to what stacking the K task vectors
in memory would need.

    python benchmarks/bench_merge_files.py                               # ViT-B-32, K=8, ties
    python benchmarks/bench_merge_files.py --model ViT-L-14 --method task_arithmetic
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--method", default="ties")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bvlib.models import create_clip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        visual = {
            k: v.detach().contiguous() for k, v in create_clip(args.model)[0].visual.state_dict().items()
        }
        numel = sum(v.numel() for v in visual.values())
        save_file(visual, tmp / "base.safetensors")
        g = torch.Generator().manual_seed(0)
        files = []
        for i in range(args.k):
            save_file(
                {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in visual.items()},
                tmp / f"ft{i}.safetensors",
            )
            files.append(str(tmp / f"ft{i}.safetensors"))
        del visual
        cmd = [
            sys.executable,
            "-m",
            "bvlib.cli",
            "merge",
            "--base",
            str(tmp / "base.safetensors"),
            *files,
            "--method",
            args.method,
            "--out",
            str(tmp / "merged.safetensors"),
        ]
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        anon = file = 0
        while proc.poll() is None:  # the process's own memory (RssAnon) apart from the mapped files (RssFile)
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                break
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            anon = max(anon, int(fields.get("RssAnon", "0 kB").split()[0]))
            file = max(file, int(fields.get("RssFile", "0 kB").split()[0]))
            time.sleep(0.05)
        out, err = proc.communicate()
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(err)
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KiB -> GB
        model_gb = numel * 4 / 1e9
        print(
            f"{args.model}: {numel / 1e6:.0f}M parameters ({model_gb:.2f} GB fp32), K={args.k}, "
            f"{args.method}, "
            f"{torch.get_num_threads()} threads"
        )
        print(
            f"bvlib merge: {seconds:.1f} s; peak RSS {peak_gb:.2f} GB, of which the process's own memory "
            f"peaked at {anon / 1e6:.2f} GB "
            f"({anon / 1e6 / model_gb:.1f} models) and mapped checkpoint pages (reclaimable) at "
            f"{file / 1e6:.2f} GB; "
            f"the K task vectors stacked would be {args.k * model_gb:.2f} GB"
        )


if __name__ == "__main__":
    main()
