"""The sweep directory: its spec, one atomic directory per finished run, and the results table.

Layout::

    DIR/sweep.json             the spec (a re-run must bring the same one)
    DIR/runs/RUN_ID/record.json
    DIR/runs/RUN_ID/run/       the saved TrainingRun (TrainingRun.load reads it)
    DIR/results.csv            every record, one row per run
    DIR/report.html            ih-circuits report DIR

Each run directory is written by ``checkpoint.atomic_directory`` with its record last-in, so a sweep killed
at any moment leaves every run either complete or absent; a re-run skips the complete ones whose status is
``"ok"`` and runs the rest again (failed runs included).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ih_circuits.checkpoint import atomic_directory, atomic_write_text, read_json, verify
from ih_circuits.sweep.execute import RUN_DIRECTORY, RunOutcome
from ih_circuits.sweep.spec import SweepSpec

SPEC_FILE = "sweep.json"
RUNS = "runs"
RECORD = "record.json"
RUN_KIND = "SweepRun"


def is_sweep_directory(directory: str | Path) -> bool:
    return (Path(directory) / SPEC_FILE).is_file()


def read_spec(directory: str | Path) -> SweepSpec:
    """The spec a sweep directory was run with."""
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not a sweep directory: {SPEC_FILE} is missing")
    try:
        return SweepSpec.from_dict(read_json(path))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def prepare(directory: str | Path, spec: SweepSpec, *, overwrite: bool) -> Path:
    """Create ``directory`` for ``spec``, or reopen it when it holds the same sweep.

    The same sweep is resumed (its finished runs are kept) unless ``overwrite=True``, which removes it and
    starts again; a different sweep is refused unless ``overwrite=True``; a directory holding other files is
    always refused.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"out={directory} is a file; give a directory for the sweep")
    if directory.is_dir() and any(directory.iterdir()):
        if not is_sweep_directory(directory):
            raise ValueError(f"out={directory} holds files that are not a sweep; choose an empty or new directory")
        if overwrite:
            shutil.rmtree(directory)
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
