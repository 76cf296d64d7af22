"""The sweep directory: its spec, one atomic directory per finished run, and the results table.

Layout::

    DIR/sweep.json             the spec (a re-run must bring the same one)
    DIR/runs/RUN_ID/record.json
    DIR/runs/RUN_ID/run/       the saved TrainingRun (TrainingRun.load reads it)
    DIR/results.csv            every record, one row per run
    DIR/report.html            ih-circuits report DIR
    DIR/.lock                  held (flock) by the sweep running in DIR

Each run directory is written by ``checkpoint.atomic_directory`` with its record last-in, so a sweep killed
at any moment leaves every run either complete or absent; a re-run skips the complete ones whose status is
``"ok"`` and runs the rest again (failed runs included). A sweep holds an exclusive lock on ``DIR/.lock`` while
it runs (``locked``), so a second sweep into the same directory is refused at once instead of mixing its runs in;
the lock dies with its process, so a killed sweep never leaves the directory locked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ih_circuits.checkpoint import atomic_directory, atomic_write_text, read_json, verify
from ih_circuits.sweep.execute import RUN_DIRECTORY, RunOutcome
from ih_circuits.sweep.spec import SweepSpec

SPEC_FILE = "sweep.json"
RUNS = "runs"
RECORD = "record.json"
RUN_KIND = "SweepRun"
LOCK_FILE = ".lock"


def is_sweep_directory(directory: str | Path) -> bool:
    return (Path(directory) / SPEC_FILE).is_file()


def read_spec(directory: str | Path) -> SweepSpec:
    """The spec a sweep directory was run with (its size was accepted when it started: no ``max_runs`` here)."""
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not a sweep directory: {SPEC_FILE} is missing")
    try:
        return SweepSpec.from_dict(read_json(path), max_runs=None)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


@contextmanager
def locked(directory: str | Path) -> Iterator[Path]:
    """Create ``directory`` if needed and hold an exclusive lock on its ``.lock`` for the block; raise
    ``ValueError`` at once, naming the holder, if another process holds it (POSIX ``flock``)."""
    import fcntl

    directory = _check_out(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ValueError(
                f"out={directory} is in use by another sweep ({holder}); wait for it to finish, or choose another "
                "directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield directory


def _contents(directory: Path) -> list[Path]:
    """What a directory holds besides its lock file."""
    return [path for path in directory.iterdir() if path.name != LOCK_FILE]


def _check_out(directory: str | Path) -> Path:
    """Refuse a file, or a directory holding files that are not a sweep."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"out={directory} is a file; give a directory for the sweep")
    if directory.is_dir() and _contents(directory) and not is_sweep_directory(directory):
        raise ValueError(f"out={directory} holds files that are not a sweep; choose an empty or new directory")
    return directory


def prepare(directory: str | Path, spec: SweepSpec, *, overwrite: bool) -> Path:
    """Create ``directory`` for ``spec``, or reopen it when it holds the same sweep.

    The same sweep is resumed (its finished runs are kept) unless ``overwrite=True``, which removes it and
    starts again; a different sweep is refused unless ``overwrite=True``; a directory holding other files is
    always refused. Call it holding ``locked(directory)``.
    """
    directory = _check_out(directory)
    if directory.is_dir() and _contents(directory):
        if overwrite:  # everything but the lock, which this sweep holds
            for path in _contents(directory):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        elif read_json(directory / SPEC_FILE) != spec.to_dict():
            raise ValueError(
                f"out={directory} holds a different sweep (see its {SPEC_FILE}); choose another directory "
                "or pass overwrite=True (--overwrite) to replace it"
            )
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / SPEC_FILE, json.dumps(spec.to_dict(), indent=2))
    return directory


def read_record(directory: str | Path, run_id: str) -> dict[str, Any] | None:
    """A run's record when its directory is complete (manifest checked); None when it is absent or damaged."""
    run_directory = Path(directory) / RUNS / run_id
    try:
        verify(run_directory, RUN_KIND)
        return read_json(run_directory / RECORD)
    except ValueError:
        return None


def write_outcome(directory: str | Path, run_id: str, outcome: RunOutcome) -> None:
    """Write a run's checkpoint files and record as one atomic directory (replacing a failed attempt)."""
    with atomic_directory(Path(directory) / RUNS / run_id, RUN_KIND, overwrite=True) as staging:
        for name, content in outcome.files.items():
            path = staging / RUN_DIRECTORY / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        (staging / RECORD).write_text(json.dumps(outcome.record, indent=2))
