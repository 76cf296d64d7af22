"""A script that starts a local sweep from its top level, without the ``__main__`` guard, is refused at once.

Spawned workers import the main module; unguarded, each would start the sweep again, die, and leave every run
"failed" (measured before this check: 96 worker tracebacks, 24 failed runs, then a ``KeyError`` in ``cell_table``).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SPEC = '{"preset": "cwa", "seeds": [0], "steps": 2, "grid": {"alpha": [0.1]}}'


def run_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "study.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_an_unguarded_script_is_refused_before_anything_runs(tmp_path):
    done = run_script(
        tmp_path,
        f"""
        from ih_circuits.sweep import run_sweep

        results = run_sweep({SPEC}, "out", quiet=True)
        """,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: ") and "study.py, line 4" in last and 'if __name__ == "__main__":' in last
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "body",
    [
        # a call inside a function that the guard calls
        """
        from ih_circuits.sweep.backends import check_spawn_safe_entry

        def main():
            check_spawn_safe_entry()

        if __name__ == "__main__":
            main()
        """,
        # the guard written the other way round
        """
        from ih_circuits.sweep.backends import check_spawn_safe_entry

        if "__main__" == __name__:
            check_spawn_safe_entry()
        """,
    ],
    ids=["function", "reversed"],
)
def test_guarded_scripts_pass(tmp_path, body):
    done = run_script(tmp_path, body)
    assert done.returncode == 0, done.stderr


def test_an_unguarded_call_through_a_function_is_refused(tmp_path):
    done = run_script(
        tmp_path,
        """
        from ih_circuits.sweep.backends import check_spawn_safe_entry

        def main():
            check_spawn_safe_entry()

        main()
        """,
    )
    assert done.returncode == 1 and "study.py, line 7" in done.stderr
