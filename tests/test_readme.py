"""Every Python block of README.md, verbatim, in the order the README gives them, as one script.

The blocks build on each other as a reader's notebook would (the probes and views blocks use the ``run`` trained
two blocks earlier), so they run as one file in a fresh directory (with ``examples/`` beside it), by a new
interpreter, as ``python readme.py``: the sweep block's ``__main__`` guard is exercised as a script's would be.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks() -> list[tuple[int, str]]:
    """(line, code) of every fenced ``python`` block of README.md."""
    text = (ROOT / "README.md").read_text()
    return [
        (text[: match.start()].count("\n") + 1, match.group(1))
        for match in re.finditer(r"```python\n(.*?)```", text, flags=re.DOTALL)
    ]


def test_the_readme_has_its_python_blocks():
    blocks = readme_blocks()
    assert len(blocks) >= 8 and all(code.strip() for _, code in blocks)


@pytest.mark.slow
def test_every_readme_python_block_runs_verbatim_as_one_script(tmp_path):
    script = "".join(f"# README.md, line {line}\n{code}\n" for line, code in readme_blocks())
    (tmp_path / "readme.py").write_text(script)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    done = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    # What the blocks write: a checkpoint, a saved run, a report, a sweep with its map.
    for written in ["ckpt", "runs/cwa", "report.html", "out/sweep/results.csv", "out/sweep/map.png"]:
        assert (tmp_path / written).exists(), written
