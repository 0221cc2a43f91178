"""Re-execute every notebook with the smoke preset into tests/notebooks/ (what nbval compares against).

Run `make baselines` after a change that is meant to move the smoke numbers, and commit the result.
"""

from pathlib import Path

from bvlib.book import execute, notebook_names, project_root

if __name__ == "__main__":
    root = project_root()
    out = Path(__file__).resolve().parent / "notebooks"
    for name in notebook_names(root):
        print("baseline", execute(name, out, {"preset": "smoke"}, root))
