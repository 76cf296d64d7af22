"""How long a sweep will take, measured before it starts.

One run is timed in part, on one torch thread as the workers run: its first training steps up to and including
one evaluation (setup, steps and the evaluation's share per step) and the probe at the spec's ``n_sequences``.
Each group of the spec (the paper's model, ordinary transformers) is timed on its own first cell. Each cell's
training time scales with its own number of steps; its probe costs what the timed one did. The total, divided
over the workers, is what ``run_sweep`` prints before it starts ("N runs, about T"). A grid whose cells differ in
batch size, sequence length or vocabulary is estimated from its first cell, so "about" means within a factor of
a few.
"""

from __future__ import annotations

import time

import torch

from ih_circuits.optimal import optimal_shares
from ih_circuits.probes import decomposition_test
from ih_circuits.sweep.execute import theory_budget
from ih_circuits.sweep.spec import RunSpec
from ih_circuits.training import train

MAX_TIMED_STEPS = 20
TRIED_CELLS = 3


class _Enough(Exception):
    """Raised by the timing callback to stop training once enough steps are timed."""


def run_seconds(run: RunSpec) -> tuple[float, float, float]:
    """(setup seconds, seconds per training step, seconds of the probe and, when the spec asks, the optimal
    selector) of ``run``, measured on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, task, config = run.parts()
        timed = min(config.record_every, config.total_steps, MAX_TIMED_STEPS)
        stamps: list[float] = []

        def stop_after_timed_steps(_: object) -> None:
            stamps.append(time.perf_counter())
            if len(stamps) > timed:
                raise _Enough

        start = time.perf_counter()
        try:
            if train(model, task, config, quiet=True, callback=stop_after_timed_steps).interrupted:
                raise KeyboardInterrupt  # train holds a Ctrl-C until its step ends; the estimate passes it on
        except _Enough:
            pass
        step = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
        setup = max(stamps[0] - start - step, 0.0)
        start = time.perf_counter()
        decomposition_test(model, task, n_sequences=run.n_sequences, seed=run.seed)
        if run.optimal:
            optimal_shares(task, *theory_budget(model, task))
        return setup, step, time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def sweep_seconds(runs: list[RunSpec], workers: int) -> float | None:
    """Wall seconds of ``runs`` on ``workers`` parallel workers: each group's runs from ``run_seconds`` of the
    first of up to ``TRIED_CELLS`` of its cells whose timing succeeds; ``None`` if a group has none (its runs
    will fail and say why)."""
    if not runs:
        return 0.0
    total = 0.0
    for group in dict.fromkeys(run.group for run in runs):
        members = [run for run in runs if run.group == group]
        first_of_cell = list({run.cell: run for run in reversed(members)}.values())[::-1]
        for run in first_of_cell[:TRIED_CELLS]:
            try:
                setup, step, probe = run_seconds(run)
            except Exception:  # noqa: BLE001 - a cell that fails (e.g. over the memory limit) fails as a run, with its error
                continue
            steps = {r.cell: r.parts()[2].total_steps for r in first_of_cell}
            total += sum(setup + step * steps[r.cell] + probe for r in members)
            break
        else:
            return None
    return total / max(1, min(workers, len(runs)))


def format_duration(seconds: float) -> str:
    """``"40 s"``, ``"12 min"``, ``"3.5 h"``."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
