"""``run_sweep``: expand a spec, skip what is finished, execute the rest on a backend, collect the table."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import pandas as pd

from ih_circuits.checks import check_int
from ih_circuits.sweep.backends import BACKENDS, available_cores, check_spawn_safe_entry, run_local, run_ray
from ih_circuits.sweep.estimate import format_duration, sweep_seconds
from ih_circuits.sweep.results import results_frame, write_results
from ih_circuits.sweep.spec import DEFAULT_MAX_RUNS, SweepSpec
from ih_circuits.sweep.store import locked, prepare, read_record, read_spec, write_outcome


def as_spec(spec: SweepSpec | Mapping[str, Any] | str | Path, max_runs: int | None = DEFAULT_MAX_RUNS) -> SweepSpec:
    """A ``SweepSpec`` from itself, a dict, or the path of a TOML file, of at most ``max_runs`` runs."""
    if isinstance(spec, SweepSpec):
        if max_runs is not None and spec.n_runs > check_int(max_runs, "max_runs (or None)", 1):
            raise ValueError(f"the spec has {spec.n_runs} runs, above max_runs={max_runs}; raise max_runs to run it")
        return spec
    if isinstance(spec, Mapping):
        return SweepSpec.from_dict(spec, max_runs=max_runs)
    if isinstance(spec, (str, Path)):
        return SweepSpec.from_toml(spec, max_runs=max_runs)
    raise ValueError(f"spec must be a SweepSpec, a dict or a TOML path; got {type(spec).__name__}")


def collect(directory: str | Path) -> pd.DataFrame:
    """The results table of a sweep directory from its run records (the runs not finished yet are left out)."""
    runs = read_spec(directory).runs()
    records = [r for r in (read_record(directory, run.run_id) for run in runs) if r is not None]
    if not records:
        raise ValueError(f"{directory} holds no finished run yet")
    return results_frame(records)


def run_sweep(
    spec: SweepSpec | Mapping[str, Any] | str | Path,
    out: str | Path,
    *,
    backend: str = "local",
    workers: int | None = None,
    address: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    max_runs: int | None = DEFAULT_MAX_RUNS,
) -> pd.DataFrame:
    """Run every (cell, seed) of ``spec`` that ``out`` does not hold yet; return and save the results table.

    Before the first run it prints how many runs are left and about how long they will take
    (``ih_circuits.sweep.estimate``: part of one run timed), then shows a progress bar; ``quiet`` skips both.
    While it runs it holds ``out/.lock``: a second sweep into ``out`` is refused at once.

    Args:
        spec: a ``SweepSpec``, a dict, or a TOML file (``ih_circuits.sweep.spec`` documents the keys).
        out: the sweep directory (created; re-running into it skips the finished runs).
        backend: ``"local"`` (a process pool) or ``"ray"`` (``pip install 'ih_circuits[ray]'``).
        workers: parallel runs: local processes, or the CPUs of a local Ray instance (default: the cores this
            process may use). Ignored when joining a Ray cluster, whose size decides.
        address: Ray only: the cluster to join (``"auto"``, ``"ray://host:10001"``); default a local instance.
        overwrite: replace a sweep already in ``out`` (otherwise the same spec resumes it, another is refused).
        quiet: no estimate and no progress bar.
        max_runs: refuse a spec of more runs (cells x seeds) than this, before expanding it (``None``: no limit).

    Returns:
        ``results.csv`` as a DataFrame (``ih_circuits.sweep.results`` documents the columns). A failed run is a
        row with ``status="failed"`` and its ``error``; it is run again by the next call.
    """
    from tqdm.auto import tqdm

    spec = as_spec(spec, max_runs)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if workers is not None:
        check_int(workers, "workers", 1)
    if address is not None and backend != "ray":
        raise ValueError(f"address={address!r} is for backend='ray'; backend is {backend!r}")
    if backend == "local":
        check_spawn_safe_entry()
    with locked(out) as directory:
        prepare(directory, spec, overwrite=overwrite)
        runs = spec.runs()
        pending = [run for run in runs if (read_record(directory, run.run_id) or {}).get("status") != "ok"]
        if pending:
            workers = min(workers or available_cores(), len(pending))
            if not quiet:
                done = len(runs) - len(pending)
                seconds = sweep_seconds(pending, workers)
                about = "no estimate: its first cells fail" if seconds is None else f"about {format_duration(seconds)}"
                plural = "s" if workers > 1 else ""
                tqdm.write(f"{len(pending)} runs to do ({done} done), {about}, on {workers} {backend} worker{plural}")
            outcomes = run_local(pending, workers) if backend == "local" else run_ray(pending, workers, address)
            progress = tqdm(total=len(runs), initial=len(runs) - len(pending), desc="sweep", disable=quiet)
            with closing(outcomes), progress:
                for run, outcome in outcomes:
                    write_outcome(directory, run.run_id, outcome)
                    progress.update()
        results = collect(directory)
        write_results(directory, results)
    return results
