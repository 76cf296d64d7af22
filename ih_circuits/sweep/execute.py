"""One run of a sweep, as a worker process executes it: train, probe, compare with the theory.

``execute_run`` never raises for a failure of the run itself: it returns a record with ``status="failed"``
and the error, so one bad configuration does not stop the sweep. The checkpoint comes back as bytes, so the
driver alone writes the sweep directory, and a Ray cluster needs no shared file system.
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ih_circuits.adapters import white_box
from ih_circuits.optimal import lag_set_text, optimal_shares, share_distance
from ih_circuits.probes import decomposition_test
from ih_circuits.sweep.spec import RunSpec, format_value
from ih_circuits.task import NGramTask
from ih_circuits.theory import task_prediction
from ih_circuits.training import TrainingRun, train

RUN_DIRECTORY = "run"


@dataclass
class RunOutcome:
    """A run's result record and its saved ``TrainingRun`` as {path relative to the run directory: bytes}."""

    record: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)


def base_record(run: RunSpec) -> dict[str, Any]:
    """The columns that describe a run, before it runs: id, group, preset, seed, grid cell, the task and steps."""
    _, task, config = run.parts()
    record: dict[str, Any] = {"run_id": run.run_id, "group": run.group, "preset": run.preset, "seed": run.seed}
    record.update({name: format_value(v) if isinstance(v, tuple) else v for name, v in run.cell})
    record.update(
        {
            "vocab_size": task.vocab_size,
            "parents": format_value(task.parents),
            "alpha": task.alpha,
            "steps": config.total_steps,
        }
    )
    return record


def failure(run: RunSpec, error: str, wall_time_s: float = float("nan")) -> RunOutcome:
    """The record of a run that did not finish, with the error in one line."""
    return RunOutcome({**base_record(run), "status": "failed", "wall_time_s": wall_time_s, "error": error})


def theory_budget(model: nn.Module, task: NGramTask) -> tuple[int, int]:
    """(D, window) of the theory's prediction for a run: the selector's degree and the copier's window for the
    paper's model; for an ordinary transformer, its heads per layer (each first-layer head can copy one lag, so
    at most that many parents are combined), at most the task's window, and the task's window."""
    ours = white_box(model)
    if ours is not None:
        return ours.config.max_degree, ours.config.max_lag
    return min(model.cfg.n_heads, task.window), task.window


def selected_lags(training: TrainingRun) -> tuple[int, ...]:
    """The lags copied by the heads of the trained selector's leading subset (its largest share)."""
    model = training.model
    shares = model.selector_shares()
    leading = max(shares, key=shares.get)
    head_lags = model.head_lags()
    return tuple(sorted({head_lags[h] for h in leading}))


def selected_shares(training: TrainingRun) -> dict[str, float]:
    """The trained selector's shares by lag set (``"1,2"``): each head subset's share under the lags its heads
    copy, summed over subsets that copy the same lags."""
    model = training.model
    head_lags = model.head_lags()
    shares: dict[str, float] = {}
    for subset, share in model.selector_shares().items():
        name = lag_set_text(tuple(sorted({head_lags[h] for h in subset})))
        shares[name] = shares.get(name, 0.0) + share
    return shares


def execute_run(run: RunSpec) -> RunOutcome:
    """Train ``run``, probe it (``decomposition_test``, which runs ``find_parents``) and return its outcome.

    Uses one torch thread, so runs in parallel workers do not compete, and a run's numbers do not depend on
    the worker or backend that executed it.
    """
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        model, task, config = run.parts()
        training = train(model, task, config, quiet=True)
        decomposition = decomposition_test(model, task, n_sequences=run.n_sequences, seed=run.seed)
        degree, window = theory_budget(model, task)
        prediction = task_prediction(task, degree, window, quiet=True)
        has_selector = white_box(model) is not None
        selected = selected_shares(training) if has_selector else None
        optimal = optimal_shares(task, degree, window) if run.optimal else None
        last = training.history.iloc[-1]
        outcome = {
            "status": "ok",
            "predicted_lags": prediction.text(),
            "theory_decisive": prediction.decisive,
            "selected_lags": format_value(selected_lags(training)) if has_selector else "",
            "found_lags": format_value(decomposition.parents.lags),
            "verdict": decomposition.verdict,
            "eval_loss": float(last["eval_loss"]),
            "bayes_loss": float(last["bayes_loss"]),
            "excess_loss": float(last["excess_loss"]),
            "theory_margin": prediction.margin,
            "theory_margin_stderr": prediction.margin_stderr,
            "selected_shares": "" if selected is None else json.dumps(selected, sort_keys=True),
            "optimal_shares": "" if optimal is None else json.dumps(optimal.shares, sort_keys=True),
            "share_tv": (
                float("nan") if optimal is None or selected is None else share_distance(optimal.shares, selected)
            ),
        }
        with tempfile.TemporaryDirectory() as scratch:
            saved = training.save(Path(scratch) / RUN_DIRECTORY)
            files = {p.relative_to(saved).as_posix(): p.read_bytes() for p in saved.rglob("*") if p.is_file()}
    except Exception as error:  # recorded, so that one bad configuration does not stop the sweep
        where = traceback.extract_tb(error.__traceback__)[-1]
        message = f"{type(error).__name__}: {error} ({Path(where.filename).name}:{where.lineno})"
        return failure(run, message, time.perf_counter() - start)
    record = {**base_record(run), **outcome, "wall_time_s": time.perf_counter() - start, "error": ""}
    return RunOutcome(record, files)
