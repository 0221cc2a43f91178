"""The book end to end: every notebook executes with the smoke preset, the HTML has every page and
figure, and a real browser (headless Chromium) shows each page whole, offline."""

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from bvlib import BVLibError
from bvlib.book import build_html, execute, notebook_names, notebook_parameters, project_root


@pytest.fixture(scope="module")
def smoke_book(tmp_path_factory, smoke_world):
    """The smoke book built into a temporary project folder (its own results, its own _build)."""
    smoke_world.card()  # the notebooks then only read the store
    out = tmp_path_factory.mktemp("book")
    root = project_root()
    for f in ("_config.yml", "_toc.yml"):
        shutil.copy(root / f, out / f)
    shutil.copytree(root / "_static", out / "_static")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BVLIB_RESULTS", str(out / "book" / "results"))
        for name in notebook_names(root):
            execute(name, out / "book", {"preset": "smoke"}, root)
        shutil.copy(
            root / "book" / "lab_notes.md", out / "book" / "lab_notes.md"
        )  # a source page, not executed
        build_html(out)
    return out


def test_book_builds_with_every_page_and_figure(smoke_book):
    root = project_root()
    names = notebook_names(root)
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    listed = {toc["root"]} | {c["file"] for c in toc.get("chapters", [])}
    notebooks = {f"book/{n}" for n in names}
    assert notebooks <= listed, "every notebook is a page of the book"
    assert listed - notebooks == {"book/lab_notes"}, "the pages that are not notebooks: the lab notes"
    for page in listed - notebooks:
        assert (root / f"{page}.md").is_file(), f"{page} is a markdown page in book/"
    html = smoke_book / "_build" / "html" / "book"
    for name in names:
        page = (html / f"{name}.html").read_text()
        assert "Traceback" not in page, f"{name} shows a failed cell"
        assert page.count("<img") >= 1, f"{name} shows no figure"
    for img in (smoke_book / "_build" / "html" / "_images").glob("*.png"):
        assert img.stat().st_size > 1000
    intro = (html / "intro.html").read_text()
    assert "The world" in intro and "preset <code" in intro


def _claims(book: Path) -> int:
    return sum(
        len(json.loads(p.read_text()).get("claims_table", []))
        for p in (book / "book" / "results").glob("*.json")
    )


