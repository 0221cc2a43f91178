"""The book end to end: every notebook executes with the smoke preset, and the HTML has every page and figure."""

import shutil

import pytest
import yaml

from bvlib import BVLibError
from bvlib.book import build_html, execute, notebook_names, notebook_parameters, project_root


def test_book_builds_with_every_page_and_figure(tmp_path, monkeypatch, smoke_world):
    smoke_world.card()  # the notebooks then only read the store
    root = project_root()
    for f in ("_config.yml", "_toc.yml"):
        shutil.copy(root / f, tmp_path / f)
    monkeypatch.setenv("BVLIB_RESULTS", str(tmp_path / "book" / "results"))
    names = notebook_names(root)
    for name in names:
        execute(name, tmp_path / "book", {"preset": "smoke"}, root)
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    listed = {toc["root"]} | {c["file"] for c in toc.get("chapters", [])}
    assert {f"book/{n}" for n in names} == listed, "every notebook is a page of the book, and only those"

    index = build_html(tmp_path)
    assert index.exists()
    html = tmp_path / "_build" / "html" / "book"
    for name in names:
        page = (html / f"{name}.html").read_text()
        assert "Traceback" not in page, f"{name} shows a failed cell"
        if name != "intro":
            assert page.count("<img") >= 1, f"{name} shows no figure"
    for img in (tmp_path / "_build" / "html" / "_images").glob("*.png"):
        assert img.stat().st_size > 1000
    intro = (html / "intro.html").read_text()
    assert "The world" in intro and "preset <code" in intro


def test_preset_notebook_parameters_name_real_parameters():
    # A preset may lighten a notebook's sweeps ("notebooks" in its JSON); each name must be a parameter
    # of that notebook's parameters cell, or papermill would inject a variable nothing reads.
    from bvlib.book import preset_parameters
    from bvlib.world import load_preset, preset_names

    root = project_root()
    seen = 0
    for preset in preset_names():
        for name in load_preset(preset).get("notebooks", {}):
            assert name in notebook_names(root), f"preset {preset} sets parameters of an unknown notebook {name}"
            params = preset_parameters(name, preset)
            declared = notebook_parameters(name, root)
            assert params and set(params) <= set(declared), f"{preset}/{name}: {sorted(set(params) - set(declared))} are not parameters"
            seen += 1
    assert seen >= 1
    assert preset_parameters("05_defenses", "cpu") == {}


def test_a_failed_run_keeps_the_chapter(tmp_path, smoke_world):
    chapter = tmp_path / "book" / "01_backdoor_vectors.ipynb"
    chapter.parent.mkdir()
    chapter.write_text("the good chapter")
    with pytest.raises(BVLibError, match="unchanged"):  # fails inside a cell, after parameters were checked
        execute("01_backdoor_vectors", tmp_path / "book", {"preset": "smoke", "tasks": ["no_such_task"]})
    assert chapter.read_text() == "the good chapter"
    with pytest.raises(BVLibError, match="no parameter"):  # refused before anything runs
        execute("01_backdoor_vectors", tmp_path / "book", {"preset": "smoke", "scale": [1.0]})
