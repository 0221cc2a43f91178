"""The code reads at one width: `ruff format` and `ruff check` at pyproject's line length (make lint)."""

import subprocess
import sys
from pathlib import Path

import pytest

from bvlib.book import project_root

FOLDERS = ["bvlib", "tests", "benchmarks", "notebooks", "scripts"]


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_the_code_is_formatted_and_lint_clean(command):
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.is_file():
        pytest.skip("ruff is not installed here (make setup installs it)")
    run = subprocess.run([str(ruff), *command, *FOLDERS], cwd=project_root(), capture_output=True, text=True)
    assert run.returncode == 0, f"ruff {' '.join(command)} (fix with make lint):\n{run.stdout[-3000:]}"
