"""The book pipeline: notebooks/*.py (jupytext) -> papermill -> executed .ipynb -> jupyter-book HTML.

Notebooks are the source (text, in git); executed notebooks are build outputs. Every notebook
has a `parameters` cell, so any of them re-runs with new values from the command line.
The intro notebook is executed last (it summarises the others' recorded results) but is the
book's first page.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from bvlib.errors import BVLibError

INTRO = "intro"


def project_root() -> Path:
    """The checkout holding notebooks/ and _toc.yml (the current directory or a parent)."""
    for d in (Path.cwd(), *Path.cwd().parents):
        if (d / "notebooks").is_dir() and (d / "_toc.yml").exists():
            return d
    raise BVLibError("run this from the project checkout (a folder with notebooks/ and _toc.yml)")


def notebook_names(root: Path | None = None) -> list[str]:
    """Finding notebooks in order, the intro last."""
    root = root or project_root()
    names = sorted(p.stem for p in (root / "notebooks").glob("*.py"))
    return [n for n in names if n != INTRO] + ([INTRO] if INTRO in names else [])


def results_dir() -> Path:
    """Where notebooks record their headline numbers (read by the intro page)."""
    env = os.environ.get("BVLIB_RESULTS")
    return Path(env) if env else project_root() / "book" / "results"


def page_setup() -> None:
    """How the chapters print numbers: three significant decimals in tables, not pandas' six."""
    import pandas as pd

    pd.set_option("display.precision", 3)
    pd.set_option("styler.format.precision", 3)
    pd.set_option("display.width", 100)


@dataclass(frozen=True)
class Claim:
    """One claim of the paper as a chapter checks it: the claim in a sentence, what the paper reports
    (a number or a direction), what this book measured, and its verdict here.

    `verdict` is a word of `bvlib.stats.VERDICTS` ("holds", "fails", "inconclusive"), or a bool for a
    check of one configuration without an interval (True: "holds"). A replicated claim also says
    its `threshold` (stated before any number), the 95% `interval` of its statistic and the
    `replicates` behind it ("3 tasks × 1 seed").
    """

    claim: str
    paper: str
    ours: str
    verdict: str | bool
    threshold: str = ""
    interval: tuple[float, float] | None = None
    replicates: str = "1 configuration"

    def __post_init__(self):
        from bvlib.stats import VERDICTS

        v = self.verdict
        if not isinstance(v, str):  # numpy booleans from the comparisons
            v = "holds" if bool(v) else "fails"
        if v not in VERDICTS:
            raise BVLibError(f"a claim's verdict is one of {', '.join(VERDICTS)} or a bool, got {v!r}")
        object.__setattr__(self, "verdict", v)
        if self.interval is not None:
            object.__setattr__(self, "interval", tuple(float(x) for x in self.interval))

    @property
    def holds(self) -> bool:
        return self.verdict == "holds"


def judged_claim(
    claim: str,
    paper: str,
    units: list,
    stat,
    threshold: float,
    what: str,
    replicates: str,
    *,
    points: bool = True,
    note: str = "",
    empty: str = "no replicate to judge",
) -> Claim:
    """A replicated claim: `stat` of the replicates' rates (`bvlib.stats.interval`) must lie above
    `threshold`; the text says `what` with its interval, in points of a percentage unless not
    `points`, and the rule it is held to, stated as the chapter states it before any number."""
    from bvlib.stats import describe, interval, verdict

    unit, scale = (" points", 100) if points else ("", 1)
    rule = f"{what} > {scale * threshold:+g}{unit}"
    if not units:
        return Claim(claim, paper, empty, "inconclusive", rule, None, replicates)
    est, lo, hi = interval(units, stat)
    ours = f"{what} {describe(est, lo, hi, percent=points)}{unit}" + (f" ({note})" if note else "")
    return Claim(
        claim, paper, ours, verdict(lo, hi, threshold, replicates=len(units)), rule, (lo, hi), replicates
    )


