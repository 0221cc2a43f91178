"""Command line: `bvlib world | finetune | eval | merge | inspect | scan | pretrain | notebook | book`.

Errors are one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import json
import sys

from bvlib.errors import BVLibError


def _world(args):
    from bvlib.world import World

    return World(args.preset, overrides=_overrides(args.set))


def _json_or_text(raw: str):
    """A command-line value: JSON when it parses (numbers, lists, true), else the string itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _overrides(pairs: list[str] | None) -> dict:
    """--set KEY=VALUE, KEY dotted into the preset (finetune.seed=1), as nested preset overrides."""
    out: dict = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise BVLibError(
                f"--set takes KEY=VALUE with a dotted preset key, e.g. finetune.seed=1; got '{pair}'"
            )
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BVLibError(f"--set {pair}: '{part}' was already set to a value, not an object")
        node[parts[-1]] = _json_or_text(raw)
    return out


def _print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(k), *(len(fmt(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(fmt(r[k]).ljust(w) for k, w in zip(keys, widths)))


def cmd_world(args) -> None:
    world = _world(args)
    rows = world.card()
    curves = world.merge_curves()
    merge = {m: {k: c[k] for k in ("lam", "mean_acc", "normalized_acc")} for m, c in curves.items()}
    zeroshot = sum(r["zeroshot_acc"] for r in rows) / len(rows)
    finetuned = sum(r["clean_acc"] for r in rows) / len(rows)
    if args.json:
        print(
            json.dumps(
                {
                    "preset": world.name,
                    "model": world.preset.model,
                    "zeroshot_mean": zeroshot,
                    "finetuned_mean": finetuned,
                    "merge": merge,
                    "tasks": rows,
                },
                indent=1,
            )
        )
    else:
        print(
            f"world '{world.name}': {world.preset.model}, {world.layout.numel:,} encoder parameters, store "
            f"{world.store.root}"
        )
        _print_table(rows)
        print(
            f"mean zero-shot {zeroshot:.3f}, mean fine-tuned {finetuned:.3f}; merging the clean task vectors "
            "(λ on validation):"
        )
        _print_table([{"method": m, **v} for m, v in merge.items()])


def _attack(world, args):
    if not args.backdoor:
        given = [
            f"--{k.replace('_', '-')}"
            for k in ("trigger_size", "trigger_location", "target")
            if getattr(args, k) is not None
        ]
        if given:
            raise BVLibError(f"{', '.join(given)} only apply with --backdoor")
        return None
    trigger = {
        k: v
        for k, v in {"size": args.trigger_size, "location": args.trigger_location}.items()
        if v is not None
    }
    over = {"trigger": trigger} if trigger else {}
    if args.target is not None:
        n = world.task(world.check_task(args.task)).n_classes
        if not 0 <= args.target < n:
            raise BVLibError(
                f"--target {args.target} is out of range for task '{args.task}' with {n} classes (0..{n - 1})"
            )
        over["target"] = args.target
    return world.badnets(**over)


def cmd_finetune(args) -> None:
    from bvlib.store import check_output_path, save_state_dict

    if args.out:
        check_output_path(args.out)  # before training, not after
    world = _world(args)
    world.check_task(args.task)
    poison = _attack(world, args)
    seed = world.preset.finetune.seed if args.seed is None else args.seed
    if not world.has_finetune(args.task, poison, seed=seed):
        print(f"fine-tuning into store {world.store.root}", file=sys.stderr)
    weights = world.finetune(args.task, poison=poison, seed=seed)
    result = {"task": args.task, "seed": seed, "backdoor": bool(poison), **world.evaluate(args.task, weights)}
    if poison:
        result |= {"asr": world.evaluate(args.task, weights, poison.trigger, poison.target)["asr"]}
    if args.out:
        try:
            result["saved"] = str(save_state_dict(weights.state_dict(), args.out))
        except BVLibError:
            print(json.dumps(result))  # the result is still reported; the error names where the weights went
            raise
    print(json.dumps(result))


def cmd_eval(args) -> None:
    from bvlib.store import load_state_dict
    from bvlib.weights import Weights

    world = _world(args)
    weights = None
    if args.checkpoint:
        weights = (
            Weights.from_state_dict(load_state_dict(args.checkpoint), world.layout)
            .to(world.device)
            .check_finite(args.checkpoint)
        )
    attack = _attack(world, args)
    result = {
        "task": args.task,
        **world.evaluate(args.task, weights, *((attack.trigger, attack.target) if attack else ())),
    }
    print(json.dumps(result))


def _parse_params(pairs: list[list[str]]) -> dict:
    """-p name value pairs; values are read as JSON when they parse (numbers, lists, true), else strings."""
    return {key: _json_or_text(raw) for key, raw in pairs or []}


def cmd_notebook(args) -> None:
    from bvlib.book import execute, project_root

    root = project_root()
    params = {"preset": args.preset} | _parse_params(args.param)
    out = execute(args.name, root / "book", params, root)
    print(f"executed {out}; run `make html` (or `bvlib book --html-only`) to rebuild the pages")


def cmd_pretrain(args) -> None:
    from bvlib.world import World

    world = World(args.preset, overrides={"base_checkpoint": None})  # from scratch, whatever the preset ships
    if world.is_paper:
        raise BVLibError(
            "the paper preset starts from published weights; pretraining is for the mini presets"
        )
    digest = world.export_base(args.out)
    print(
        f'wrote {args.out} (sha256 {digest}); a preset ships it as "base_checkpoint": '
        f'{{"file": "<name in bvlib/bases>", "sha256": "{digest}"}}'
    )


def _param_pairs(pairs: list[str] | None) -> dict:
    """--param k=0.2 --param lam=0.3: values read as JSON when they parse (numbers, lists), else strings."""
    out = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise BVLibError(f"--param takes NAME=VALUE (e.g. --param lam=0.3), got {pair!r}")
        out[key] = _parse_params([[key, raw]])[key]
    return out


def _folders(pairs: list[str] | None) -> dict[str, str]:
    """--data NAME=FOLDER (repeatable) -> {NAME: FOLDER}."""
    out = {}
    for pair in pairs or []:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise BVLibError(f"--data takes NAME=FOLDER (e.g. --data ft_cars=cars_images), got {pair!r}")
        if name in out:
            raise BVLibError(f"--data gives the task '{name}' twice")
        out[name] = folder
    return out


def _check_defense(args, folders: dict[str, str]) -> dict[str, str]:
    """One line for a defense asked with the wrong inputs, before any file is read; returns the
    fine-tuned files DAM merges by task name."""
    from pathlib import Path

    if args.defense == "ibvs" and not args.defender_bv:
        raise BVLibError("--defense ibvs needs --defender-bv (a Backdoor Vector file)")
    if args.defender_bv and args.defense != "ibvs":
        raise BVLibError("--defender-bv only applies with --defense ibvs")
    if args.defense not in ("tbar", "dam"):
        if folders or args.model or args.defense_param:
            raise BVLibError("--data, --model and --defense-param only apply with --defense tbar or dam")
        return {}
    if not args.model:
        raise BVLibError(
            f"--defense {args.defense} runs the models: give their open_clip architecture with --model (e.g. "
            "ViT-B-32)"
        )
    by_stem = {Path(c).stem: c for c in args.checkpoints}
    if args.defense == "tbar":
        if len(folders) != 1:
            raise BVLibError(
                "--defense tbar cleans the merged model with one task's images: give exactly one --data "
                "NAME=FOLDER"
            )
        return {}
    if args.method != "task_arithmetic":
        raise BVLibError(
            "DAM learns a mask for task arithmetic: use --method task_arithmetic with --defense dam"
        )
    missing = sorted(set(by_stem) - set(folders))
    if missing or set(folders) - set(by_stem):
        bad = missing[0] if missing else sorted(set(folders) - set(by_stem))[0]
        raise BVLibError(
            f"--defense dam needs one --data NAME=FOLDER per checkpoint, NAME its file name without suffix "
            f"({', '.join(by_stem)}); '{bad}' " + ("has no folder" if missing else "is not a checkpoint")
        )
    return by_stem


def cmd_merge(args) -> None:
    from bvlib.checkpoints import defend_merge, merge_files
    from bvlib.store import check_output_path, save_state_dict

    check_output_path(args.out)  # before reading gigabytes
    folders = _folders(args.data)
    finetuned = _check_defense(args, folders)
    params = _param_pairs(args.param)
    state, report = merge_files(
        args.base,
        args.checkpoints,
        args.method,
        params=params,
        defender_bv=args.defender_bv,
        strength=args.strength,
    )
    if args.defense in ("tbar", "dam"):
        from bvlib.world import World

        world = World.from_files(args.base, args.model, folders, preset=args.preset, progress=False)
        state, report["defense"] = defend_merge(
            world,
            state,
            finetuned,
            args.defense,
            _param_pairs(args.defense_param),
            lam=float(params.get("lam", 1.0)),
        )
        report["defense"]["data"] = folders
    report["out"] = str(save_state_dict(state, args.out))
    if args.report:
        from pathlib import Path

        Path(args.report).write_text(json.dumps(report, indent=1))
    print(
        json.dumps(
            {k: report[k] for k in ("method", "params", "defense", "out")} | {"vectors": report["vectors"]}
        )
    )


def cmd_inspect(args) -> None:
    from bvlib.checkpoints import inspect_files

    report = inspect_files(args.base, args.checkpoints, bv=tuple(args.bv) if args.bv else None)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"base {report['base']}: {report['parameters']:,} image-encoder parameters")
    rows = [
        {
            "task vector": v["name"],
            "norm": v["norm"],
            "nonzero": v["nonzero_share"],
            "top1%_mass": v["top1pct_mass"],
        }
        for v in report["task_vectors"]
    ]
    _print_table(rows)
    names = [v["name"] for v in report["task_vectors"]]
    print("cosine of task vectors:")
    _print_table(
        [{"": n, **{str(j): row[j] for j in range(len(names))}} for n, row in zip(names, report["cosine"])]
    )
    sa = report["sign_agreement"]
    print(
        f"sign agreement: {sa['unanimous_share']:.3f} of the coordinates where 2+ task vectors are nonzero "
        "have one sign"
    )
    if "bv" in report:
        b = report["bv"]
        print(
            f"BV = {b['suspect']} − {b['clean']}: norm {b['norm']:.4g}, nonzero {b['nonzero_share']:.3f}, "
            f"top-1% mass {b['top1pct_mass']:.3f}; cosine with "
            + ", ".join(f"{n} {c:.3f}" for n, c in b["cosine_with"].items())
        )


def cmd_scan(args) -> None:
    from pathlib import Path

    from bvlib.defenses.scan import scan
    from bvlib.store import load_state_dict
    from bvlib.weights import Weights

    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise BVLibError(f"--json {args.json}: its folder does not exist")
    if args.base:  # your own files: a whole CLIP base, its architecture, the candidate, an image folder
        from bvlib.checkpoints import EncoderFile
        from bvlib.world import World

        if args.task or args.checkpoint:
            raise BVLibError("--task and --checkpoint are for a preset's world; with --base give CHECKPOINT")
        if not (args.model and args.data and args.candidate):
            raise BVLibError("bvlib scan --base CLIP needs --model ARCH, --data FOLDER and the CHECKPOINT")
        task = Path(args.data).resolve().name
        world = World.from_files(args.base, args.model, {task: args.data}, preset=args.preset, progress=False)
        f = EncoderFile(args.candidate)
        f.check_like(world.layout, "the base")
        weights, source = Weights(f.flat(world.layout.names), world.layout), args.candidate
    else:
        if args.candidate or args.model or args.data:
            raise BVLibError("CHECKPOINT, --model and --data go with --base; for a preset use --checkpoint")
        if not (args.task and args.checkpoint):
            raise BVLibError(
                "bvlib scan needs --task and --checkpoint (or --base, --model, --data CHECKPOINT)"
            )
        world = _world(args)
        task = world.check_task(args.task)
        state = load_state_dict(args.checkpoint)
        weights, source = Weights.from_state_dict(state, world.layout), args.checkpoint
    weights = weights.to(world.device).check_finite(source)
    reference = None
    if args.reference_bv:
        reference = Weights.from_state_dict(load_state_dict(args.reference_bv), world.layout).to(world.device)
    report = {"checkpoint": str(source)} | scan(
        world, weights, task, reference_bv=reference, threshold=args.threshold
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    for r in report["classes"]:
        r_line = (
            f"  class {r['class']:>3} {r['name'][:14]:<14} {r['patch']:<16} ASR {r['asr']:6.1%}  "
            f"base {r['base_asr']:6.1%}  excess {r['excess']:+6.1%}  index {r['index']:+6.1f}"
        )
        print(r_line)
    cal = report["calibration"]
    print(f"threshold {report['threshold']:g}: {cal['measured']}")
    print(report["line"])


def cmd_jobs(args) -> None:
    from bvlib.jobs import run_jobs, world_jobs

    world = _world(args)
    report = run_jobs(
        world,
        world_jobs(world, seeds=args.seeds),
        executor=args.executor,
        workers=args.workers,
        address=args.address,
    )
    print(
        json.dumps(
            {
                "built": len(report["built"]),
                "skipped": report["skipped"],
                "failed": report["failed"],
                "seconds": round(report["seconds"], 1),
            }
        )
    )
    if report["failed"]:
        raise BVLibError(
            f"{len(report['failed'])} job(s) failed; the others are stored, a re-run builds only what is "
            "missing"
        )


def cmd_book(args) -> None:
    from bvlib.book import build

    timings = build(
        args.preset,
        names=[] if args.html_only else None,
        parameters=_parse_params(args.param),
        workers=args.workers,
    )
    print(" ".join(f"{k}={v:.1f}s" for k, v in timings.items()))


def cmd_readme(args) -> None:
    from bvlib.book import project_root, readme_block, results_snapshot, write_readme

    root = project_root()
    snapshot_path = root / args.snapshot
    if args.from_snapshot:
        snapshot = json.loads(snapshot_path.read_text())
    else:
        snapshot = results_snapshot(root)
        snapshot_path.parent.mkdir(parents=True, exist_ok=True)
        snapshot_path.write_text(json.dumps(snapshot, indent=1, default=float) + "\n")
    changed = write_readme(root / "README.md", readme_block(snapshot))
    print(
        f"README.md {'updated' if changed else 'unchanged'} from {snapshot['commit']} "
        f"({snapshot_path.relative_to(root)})"
    )


def cmd_publish(args) -> None:
    from bvlib.book import publish

    commit = publish(branch=args.branch)
    print(
        f"the built book is on the local branch '{args.branch}' ({commit}); `git push origin {args.branch}` "
        "publishes it"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bvlib", description="Backdoor Vectors companion: build the mini world, fine-tune, evaluate."
    )
    from bvlib import __version__

    parser.add_argument("--version", action="version", version=f"bvlib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--preset", default="cpu", help="preset name (cpu, smoke, gpu, paper) or a JSON path")

    def with_overrides(p):
        common(p)
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a preset key (dotted; the value read as JSON when it parses), e.g. --set "
            "finetune.seed=1; repeatable",
        )

    p = sub.add_parser("world", help="build what is missing and print the world card")
    with_overrides(p)
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p.set_defaults(func=cmd_world)

    for name, func, text in (
        ("finetune", cmd_finetune, "fine-tune one model (cached)"),
        ("eval", cmd_eval, "evaluate encoder weights on a task"),
    ):
        p = sub.add_parser(name, help=text)
        with_overrides(p)
        p.add_argument("--task", required=True)
        p.add_argument(
            "--backdoor",
            action="store_true",
            help="use (finetune) or measure (eval) the preset's BadNets attack",
        )
        p.add_argument("--trigger-size", type=int)
        p.add_argument("--trigger-location")
        p.add_argument("--target", type=int)
        if name == "finetune":
            p.add_argument(
                "--seed", type=int, help="the fine-tune's seed (default: the preset's finetune.seed)"
            )
            p.add_argument(
                "--out",
                help="also write the encoder weights to this file (.safetensors, or .pt/.pth/.bin for torch)",
            )
        else:
            p.add_argument(
                "--checkpoint",
                help="image-encoder state_dict (.safetensors or a weights-only torch file); default θ0",
            )
        p.set_defaults(func=func)

    p = sub.add_parser(
        "pretrain",
        help="pretrain a mini preset's base from scratch and write it as a shippable safetensors file",
    )
    common(p)
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.set_defaults(func=cmd_pretrain)

    from bvlib.merging import METHODS

    p = sub.add_parser(
        "merge", help="merge your own fine-tuned open_clip image encoders (files), optionally defended"
    )
    p.add_argument(
        "checkpoints", nargs="+", help="fine-tuned checkpoints (.safetensors or weights-only torch files)"
    )
    p.add_argument("--base", required=True, help="the pretrained checkpoint they were fine-tuned from")
    p.add_argument("--method", default="task_arithmetic", choices=sorted(METHODS))
    p.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="a merging parameter, e.g. --param k=0.2 --param lam=0.3",
    )
    p.add_argument(
        "--defense",
        choices=["ibvs", "tbar", "dam"],
        help="ibvs: inject the defender's −BV into the merge (needs --defender-bv); tbar: unlearn a "
        "reverse-engineered "
        "trigger from the merge (one --data); dam: a masked task arithmetic learnt on unlabeled images (a "
        "--data "
        "per checkpoint); tbar and dam need --model",
    )
    p.add_argument("--defender-bv", help="the defender's Backdoor Vector file (θ_backdoored − θ_clean)")
    p.add_argument("--strength", type=float, default=1.0, help="IBVS strength (1: the merge's own scale)")
    p.add_argument(
        "--data",
        action="append",
        metavar="NAME=FOLDER",
        help="the defender's images of a task in ImageFolder layout (FOLDER/CLASS/IMAGE; class names from "
        "the folder "
        "names); for dam NAME is a checkpoint's file name without suffix",
    )
    p.add_argument(
        "--model",
        help="open_clip architecture of the checkpoints (e.g. ViT-B-32, mini-clip-w128-l4); the base must "
        "then be a whole CLIP checkpoint, its text tower makes the heads",
    )
    p.add_argument(
        "--preset",
        default="paper",
        help="training settings of tbar and the trigger size it searches for (default paper)",
    )
    p.add_argument(
        "--defense-param",
        action="append",
        metavar="NAME=VALUE",
        help="a tbar / dam parameter, e.g. steps=100",
    )
    p.add_argument(
        "--out", required=True, help="the merged checkpoint, in the base's key layout (.safetensors or .pt)"
    )
    p.add_argument(
        "--report", help="also write a JSON report (inputs and hashes, norms, cosines, sign agreement)"
    )
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="task-vector and Backdoor-Vector diagnostics of your own checkpoints")
    p.add_argument("checkpoints", nargs="+", help="fine-tuned checkpoints")
    p.add_argument("--base", required=True, help="the pretrained checkpoint they were fine-tuned from")
    p.add_argument(
        "--bv",
        nargs=2,
        metavar=("SUSPECT", "CLEAN"),
        help="a suspect and a clean model of one task: their BV",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "scan", help="is this fine-tuned checkpoint backdoored? a trigger search judged against the base's"
    )
    with_overrides(p)
    p.add_argument("candidate", nargs="?", help="with --base: the fine-tuned checkpoint to scan")
    p.add_argument("--task", help="a task of the preset's world (with --checkpoint)")
    p.add_argument("--checkpoint", help="the preset world's encoder weights to scan (.safetensors)")
    p.add_argument("--base", help="your own base: a whole CLIP checkpoint (its text tower makes the head)")
    p.add_argument("--model", help="with --base: its open_clip architecture, e.g. ViT-B-32")
    p.add_argument("--data", help="with --base: the task's images, FOLDER/CLASS/IMAGE (the folder names it)")
    p.add_argument("--reference-bv", help="a known Backdoor Vector file: its cosine is reported")
    p.add_argument("--threshold", type=float, help="anomaly index to flag at (default: the measured one)")
    p.add_argument("--json", help="also write the whole report to this JSON file")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser(
        "jobs",
        help="build the world's fine-tunes concurrently: local single-threaded processes or a Ray cluster",
    )
    with_overrides(p)
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument(
        "--workers", type=int, help="concurrent jobs (default: one per core; for ray, of a local cluster)"
    )
    p.add_argument("--address", help="ray: the address of a running cluster (its workers must see the store)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (default 0)")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser(
        "notebook", help="execute one notebook with papermill into book/ (parameters with -p NAME VALUE)"
    )
    p.add_argument("name", help="e.g. 00_world")
    common(p)
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"))
    p.set_defaults(func=cmd_notebook)

    p = sub.add_parser("book", help="execute every notebook with a preset, then build the HTML book")
    common(p)
    p.add_argument(
        "-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"), help="passed to every notebook"
    )
    p.add_argument("--html-only", action="store_true", help="only rebuild the HTML from book/*.ipynb")
    p.add_argument(
        "--workers",
        type=int,
        help="processes at a time, each with one thread: the world's fine-tunes, then the "
        "chapters (default: one per core; the book is the same for any number)",
    )
    p.set_defaults(func=cmd_book)

    p = sub.add_parser(
        "publish",
        help="put the built HTML (_build/html) on a local gh-pages branch (ghp-import; nothing is pushed)",
    )
    p.add_argument("--branch", default="gh-pages")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        "readme",
        help="write the README's results block from this build (book/results) and keep a snapshot of them",
    )
    p.add_argument(
        "--snapshot",
        default="benchmarks/results/book-cpu.json",
        help="where the build's results are kept (relative to the checkout)",
    )
    p.add_argument(
        "--from-snapshot",
        action="store_true",
        help="rewrite the block from the kept snapshot, not from book/results",
    )
    p.set_defaults(func=cmd_readme)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BVLibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
