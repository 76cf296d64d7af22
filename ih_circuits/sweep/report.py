"""A self-contained HTML report of a sweep directory: does the theory's prediction match what training selects?

One file, no network requests (figures are inline PNGs, the style is inline), in the style of the per-run
report (``ih_circuits.reporting``). It reads ``sweep.json`` and the runs' checksummed records (``collect``), not
``results.csv``: a hand-edited or damaged table cannot change the report. It needs no training and loads no model.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ih_circuits.checkpoint import atomic_write_text, check_output_file
from ih_circuits.reporting import figures_html, html_page
from ih_circuits.sweep.plots import agreement_summary, plot_excess_loss_map, plot_margin, plot_theory_map
from ih_circuits.sweep.results import agreement_rate, cell_table, disagreements
from ih_circuits.sweep.runner import collect
from ih_circuits.sweep.store import read_spec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_FILE = "report.html"
ANSWER_COLUMNS = ("predicted_lags", "selected_lags", "found_lags")
PROBLEM_COLUMNS = (
    "run_id",
    "status",
    *ANSWER_COLUMNS,
    "verdict",
    "excess_loss",
    "theory_margin",
    "theory_margin_stderr",
    "error",
)
NO_FINISHED_RUN = "no finished run"

HOW_TO_READ = """
<p>Each run trains the paper's two-layer model (copier, selector, classifier), or an ordinary attention-only
transformer (preset "transformer"), on one n-gram task of the grid with one seed, then compares four answers to
"which earlier tokens does the model read?". Lag sets are written
<code>1,2</code>: lag 1 is the current token, lag 2 the token before it, and so on; "empty" is the empty set.</p>
<ul>
<li><b>predicted</b>: the theory's answer, known before training: the lag set with the largest modified
chi-square mutual information I~ among those the selector can combine (at most its degree). I~ is a mean over
kernels drawn from the prior; when another set's I~ is within 3 standard errors of the best (paired over the same
kernels) the theory cannot tell them apart, and the prediction is a <b>tie</b> listing every such set,
<code>1,2;2,3</code> (the maps write "tie 1,2 | 2,3"). Every seed of a cell gets the same prediction.</li>
<li><b>selected</b>: what training chose: the lags of the trained selector's leading subset (the group of heads
with the largest share). An ordinary transformer has no selector: it is compared on its found lags.</li>
<li><b>found</b>: what the trained model behaves as if it reads (<code>find_parents</code>: the lags whose
resampling changes its prediction).</li>
<li><b>verdict</b>: the decomposition test on the found lags: "holds" when the model works as the generalized
induction head built from them.</li>
</ul>
<p>A run <b>agrees</b> when the selected set (an ordinary transformer's found set) is a predicted one (any set
of a tie); the agreement rate counts
finished runs only. The maps have one
square per grid cell, its seeds pooled: the colour and "k/n seeds" say how often training selected the
prediction, a red frame with an x marks every cell where some seed selected something else, and hatched squares
had failed runs. Excess loss is the model's loss minus the Bayes-optimal predictor's, in nats (0 is perfect).
The theory margin is I~(best) minus the next best I~, with its standard error: where it is within 3 standard
errors of 0 the prediction is a tie.</p>
"""


def _as_text(frame: pd.DataFrame, finished: pd.Series, missing: str) -> pd.DataFrame:
    """The table as text: the answers of finished rows (``""`` = "empty"), numbers to 4 significant digits,
    ``missing`` for a row with no finished run, and blank for a number a finished row did not compute."""
    shown = frame.astype(object)
    for column in frame.columns:
        if column in ANSWER_COLUMNS:
            shown[column] = [(v or "empty") if ok else missing for v, ok in zip(frame[column], finished, strict=True)]
        elif column == "theory_decisive":
            shown[column] = [
                ("yes" if v else "no, a tie") if ok else missing for v, ok in zip(frame[column], finished, strict=True)
            ]
        elif frame[column].dtype.kind == "f":  # a NaN of a finished row was not computed (share_tv without optimal)
            shown[column] = [
                f"{v:.4g}" if not math.isnan(v) else "" if ok else missing
                for v, ok in zip(frame[column], finished, strict=True)
            ]
    return shown


def _spec_json(spec: dict[str, Any]) -> str:
    """The spec as JSON with one line per key."""
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in spec.items()) + "\n}"


def _problems_html(results: pd.DataFrame) -> str:
    problems = disagreements(results)
    if problems.empty:
        return "<p>None: every run finished and selected the theory's prediction.</p>"
    failed = int((problems["status"] != "ok").sum())
    columns = [c for c in PROBLEM_COLUMNS if c in problems.columns]
    table = _as_text(problems[columns], problems["status"] == "ok", "").to_html(index=False)
    return f"<p>{len(problems) - failed} disagreeing and {failed} failed runs.</p>{table}"


def _map_figures(results: pd.DataFrame) -> list[tuple[str, Figure]]:
    """The theory map and the excess-loss map: of the whole grid, or one pair per group of a spec with several
    (their grids differ, so one map of all would be mostly empty squares)."""
    groups = list(dict.fromkeys(results["group"])) if "group" in results else [""]
    figures = []
    for group in groups:
        runs = results[results["group"] == group] if len(groups) > 1 else results
        suffix = f", group {group}" if len(groups) > 1 else ""
        figures += [
            (f"Theory vs practice per grid cell{suffix}", plot_theory_map(runs)),
            (f"Excess loss over the Bayes predictor{suffix}", plot_excess_loss_map(runs)),
        ]
    return figures


def sweep_report(directory: str | Path, output: str | Path | None = None) -> Path:
    """Write the HTML report of a sweep directory (default ``DIRECTORY/report.html``) and return its path.

    Contents: how to read it; the agreement rate (selected = predicted, over finished runs); the theory map,
    the excess-loss map (one of each per group when the spec has several) and the margin plot
    (``ih_circuits.sweep.plots``); the disagreeing and failed runs; the
    per-cell table (``cell_table``); the spec; every run (its record). Missing values are explained or left
    blank. Reads ``sweep.json`` and the run records, whose manifests are checked (a damaged record counts as a
    run not finished); the file is written atomically.

    Raises:
        ValueError: ``directory`` is not a sweep directory or holds no finished run, or ``output`` cannot be
            written (both checked before any figure is drawn).
    """
    directory = Path(directory)
    spec = read_spec(directory)
    path = check_output_file(directory / REPORT_FILE if output is None else output)
    results = collect(directory)
    cells = cell_table(results)
    finished = int((results["status"] == "ok").sum())
    figures = [*_map_figures(results), ("Theory margin against agreement", plot_margin(results))]
    everywhere = agreement_rate(results) == 1.0
    body = f"""
<h1>Sweep report: theory vs practice</h1>
<p class="note">{html.escape(str(directory))}: {html.escape(spec.description())}; {spec.n_runs}
runs: {finished} finished, {len(results) - finished} failed,
{spec.n_runs - len(results)} not run yet (or with a damaged record; the same sweep command runs them).</p>
<h2>How to read this report</h2>
{HOW_TO_READ}
<h2>Agreement</h2>
<p class="verdict-{str(everywhere).lower()}">{html.escape(agreement_summary(results))}.</p>
<h2>Figures</h2>
{figures_html(figures)}
<h2>Disagreements and failed runs</h2>
{_problems_html(results)}
<h2>Cells (seeds pooled)</h2>
{_as_text(cells, cells["ok"] > 0, NO_FINISHED_RUN).to_html(index=False)}
<h2>Spec</h2>
<pre>{html.escape(_spec_json(spec.to_dict()))}</pre>
<h2>All runs</h2>
{_as_text(results, results["status"] == "ok", "").to_html(index=False)}
"""
    return atomic_write_text(path, html_page("ih_circuits sweep report", body))