def claims_frame(claims: list[Claim] | list[dict], chapter: bool = False):
    """The claims as a table for a page (the scoreboard's rows; `chapter` adds its column)."""
    import pandas as pd

    rows = [c if isinstance(c, dict) else _claim_dict(c) for c in claims]
    cols = (["chapter"] if chapter else []) + ["claim", "paper", "ours", "threshold", "verdict", "replicates"]
    frame = pd.DataFrame([{k: r.get(k, "") for k in cols} for r in rows], columns=cols)
    frame["verdict"] = [r.get("verdict") or ("holds" if r.get("holds") else "fails") for r in rows]
    return frame.rename(
        columns={
            "paper": "the paper",
            "ours": "this book",
            "threshold": "holds if",
            "replicates": "behind it",
        }
    )


def _claim_dict(c: Claim) -> dict:
    return asdict(c) | {"holds": c.holds}


def record(name: str, results: dict, claims: list[Claim] | None = None) -> Path:
    """Save a notebook's headline numbers (and the paper's claims it checked) as JSON for the intro page."""
    results = dict(results)
    if claims is not None:
        results |= {
            "claims_table": [_claim_dict(c) for c in claims],
            "claims_held": sum(c.holds for c in claims),
            "claims": len(claims),
            "verdicts": {v: sum(c.verdict == v for c in claims) for v in ("holds", "fails", "inconclusive")},
        }
    path = results_dir() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=float))
    return path


def recorded() -> dict[str, dict]:
    d = results_dir()
    return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))} if d.is_dir() else {}


def preset_parameters(name: str, preset) -> dict:
    """The notebook parameters a preset sets for notebook `name` (its "notebooks" entry, e.g. smaller sweeps
    for smoke)."""
    from bvlib.presets import load_preset

    return dict(load_preset(preset).notebooks.get(name, {}))


def notebook_parameters(name: str, root: Path | None = None) -> dict:
    """The names and default values of notebook `name`'s `parameters` cell."""
    import ast

    import jupytext

    root = root or project_root()
    nb = jupytext.read(_notebook_source(name, root))
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        return {}
    out = {}
    for stmt in ast.parse(cell.source).body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                out[stmt.targets[0].id] = ast.literal_eval(stmt.value)
            except ValueError:
                out[stmt.targets[0].id] = None
    return out


def _type_name(value) -> str:
    return (
        "a list"
        if isinstance(value, list)
        else {
            bool: "true/false",
            int: "an integer",
            float: "a number",
            str: "a string",
            dict: "a JSON object",
        }.get(type(value), type(value).__name__)
    )


def check_parameters(name: str, parameters: dict, root: Path | None = None) -> None:
    """Refuse, before anything runs, a parameter the notebook does not have, a name that is not an
    identifier (papermill pastes names into code), or a value whose type differs from the default's."""
    defaults = notebook_parameters(name, root)
    for key, value in parameters.items():
        if not (isinstance(key, str) and key.isidentifier()):
            raise BVLibError(f"parameter name {key!r} is not a Python identifier")
        if key not in defaults:
            raise BVLibError(f"notebook {name} has no parameter '{key}'; it has: {', '.join(defaults)}")
        default = defaults[key]
        if default is None:  # "None for the preset default": any value
            continue
        ok = isinstance(value, type(default)) and not (
            isinstance(value, bool) and not isinstance(default, bool)
        )
        ok = ok or (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise BVLibError(
                f"parameter '{key}' of notebook {name} takes {_type_name(default)} (default {default!r}), "
                f"got {value!r}"
            )


def _notebook_source(name: str, root: Path) -> Path:
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise BVLibError(f"give a notebook by name (e.g. 00_world), not a path: {name!r}")
    src = root / "notebooks" / f"{name}.py"
    if not src.exists():
        raise BVLibError(f"no notebook '{name}'; choose one of: {', '.join(notebook_names(root))}")
    return src


def execute(name: str, out_dir: Path, parameters: dict | None = None, root: Path | None = None) -> Path:
    """Execute notebooks/NAME.py with papermill into out_dir/NAME.ipynb.

    With a "preset" among the parameters, the preset's own parameters for this notebook come first
    (`preset_parameters`); the ones passed here override them.
    """
    import jupytext
    import papermill

    root = root or project_root()
    src = _notebook_source(name, root)
    parameters = dict(parameters or {})
    if "preset" in parameters:
        parameters = preset_parameters(name, parameters["preset"]) | parameters
    check_parameters(name, parameters, root)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.ipynb"
    running = running_dir(root)  # papermill saves the run there at every cell: `BuildProgress` reads it
    running.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as tmp
    ):  # the chapter in book/ is replaced only by a run that succeeded
        raw, executed = Path(tmp) / f"{name}.py.ipynb", running / f"{name}.ipynb"
        nb = jupytext.read(src)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        jupytext.write(nb, raw)
        try:
            papermill.execute_notebook(
                str(raw),
                str(executed),
                parameters=parameters,
                kernel_name="python3",
                cwd=str(root),
                progress_bar=False,
                log_output=False,
            )
        except papermill.PapermillExecutionError as e:
            failed = Path(tempfile.gettempdir()) / f"bvlib-failed-{name}.ipynb"
            shutil.copyfile(executed, failed)
            raise BVLibError(
                f"notebook {name} failed in cell {e.exec_count}: {e.ename}: {e.evalue} "
                f"(the chapter in {out_dir.name}/ is unchanged; the failed run is {failed})"
            ) from None
        _tidy(executed, intro=name == INTRO)
        shutil.move(executed, out)
    return out