def _browser():
    chromium, driver = (
        shutil.which("chromium") or shutil.which("chromium-browser"),
        shutil.which("chromedriver"),
    )
    if not (chromium and driver):
        pytest.skip(
            "Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver; "
            "make setup does)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


PAGE_CHECKS = """
const column = document.querySelector('article') || document.querySelector('main');
const right = column.getBoundingClientRect().right + 1;
const out = {images: [], overflow: [], errors: [], external: [], rows: 0};
for (const img of document.images) {
  if (!(img.complete && img.naturalWidth > 0)) out.images.push(img.src);
}
for (const box of document.querySelectorAll('div.cell_input, div.cell_output, div.cell_input pre, table')) {
  const inScroller = box.tagName === 'TABLE' && box.closest('div.cell_output');
  if (!inScroller && box.getBoundingClientRect().right > right) out.overflow.push(box.tagName + ': ' +
  box.innerText.slice(0, 60));
}
for (const pre of document.querySelectorAll('div.cell_input pre')) {
  if (pre.scrollWidth > pre.clientWidth + 1) out.overflow.push('code runs off its box: ' +
  pre.innerText.slice(0, 60));
}
for (const el of document.querySelectorAll('div.output.error, div.output.traceback, .output_error'))
out.errors.push(el.innerText.slice(0, 80));
if (document.body.innerText.includes('Traceback (most recent call last)')) out.errors.push('a traceback');
for (const e of performance.getEntriesByType('resource')) if (!e.name.startsWith('file:'))
out.external.push(e.name);
for (const el of document.querySelectorAll('script[src], link[href], img[src]')) {
  const url = el.getAttribute('src') || el.getAttribute('href');
  if (/^(https?:)?\\/\\//.test(url) && (el.tagName !== 'LINK' || el.rel === 'stylesheet'))
  out.external.push(url);
}
const board = [...document.querySelectorAll('table')].find(t => t.innerText.includes('behind it'));
out.rows = board ? board.querySelectorAll('tbody tr').length : 0;
return out;
"""


def test_the_book_in_a_browser(smoke_book):
    """Every page as a reader's browser shows it: images loaded, nothing wider than the text column,
    no error output, nothing fetched from the network, and the intro's scoreboard complete."""
    html = smoke_book / "_build" / "html"
    driver = _browser()
    try:
        problems = {}
        for name in [*notebook_names(project_root()), "lab_notes"]:
            driver.get((html / "book" / f"{name}.html").as_uri())
            r = driver.execute_script(PAGE_CHECKS)
            bad = {k: r[k] for k in ("images", "overflow", "errors", "external") if r[k]}
            if bad:
                problems[name] = bad
            if name == "intro":
                assert r["rows"] == _claims(smoke_book) > 0, (
                    f"the scoreboard has {r['rows']} rows, {_claims(smoke_book)} claims were recorded"
                )
        assert not problems, json.dumps(problems, indent=1)[:3000]
    finally:
        driver.quit()


def test_preset_notebook_parameters_name_real_parameters():
    # A preset may lighten a notebook's sweeps ("notebooks" in its JSON); each name must be a parameter
    # of that notebook's parameters cell, or papermill would inject a variable nothing reads.
    from bvlib.book import preset_parameters
    from bvlib.world import load_preset, preset_names

    root = project_root()
    seen = 0
    for preset in preset_names():
        for name in load_preset(preset).notebooks:
            assert name in notebook_names(root), (
                f"preset {preset} sets parameters of an unknown notebook {name}"
            )
            params = preset_parameters(name, preset)
            declared = notebook_parameters(name, root)
            assert params and set(params) <= set(declared), (
                f"{preset}/{name}: {sorted(set(params) - set(declared))} are not parameters"
            )
            seen += 1
    assert seen >= 1
    assert (
        preset_parameters("01_backdoor_vectors", "cpu") == {}
    )  # a chapter the preset leaves at its defaults


def test_a_failed_run_keeps_the_chapter(tmp_path, smoke_world):
    chapter = tmp_path / "book" / "01_backdoor_vectors.ipynb"
    chapter.parent.mkdir()
    chapter.write_text("the good chapter")
    with pytest.raises(BVLibError, match="unchanged"):  # fails inside a cell, after parameters were checked
        execute("01_backdoor_vectors", tmp_path / "book", {"preset": "smoke", "tasks": ["no_such_task"]})
    assert chapter.read_text() == "the good chapter"
    with pytest.raises(BVLibError, match="no parameter"):  # refused before anything runs
        execute("01_backdoor_vectors", tmp_path / "book", {"preset": "smoke", "scale": [1.0]})


def _tiny_chapter(root: Path, name: str, body: str) -> None:
    (root / "notebooks").mkdir(parents=True, exist_ok=True)
    (root / "notebooks" / f"{name}.py").write_text(
        '# %% tags=["parameters"]\npreset = "smoke"\nout = ""\n\n# %%\nimport pathlib\nimport '
        f"torch\n\n{body}\n"
    )


def test_chapters_run_side_by_side_single_threaded_and_a_failure_stops_none(tmp_path):
    """`bvlib book` executes chapters `workers` at a time, each kernel with one thread (so that the
    book's bits do not depend on `workers`); a failing chapter is reported and the others finish."""
    from bvlib.book import _execute_all, _one_thread

    marks = tmp_path / "marks"
    marks.mkdir()
    write = "pathlib.Path(out, NAME).write_text(str(torch.get_num_threads()))"
    for name in ("01_a", "02_b"):
        _tiny_chapter(tmp_path, name, write.replace("NAME", repr(name)))
    _tiny_chapter(tmp_path, "03_broken", "raise ValueError('this chapter fails')")
    _tiny_chapter(tmp_path, "intro", write.replace("NAME", "'intro'"))
    timings = {}
    with _one_thread(), pytest.raises(BVLibError, match="03_broken.*this chapter fails"):
        _execute_all(
            ["01_a", "02_b", "03_broken", "intro"],
            tmp_path / "book",
            {"preset": "smoke", "out": str(marks)},
            tmp_path,
            workers=2,
            timings=timings,
            meanwhile=lambda: (marks / "main").write_text(str(torch.get_num_threads())),
        )
    assert {p.name: p.read_text() for p in marks.iterdir()} == {"01_a": "1", "02_b": "1", "main": "1"}, (
        "one thread each, the world's card built meanwhile; no intro after a failure"
    )
    assert set(timings) == {"01_a", "02_b"} and (tmp_path / "book" / "01_a.ipynb").is_file()


def test_build_progress_shows_cells_done_on_a_terminal_only(tmp_path):
    import io

    from bvlib.book import BuildProgress, running_dir

    running = running_dir(tmp_path)
    running.mkdir(parents=True)
    cells = [{"cell_type": "markdown", "metadata": {}}] + [
        {"cell_type": "code", "metadata": {"papermill": {"status": s}}}
        for s in ("completed", "completed", "running", "pending")
    ]
    (running / "05_defenses.ipynb").write_text(json.dumps({"cells": cells}))
    (tmp_path / "_build" / "timings.json").write_text(json.dumps({"total_s": 600.0}))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    progress = BuildProgress(
        tmp_path, ["03_merging_resilience", "05_defenses"], every=0.02, stream=Terminal()
    )
    assert progress.cells("05_defenses") == (2, 4) and progress.cells("03_merging_resilience") is None
    progress.done.add("03_merging_resilience")
    line = progress.line()
    assert (
        line.startswith("book: 1/2 chapters | 05 2/4 cells | ") and "min left (previous build 10 min)" in line
    )
    with progress:
        time.sleep(0.2)
        progress.note("executed 03_merging_resilience in 1 s")
    out = progress.stream.getvalue()
    assert out.count("\r") >= 3 and "05 2/4 cells" in out
    assert re.search(
        r"\rexecuted 03_merging_resilience in 1 s *\n", out
    )  # over the live line, on a line of its own
    plain = io.StringIO()  # not a terminal (a CI log): no live line, the notes only
    with BuildProgress(tmp_path, ["05_defenses"], every=0.02, stream=plain) as quiet:
        time.sleep(0.1)
        quiet.note("executed 05_defenses in 1 s")
    assert plain.getvalue() == "executed 05_defenses in 1 s\n"


def test_publish_puts_a_working_book_on_a_local_gh_pages_branch(smoke_book, tmp_path):
    import subprocess

    from bvlib.book import publish

    with pytest.raises(BVLibError, match="git checkout"):
        publish(smoke_book)  # not a checkout yet
    git = lambda *a: (
        subprocess.run(["git", *a], cwd=smoke_book, capture_output=True, text=True, check=True).stdout
    )  # noqa: E731
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "source")
    env_user = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env_user.items():
            mp.setenv(k, v)
        commit = publish(smoke_book)
    files = git("ls-tree", "-r", "--name-only", "gh-pages").split()
    assert commit and "index.html" in files and ".nojekyll" in files and "book/intro.html" in files
    assert any(f.startswith("_images/") and f.endswith(".png") for f in files)
    assert (
        git("branch", "--show-current").strip() != "gh-pages"
    )  # the work tree stays on its branch; nothing is pushed
    site = tmp_path / "site"
    site.mkdir()
    subprocess.run(f"git archive gh-pages | tar -x -C {site}", shell=True, cwd=smoke_book, check=True)
    driver = _browser()
    try:
        driver.get((site / "index.html").as_uri())  # the landing page forwards to the intro
        time.sleep(1)
        assert driver.current_url.endswith("book/intro.html"), driver.current_url
        r = driver.execute_script(PAGE_CHECKS)
        assert not any(r[k] for k in ("images", "errors", "external")) and r["rows"] > 0, r
    finally:
        driver.quit()
