"""The README's results block is generated (`make readme`) from a build's results, so the front page
and the book cannot disagree."""

import json

import pytest

from bvlib import BVLibError
from bvlib.book import project_root, readme_block, readme_results, write_readme

SNAPSHOT = project_root() / "benchmarks" / "results" / "book-cpu.json"


def test_the_readme_shows_what_make_readme_writes_from_the_kept_build():
    if not SNAPSHOT.is_file():
        pytest.skip("no kept build results yet: run `make book` then `make readme`")
    snapshot = json.loads(SNAPSHOT.read_text())
    assert readme_results(project_root() / "README.md") == readme_block(snapshot), (
        "README.md's results block differs from the kept build: run `make readme` (or `bvlib readme "
        "--from-snapshot`)"
    )
    claims = sum(len(r.get("claims_table", [])) for r in snapshot["chapters"].values())
    assert (
        claims > 10 and readme_block(snapshot).count("\n| ") == claims + 1
    )  # a row per claim, and the header


def test_the_block_goes_between_the_markers_and_nowhere_else(tmp_path):
    snapshot = {
        "commit": "abc1234",
        "cpu": "a CPU",
        "cores": 2,
        "preset": "smoke",
        "cold": True,
        "total_min": 1.5,
        "chapters": {
            "03_x": {
                "claims_table": [
                    {
                        "claim": "a | b",
                        "ours": "+1.0 [-2.0, +3.0] points",
                        "threshold": "> 0",
                        "verdict": "fails",
                        "replicates": "3 tasks × 1 seed set",
                        "holds": False,
                    }
                ]
            }
        },
    }
    block = readme_block(snapshot)
    assert "| 03 | a / b | +1.0 [-2.0, +3.0] points | > 0 | **fails** | 3 tasks × 1 seed set |" in block
    assert "cold `make book` of abc1234 (1.5 min on 2 cores of an a CPU)" in block
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nrest\n")
    assert write_readme(readme, block) and readme_results(readme) == block
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith(
        "<!-- results:end -->\nrest\n"
    )
    assert not write_readme(readme, block)  # unchanged
    readme.write_text("no markers\n")
    with pytest.raises(BVLibError, match="results:start"):
        write_readme(readme, block)


def test_the_scans_default_threshold_is_the_one_the_kept_build_measured():
    from bvlib.defenses.scan import SCAN_CALIBRATION

    if not SNAPSHOT.is_file() or "07_scan" not in json.loads(SNAPSHOT.read_text())["chapters"]:
        pytest.skip("no kept build of chapter 07 yet: run `make book` then `make readme`")
    scan = json.loads(SNAPSHOT.read_text())["chapters"]["07_scan"]
    main = scan["scores"]["anomaly index of the excess over θ0 (the scan)"]
    assert SCAN_CALIBRATION["threshold"] == pytest.approx(main["threshold"], abs=0.01), (
        "bvlib.defenses.scan.SCAN_CALIBRATION differs from chapter 07's measurement: copy it from there"
    )
    assert f"AUC {main['auc']:.2f}" in SCAN_CALIBRATION["measured"]
    assert f"{main['tpr_at_fpr']:.0%}" in SCAN_CALIBRATION["measured"]