def running_dir(root: Path) -> Path:
    """Where chapters being executed are saved cell by cell (under _build/, which the book ignores)."""
    return root / "_build" / "running"


class BuildProgress:
    """One live line while `make book` runs, on a terminal only: chapters done, each running
    chapter's cells done of its total (read from the run papermill saves at every cell), the time
    elapsed and, from the previous build's `_build/timings.json`, an estimate of what is left."""

    def __init__(self, root: Path, chapters: list[str], every: float = 2.0, stream=None):
        import threading

        self.root, self.chapters, self.every, self.stream = root, chapters, every, stream or sys.stdout
        self.done: set[str] = set()
        self.start = time.perf_counter()
        previous = root / "_build" / "timings.json"
        try:
            self.previous = float(json.loads(previous.read_text())["total_s"]) if previous.is_file() else None
        except (ValueError, KeyError, TypeError):
            self.previous = None
        self._stop, self._lock, self._width = threading.Event(), threading.Lock(), 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def cells(self, name: str) -> tuple[int, int] | None:
        """(cells done, cells) of a running chapter, None when it has not saved a run yet."""
        try:
            nb = json.loads((running_dir(self.root) / f"{name}.ipynb").read_text())
        except (OSError, ValueError):
            return None
        code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
        done = sum(c.get("metadata", {}).get("papermill", {}).get("status") == "completed" for c in code)
        return done, len(code)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        parts = [f"book: {len(self.done)}/{len(self.chapters)} chapters"]
        for name in self.chapters:
            if name not in self.done and (c := self.cells(name)) is not None:
                parts.append(f"{name[:2]} {c[0]}/{c[1]} cells")
        clock = f"{elapsed // 60:.0f}:{elapsed % 60:02.0f} elapsed"
        if self.previous:
            left = max(0.0, self.previous - elapsed)
            clock += f", ~{left // 60:.0f} min left (previous build {self.previous / 60:.0f} min)"
        return " | ".join(parts + [clock])

    def note(self, message: str) -> None:
        """A line of its own (a chapter done), above the live line."""
        with self._lock:
            print(
                ("\r" + message.ljust(self._width)) if self._width else message, file=self.stream, flush=True
            )

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            text = self.line()
            with self._lock:
                self.stream.write("\r" + text.ljust(self._width))
                self.stream.flush()
                self._width = len(text)
        with self._lock:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0

    def __enter__(self):
        if getattr(self.stream, "isatty", lambda: False)():  # CI logs get the plain per-chapter lines only
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


FOLD_LINES = 12  # code cells longer than this are folded behind a "show code" toggle on the page


