"""A sweep's results: one record per run, the tidy table of all of them, and its cells (seeds aggregated).

Columns of the results table, one row per run in the spec's order:

- ``run_id``, ``group`` (the spec's group name, ``""`` with one group), ``preset`` (``"transformer"`` for an
  ordinary transformer's run), ``seed``, then the grid's overrides (lag sets written ``"1,2"``);
- the task: ``vocab_size``, ``parents``, ``alpha``, and ``steps`` trained;
- ``status``: ``"ok"`` or ``"failed"`` (then ``error`` holds the exception, the rest is empty);
- ``predicted_lags``: the theory's argmax of I~ within the selector's degree and every lag set tied with it
  (``theory.task_prediction``: within 3 paired standard errors over the kernels), separated by ``;`` as in
  ``"1,2;2,3"``, best first; ``theory_decisive``: whether it names one set. Every seed of a cell gets the same
  prediction (the theory's kernels do not depend on the run's seed);
  ``selected_lags``: the lags of the heads in the trained selector's leading subset (``""`` for an ordinary
  transformer, which has no selector); ``found_lags``: ``find_parents``' behavioural answer; ``""`` is also
  the empty set. A run is compared with the theory on its ``practice_lags``: the selected lags of the paper's
  model, the found lags of an ordinary transformer;
- ``verdict``: ``decomposition_test``'s verdict on ``found_lags``;
- ``eval_loss``, ``bayes_loss``, ``excess_loss`` (nats, last evaluation of the run);
- ``theory_margin``: I~(best) minus the next best I~ within the degree (how sure the theory is), and
  ``theory_margin_stderr`` its standard error over the kernels (paired);
- ``selected_shares``: the trained selector's shares by lag set, as JSON (``{"1,2": 0.97, "1": 0.01, ...}``);
  ``optimal_shares``: the optimal selector's (``ih_circuits.optimal``, when the spec asks ``[theory] optimal``,
  else ``""``), and ``share_tv`` the total-variation distance between the two (NaN without it); an ordinary
  transformer has no selector shares (``""``, and ``share_tv`` NaN);
- ``wall_time_s``: the run's wall time in its worker (the only column that differs between identical runs).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ih_circuits.baselines import TRANSFORMER_KEYS
from ih_circuits.checkpoint import atomic_write_text
from ih_circuits.presets import OVERRIDE_KEYS
from ih_circuits.sweep.spec import TRANSFORMER

RESULTS_FILE = "results.csv"
LAG_COLUMNS = ("parents", "predicted_lags", "selected_lags", "found_lags")
OUTCOME_COLUMNS = (
    "status",
    "predicted_lags",
    "theory_decisive",
    "selected_lags",
    "found_lags",
    "verdict",
    "eval_loss",
    "bayes_loss",
    "excess_loss",
    "theory_margin",
    "theory_margin_stderr",
    "selected_shares",
    "optimal_shares",
    "share_tv",
    "wall_time_s",
    "error",
)
TEXT_COLUMNS = (
    "run_id",
    "group",
    "preset",
    "status",
    "verdict",
    "error",
    "selected_shares",
    "optimal_shares",
    *LAG_COLUMNS,
)


def results_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The records as one table, every column of the module docstring in its order (a failed run's numbers are
    NaN, its text columns ``""``), also when no run finished."""
    frame = pd.DataFrame.from_records(list(records))
    for column in OUTCOME_COLUMNS:  # every column, even when no run finished (a table of failures stays a table)
        if column not in frame.columns:
            frame[column] = math.nan
    config = [c for c in frame.columns if c not in OUTCOME_COLUMNS]
    frame = frame[config + [c for c in OUTCOME_COLUMNS if c in frame.columns]]
    for column in TEXT_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].fillna("").astype(str)
    return frame


def write_results(directory: str | Path, frame: pd.DataFrame) -> Path:
    """Write ``DIRECTORY/results.csv`` atomically."""
    return atomic_write_text(Path(directory) / RESULTS_FILE, frame.to_csv(index=False))


def load_results(directory: str | Path) -> pd.DataFrame:
    """Read ``results.csv`` of a sweep directory (or the file itself) with lag sets kept as text (``""`` = empty).

    The table is a convenience copy for pandas, spreadsheets and other tools; ``collect(DIRECTORY)`` rebuilds it
    from the checksummed run records, which the report reads. A file without the table's columns is refused.
    """
    path = Path(directory)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: run the sweep first (ih-circuits sweep SPEC --out DIR)")
    try:
        header = pd.read_csv(path, nrows=0).columns
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a results table: {error}") from None
    missing = [c for c in ("run_id", *OUTCOME_COLUMNS) if c not in header]
    if missing:
        raise ValueError(
            f"{path} is not a results table: it lacks the columns {missing}; rebuild it from the run records with "
            "ih_circuits.sweep.collect(DIRECTORY)"
        )
    text = {c: str for c in header if c in TEXT_COLUMNS or c in LAG_COLUMNS}
    return pd.read_csv(
        path, dtype=text, keep_default_na=False, na_values={c: ["", "nan"] for c in header if c not in text}
    )


