"""The sweep directory's lock: a second sweep into a directory in use is refused at once, naming the holder."""

import os

import pytest

from ih_circuits.sweep import run_sweep
from ih_circuits.sweep.store import LOCK_FILE, locked


def test_a_second_sweep_into_a_directory_in_use_is_refused(tmp_path):
    """A child process holds the lock (as a running sweep does); the parent is refused, then gets the lock once
    the child is gone (flock dies with its process: a killed sweep leaves nothing locked)."""
    ready_read, ready_write = os.pipe()
    done_read, done_write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child holds the lock until the parent says
        with locked(tmp_path / "sweep"):
            os.write(ready_write, b"1")
            os.read(done_read, 1)
        os._exit(0)
    os.read(ready_read, 1)
    try:
        with pytest.raises(ValueError, match=rf"sweep is in use by another sweep \(process {child} on .*\); wait"):
            with locked(tmp_path / "sweep"):
                pass
        spec = {"preset": "cwa", "seeds": [0], "steps": 2}
        with pytest.raises(ValueError, match="in use by another sweep"):
            run_sweep(spec, tmp_path / "sweep", quiet=True)
        assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [LOCK_FILE]
    finally:
        os.write(done_write, b"1")
        os.waitpid(child, 0)
    with locked(tmp_path / "sweep") as directory:
        assert (directory / LOCK_FILE).read_text().startswith(f"process {os.getpid()} on ")


def test_a_file_or_a_foreign_directory_gets_no_lock_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"), locked(tmp_path / "file"):
        pass
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="holds files that are not a sweep"), locked(tmp_path / "notes"):
        pass
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["mine.txt"]
