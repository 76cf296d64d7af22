"""Every script in examples/ runs (in the fast mode the scripts offer) and exits 0."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"train_and_probe.py", "patch_your_own_model.py", "make_report.py"}


@pytest.mark.e2e
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    env = {**os.environ, "IH_CIRCUITS_FAST": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


def test_the_readme_study_tables_are_those_of_the_committed_results():
    """The README's "Where the theory holds" tables are what examples/theory_limits.py prints from the study's
    results (examples/theory_limits.csv, written by `make study`), character for character."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [
            sys.executable,
            str(root / "examples" / "theory_limits.py"),
            "--tables",
            str(root / "examples" / "theory_limits.csv"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    tables = result.stdout.strip()
    assert tables.count("\n| {") == 12  # both tables: the 8 cells of the paper's model and the 4 of transformers
    section = (root / "README.md").read_text().split("## Where the theory holds")[1].split("\n## ")[0]
    assert tables in section