def grid_columns(results: pd.DataFrame) -> list[str]:
    """The overrides that vary across the runs, in the table's order, and ``group`` where the spec has several:
    the axes of the map (never ``seed``: a cell aggregates its seeds, though ``seed`` is also a model override)."""
    axes = OVERRIDE_KEYS | TRANSFORMER_KEYS | {"group"}
    return [c for c in results.columns if c in axes and c != "seed" and results[c].nunique(dropna=False) > 1]


def practice_lags(results: pd.DataFrame) -> pd.Series:
    """The lag set each run is compared with the theory on: the trained selector's leading lags
    (``selected_lags``) for the paper's model, the found lags (``find_parents``) for an ordinary transformer,
    which has no selector."""
    transformer = results["preset"].eq(TRANSFORMER) if "preset" in results else False
    if not bool(pd.Series(transformer).any()):
        return results["selected_lags"]
    return results["selected_lags"].where(~transformer, results["found_lags"])


def in_prediction(selected: pd.Series, predicted: pd.Series) -> pd.Series:
    """Whether each selected lag set is one of its row's predicted sets (a tie names several, ``;``-separated)."""
    return pd.Series(
        [_lag_text(s) in _lag_text(p).split(";") for s, p in zip(selected, predicted, strict=True)],
        index=selected.index,
        dtype=bool,
    )


def _lag_text(value: Any) -> str:
    """A lag-set cell as text, whatever pandas made of it (``1`` from a plain read_csv; NaN or None: empty)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _mode(values: pd.Series) -> str:
    """The most common value (ties: the first seen); ``"-"`` when there is none."""
    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else "-"


def cell_table(results: pd.DataFrame, grid: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per grid cell, seeds aggregated over the runs that finished (``status == "ok"``).

    Columns: the grid's, ``runs``, ``ok``, ``predicted_lags`` and ``selected_lags`` (the most common over the
    seeds; a tie keeps its ``;``-separated sets; for ordinary transformers the found lags, see ``practice_lags``),
    ``compared`` (``"sel"``, or ``"found"`` for ordinary transformers), ``selection_frequency`` (the share of
    seeds whose selected set is a predicted one; NaN with no finished run), ``agrees`` (every finished seed
    selected a predicted set),
    ``theory_decisive`` (the prediction names one set), ``holds_frequency`` (the share whose decomposition
    holds), and the means of ``excess_loss``, ``theory_margin``, ``theory_margin_stderr`` and, when the sweep
    computed the optimal selector (``[theory] optimal``), ``share_tv``.
    """
    grid = grid_columns(results) if grid is None else list(grid)
    missing = [c for c in grid if c not in results.columns]
    if missing:
        raise ValueError(f"grid columns {missing} are not in the results; columns: {list(results.columns)}")
    rows = []
    optimal = "share_tv" in results and bool(results["share_tv"].notna().any())
    groups = results.groupby(grid, sort=False, dropna=False) if grid else [((), results)]
    for key, runs in groups:
        key = key if isinstance(key, tuple) else (key,)
        ok = runs[runs["status"] == "ok"]
        practice = practice_lags(ok)
        agree = in_prediction(practice, ok["predicted_lags"])
        found = "preset" in runs and bool(runs["preset"].eq(TRANSFORMER).all())
        frequency = float(agree.mean()) if len(ok) else math.nan
        rows.append(
            {
                **dict(zip(grid, key, strict=True)),
                "runs": len(runs),
                "ok": len(ok),
                "predicted_lags": _mode(ok["predicted_lags"].map(_lag_text)),
                "selected_lags": _mode(practice.map(_lag_text)),
                "compared": "found" if found else "sel",
                "selection_frequency": frequency,
                "agrees": bool(len(ok)) and bool(agree.all()),
                "theory_decisive": bool(len(ok)) and bool(ok["theory_decisive"].eq(True).all()),  # missing: no
                "holds_frequency": float((ok["verdict"] == "holds").mean()) if len(ok) else math.nan,
                "excess_loss": float(ok["excess_loss"].mean()) if len(ok) else math.nan,
                "theory_margin": float(ok["theory_margin"].mean()) if len(ok) else math.nan,
                "theory_margin_stderr": float(ok["theory_margin_stderr"].mean()) if len(ok) else math.nan,
                **({"share_tv": float(ok["share_tv"].mean()) if len(ok) else math.nan} if optimal else {}),
            }
        )
    return pd.DataFrame(rows)


def agreement_rate(results: pd.DataFrame) -> float:
    """The share of finished runs whose ``practice_lags`` are a predicted set (one of a tie's; NaN when none
    finished)."""
    ok = results[results["status"] == "ok"]
    return float(in_prediction(practice_lags(ok), ok["predicted_lags"]).mean()) if len(ok) else math.nan


def disagreements(results: pd.DataFrame) -> pd.DataFrame:
    """The finished runs whose ``practice_lags`` are none of the predicted sets, and the failed runs."""
    wrong = (results["status"] != "ok") | ~in_prediction(practice_lags(results), results["predicted_lags"])
    return results[wrong].reset_index(drop=True)