def _tidy(path: Path, intro: bool = False) -> None:
    """What a reader sees: the parameter cells (and papermill's injected one) folded, or removed on
    the intro (prose only); set-up and other long code cells folded, unless tagged "show-input".
    Papermill's record of where the run was read and written (paths of the building machine) goes."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for key in ("input_path", "output_path"):
        nb.metadata.get("papermill", {}).pop(key, None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tags = set(cell.get("metadata", {}).get("tags", []))
        if tags & {"parameters", "injected-parameters"}:
            tags.add("remove-cell" if intro else "hide-input")
        elif len(cell.source.splitlines()) > FOLD_LINES and not tags & {
            "show-input",
            "remove-input",
            "remove-cell",
        }:
            tags.add("hide-input")
        if tags:
            cell.metadata["tags"] = sorted(tags)
    nbformat.write(nb, path)


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # read by torch when a kernel starts


@contextmanager
def _one_thread():
    """torch in this process and in the kernels it starts computes with one thread: a build's bits
    then do not depend on how many notebooks run beside each other (`build`'s `workers`)."""
    import torch

    saved_env, saved = {k: os.environ.get(k) for k in ONE_THREAD}, torch.get_num_threads()
    os.environ.update(ONE_THREAD)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _execute_timed(name: str, out_dir: Path, parameters: dict, root: Path) -> float:
    """`execute`, returning the seconds it took (pool workers inherit `_one_thread`'s environment)."""
    t = time.perf_counter()
    execute(name, out_dir, parameters, root)
    return time.perf_counter() - t


# The chapters by their expected time in a cold build (cpu preset, after the workers built the world's
# and the shared fine-tunes: 05 and 07 then hold most of the work), so that the longest does not start
# last; a fresh clone has no earlier build to ask.
LONGEST_FIRST = (
    "05_defenses",
    "07_scan",
    "02_similarity_transfer",
    "03_merging_resilience",
    "06_own_models",
    "04_inherent_triggers",
    "01_backdoor_vectors",
)


def _longest_first(names: list[str]) -> list[str]:
    """Chapters longest first (`LONGEST_FIRST`, then any other by name); the intro stays last (it
    reads the others' results)."""
    rank = {n: i for i, n in enumerate(LONGEST_FIRST)}
    chapters = sorted((n for n in names if n != INTRO), key=lambda n: (rank.get(n, len(rank)), n))
    return chapters + [n for n in names if n == INTRO]


def _execute_all(
    names: list[str],
    out_dir: Path,
    parameters: dict,
    root: Path,
    workers: int,
    timings: dict,
    meanwhile: Callable[[], None] = lambda: None,
) -> None:
    """Execute the chapters, `workers` at a time (the intro after all others), and `meanwhile()` in
    this process while they start; every chapter runs even if one fails, then the failures are
    raised in one error."""
    if workers <= 1:
        meanwhile()
        with BuildProgress(root, names) as progress:
            for name in names:
                progress.note(f"executing {name} (preset {parameters.get('preset')})")
                timings[name] = _execute_timed(name, out_dir, parameters, root)
                progress.done.add(name)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    failed = []
    chapters = [n for n in names if n != INTRO]
    with ProcessPoolExecutor(
        min(workers, max(1, len(chapters))), mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        futures = {pool.submit(_execute_timed, name, out_dir, parameters, root): name for name in chapters}
        print(
            f"executing {', '.join(chapters)} (preset {parameters.get('preset')}), {workers} at a time",
            flush=True,
        )
        with BuildProgress(root, chapters) as progress:
            meanwhile()
            for fut in as_completed(futures):
                name = futures[fut]
                progress.done.add(name)
                if fut.exception() is not None:
                    failed.append(f"{name}: {fut.exception()}")
                    progress.note(f"failed {name}")
                else:
                    timings[name] = fut.result()
                    progress.note(f"executed {name} in {timings[name]:.0f} s")
    if failed:
        raise BVLibError("; ".join(failed))
    if INTRO in names:
        timings[INTRO] = _execute_timed(INTRO, out_dir, parameters, root)


SHARED_BY = "03_merging_resilience"  # its attack families cover those of 05 and 07


def shared_jobs(world, root: Path) -> list:
    """The fine-tunes the merging, defenses and scan chapters share (every member of chapter 03's attack
    families on its attacked tasks, `bvlib.jobs.scene_jobs`), from that chapter's parameters for the
    world's preset: built by the workers before the chapters start, so that no chapter waits idle for
    another to finish them."""
    from bvlib.jobs import scene_jobs

    params = notebook_parameters(SHARED_BY, root) | preset_parameters(SHARED_BY, world.preset.to_dict())
    tasks = params.get("attacked_tasks") or world.task_names[:3]
    groups = params.get("seed_sets") or [[0]]
    return [job for seeds in groups for job in scene_jobs(world, tasks, params.get("families", []), seeds)]


def build(
    preset: str = "cpu",
    out_dir: Path | None = None,
    names: list[str] | None = None,
    html: bool = True,
    parameters: dict | None = None,
    workers: int | None = None,
) -> dict[str, float]:
    """Execute notebooks with `preset` into book/, then build the HTML; returns seconds per step.

    `workers` processes at a time (default: one per core) build the world card's fine-tunes
    (`bvlib.jobs`), then execute the chapters, longest first. Every process computes with one
    thread, `workers` = 1 too, so the book is the same whatever `workers` is."""
    root = project_root()
    out_dir = out_dir or root / "book"
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise BVLibError(f"workers must be at least 1, got {workers}")
    timings, start, cold, since = {}, time.perf_counter(), None, time.time()
    parameters = {"preset": preset, **(parameters or {})}
    with _one_thread():
        if (
            names is None
        ):  # build the world first, with progress bars; the notebooks then read it from the store
            from bvlib.jobs import run_jobs, world_jobs
            from bvlib.world import World

            t = time.perf_counter()
            world = World(preset)
            print(f"world '{world.name}': store {world.store.root}", flush=True)
            cold = not any(world.has_finetune(n) for n in world.task_names)
            if workers > 1:
                jobs = world_jobs(world) + (shared_jobs(world, root) if cold else [])
                timings["world/jobs"] = run_jobs(world, jobs, workers=workers)["seconds"]
            timings["world"] = time.perf_counter() - t

        # while the first chapters start; a chapter that needs them first waits for them
        def card_and_curves():
            t = time.perf_counter()
            world.card()
            world.merge_curves()  # the validated λ every merging chapter uses
            world.merge_scales()
            timings["world/card"] = time.perf_counter() - t
            for key, seconds in world.timings.items():  # pretrain, finetune/TASK/KIND/SEED
                stage = "world/" + ("/".join(key.split("/")[::2]) if key.startswith("finetune/") else key)
                timings[stage] = timings.get(stage, 0.0) + seconds

        todo = names if names is not None else notebook_names(root)
        _execute_all(
            _longest_first(todo) if workers > 1 else todo,
            out_dir,
            parameters,
            root,
            workers,
            timings,
            card_and_curves if names is None else lambda: None,
        )
    if html:
        t = time.perf_counter()
        index = build_html(root)
        timings["html"] = time.perf_counter() - t
        print(f"book: {index}")
    if names is None:  # a later build compares itself with this one
        path = root / "_build" / "timings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "preset": preset,
                    "total_s": time.perf_counter() - start,
                    "cold": cold,
                    "workers": workers,
                    "stages": {k: round(v, 2) for k, v in timings.items()},
                    "built": world.store.built_since(since),
                },
                indent=1,
            )
        )
    return timings


def publish(root: Path | None = None, branch: str = "gh-pages") -> str:
    """Put the built HTML (_build/html) on a local `branch` with ghp-import, as jupyter-book's
    documentation recommends, without pushing: `git push origin gh-pages` publishes it. Returns the
    branch's new commit."""
    root = root or project_root()
    html = root / "_build" / "html"
    if not (html / "index.html").is_file():
        raise BVLibError(f"no built book in {html}: run `make book` first")
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True)  # noqa: E731
    head = git("rev-parse", "--short", "HEAD").stdout.strip()
    if not head:
        raise BVLibError(f"{root} is not a git checkout with a commit: the book is published from one")
    tool = Path(sys.executable).with_name("ghp-import")
    proc = subprocess.run(
        [str(tool), "--no-jekyll", "--branch", branch, "--message", f"book of {head}", str(html)],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise BVLibError(
            "ghp-import failed: " + ((proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"])[-1]
        )
    return git("rev-parse", "--short", branch).stdout.strip()


def build_html(root: Path) -> Path:
    """jupyter-book (v1) build of the executed notebooks under `root`; returns index.html."""
    jb = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run([str(jb), "build", str(root), "--quiet"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines() or ["(no output)"]
        raise BVLibError("jupyter-book build failed: " + lines[-1])
    return root / "_build" / "html" / "index.html"


# README ---------------------------------------------------------------------------------------
README_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def results_snapshot(root: Path | None = None) -> dict:
    """This build's results (book/results/*.json) with what made them: the commit (with "+changes"
    when the work tree differs from it), the CPU, and the build's timings where there are some."""
    root = root or project_root()
    results = recorded()
    if not results:
        raise BVLibError("no recorded results: run `make book` first")
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "bvlib", "notebooks"))
    timings = root / "_build" / "timings.json"
    build = json.loads(timings.read_text()) if timings.is_file() else {}
    return {
        "commit": commit + ("+changes" if dirty else ""),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "preset": build.get("preset") or next(iter(results.values())).get("preset"),
        "cold": build.get("cold"),
        "total_min": round(build["total_s"] / 60, 1) if "total_s" in build else None,
        "chapters": results,
    }


def readme_block(snapshot: dict) -> str:
    """The README's results block (markdown) from a `results_snapshot`: the build, the world card and
    the claims scoreboard, so the front page and the book cannot disagree."""
    chapters = snapshot["chapters"]
    built = f"a {'cold ' if snapshot.get('cold') else ''}`make book` of {snapshot['commit']}" + (
        f" ({snapshot['total_min']} min" + f" on {snapshot['cores']} cores of an {snapshot['cpu']})"
        if snapshot.get("total_min")
        else ""
    )
    lines = [
        f"Generated by `make readme` from {built}, preset `{snapshot['preset']}`; the book shows each "
        "number's chapter.",
        "",
    ]
    w = chapters.get("00_world")
    if w:
        lines += [
            f"**The world**: {w['n_tasks']} tasks; zero-shot {w['mean_zeroshot_acc']:.1%}, clean fine-tunes "
            f"{w['mean_clean_acc']:.1%}, "
            f"BadNets ASR {w['mean_backdoor_asr']:.1%} at clean accuracy {w['mean_backdoor_clean_acc']:.1%}; "
            "task arithmetic "
            f"{w['ta_mean_acc']:.1%} (normalized {w['ta_normalized_acc']:.2f}, λ {w['ta_lam']:g}), TIES "
            f"{w['ties_mean_acc']:.1%} "
            f"(normalized {w['ties_normalized_acc']:.2f}).",
            "",
        ]
    s = chapters.get("07_scan", {}).get("scores")
    if s:
        main, plain = (
            s["anomaly index of the excess over θ0 (the scan)"],
            s["anomaly index of the ASR (no θ0 correction)"],
        )
        n = chapters["07_scan"]
        lo, hi = main["auc_interval"]
        tlo, thi = main["tpr_interval"]
        lines += [
            f"**Scanning a checkpoint** (`bvlib scan`, chapter 07; {n['n_models']} models, "
            f"{n['n_clean']} clean): AUC {main['auc']:.2f} [{lo:.2f}, {hi:.2f}] with the θ0 correction, "
            f"{plain['auc']:.2f} without; detection {main['tpr_at_fpr']:.0%} [{tlo:.0%}, {thi:.0%}] at "
            f"{main['fpr']:.0%} false positives (threshold {main['threshold']:.2f}).",
            "",
        ]
    rows = [(name, c) for name, r in chapters.items() for c in r.get("claims_table", [])]
    words = [c.get("verdict") or ("holds" if c["holds"] else "fails") for _, c in rows]
    lines += [
        f"**{len(rows)} claims**: "
        + ", ".join(f"{words.count(v)} {v}" for v in ("holds", "fails", "inconclusive"))
        + ".",
        "",
        "| ch. | claim | this book | holds if | verdict | behind it |",
        "|---|---|---|---|---|---|",
    ]
    cell = lambda text: str(text).replace("|", "/").replace("\n", " ")  # noqa: E731
    for (name, c), word in zip(rows, words):
        lines.append(
            f"| {name[:2]} | {cell(c['claim'])} | {cell(c['ours'])} | {cell(c.get('threshold', ''))} | "
            f"{'**' + word + '**' if word == 'fails' else word} | {cell(c.get('replicates', ''))} |"
        )
    return "\n".join(lines)


def write_readme(readme: Path, block: str) -> bool:
    """Put `block` between the README's two result markers; True when the file changed."""
    text = readme.read_text()
    start, end = README_MARKERS
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise BVLibError(f"{readme} needs one '{start}' line and, after it, one '{end}' line")
    head, rest = text.split(start)
    new = head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1]
    if new != text:
        readme.write_text(new)
    return new != text


def readme_results(readme: Path) -> str:
    """The block between the README's result markers (what `write_readme` put there)."""
    text = readme.read_text()
    start, end = README_MARKERS
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n") if start in text and end in text else ""
