"""A sweep as pictures: where the theory's prediction is what training selects, and how sure the theory was.

Every figure reads a results table (``run_sweep``'s return value or ``load_results(DIR)``) and aggregates the
seeds of each grid cell with ``cell_table``. The maps put one grid column on the x axis, a second on the y
axis and make one panel per combination of any further ones. "pred" is the theory's argmax of the modified
chi-square mutual information I~ within the selector's degree, "sel" the trained selector's leading subset;
both are lag sets, and lag 1 is the current token (lag s is the token s - 1 positions before it).
matplotlib is imported inside the functions, so ``import ih_circuits.sweep`` stays quick.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ih_circuits.sweep.results import OUTCOME_COLUMNS, agreement_rate, cell_table, grid_columns
from ih_circuits.views import _figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LAG_NOTE = "lag sets: lag 1 = the current token, lag 2 = the token before it"
PRED_NOTE = (
    "pred = the theory's argmax of I~ within the selector's degree; 'tie' lists every set within 3 standard errors "
    "of it, and a seed selecting any of them agrees"
)
SEL_NOTE = (
    "sel = the lags of the trained selector's leading subset; found (ordinary transformers, which have no selector) "
    "= the lags find_parents finds"
)
NEEDED_COLUMNS = (
    "status",
    "predicted_lags",
    "theory_decisive",
    "selected_lags",
    "excess_loss",
    "theory_margin",
    "theory_margin_stderr",
)
NOT_AXES = ("run_id", "preset", "seed")
DISAGREEMENT_COLOR = "#c0392b"
FAILED_COLOR = "#d9d9d9"
CELL_WIDTH, CELL_HEIGHT = 1.25, 0.95


@dataclass(frozen=True)
class _MapLayout:
    """Which grid column goes where, the values along each, and the cells (``cell_table`` over all of them)."""

    cols: str | None
    rows: str | None
    panels: tuple[str, ...]
    col_values: list[Any]
    row_values: list[Any]
    panel_values: list[tuple[Any, ...]]
    cells: pd.DataFrame

    def cell(self, panel: tuple[Any, ...], row: Any, col: Any) -> pd.Series | None:
        """The ``cell_table`` row of a panel, row and column value; None where no run has those values."""
        wanted = dict(zip(self.panels, panel, strict=True))
        wanted.update({k: v for k, v in ((self.rows, row), (self.cols, col)) if k is not None})
        match = pd.Series(True, index=self.cells.index)
        for column, value in wanted.items():  # a value a group lacks (NaN) matches that group's cells
            match &= self.cells[column].isna() if _missing(value) else self.cells[column] == value
        found = self.cells[match]
        return found.iloc[0] if len(found) else None


def _check_results(results: pd.DataFrame) -> None:
    """Refuse what is not a non-empty sweep results table, naming what is wrong."""
    if not isinstance(results, pd.DataFrame):
        raise ValueError(f"results must be a sweep results table (a DataFrame); got {type(results).__name__}")
    missing = [c for c in NEEDED_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(
            f"results lacks the columns {missing}: pass run_sweep's table or load_results(DIR); "
            f"columns: {list(results.columns)}"
        )
    if results.empty:
        raise ValueError("results is empty: no run to plot; run the sweep first (run_sweep or ih-circuits sweep)")


def _map_layout(
    results: pd.DataFrame, rows: str | None, cols: str | None, panels: str | Sequence[str] | None
) -> _MapLayout:
    """Place the grid columns: given ones where asked, then the varying ones in the table's order (first ->
    columns, second -> rows, the rest -> panels). Every varying column must be placed somewhere."""
    _check_results(results)
    allowed = [c for c in results.columns if c not in OUTCOME_COLUMNS and c not in NOT_AXES]
    given_panels = (panels,) if isinstance(panels, str) else tuple(panels) if panels is not None else None
    for argument, names in (("rows", (rows,)), ("cols", (cols,)), ("panels", given_panels or ())):
        for name in names:
            if name is not None and name not in allowed:
                raise ValueError(f"{argument}={name!r} is not a grid column of the results; allowed: {allowed}")
    placed = [c for c in (cols, rows, *(given_panels or ())) if c is not None]
    if len(set(placed)) != len(placed):
        raise ValueError(
            f"rows, cols and panels must name different columns; got rows={rows!r}, cols={cols!r}, "
            f"panels={given_panels!r}"
        )
    free = [c for c in grid_columns(results) if c not in placed]
    cols = cols if cols is not None else (free.pop(0) if free else None)
    rows = rows if rows is not None else (free.pop(0) if free else None)
    if given_panels is not None and free:
        raise ValueError(
            f"{free} vary across the runs but are on no axis: add them to panels (or give them as rows/cols)"
        )
    panel_keys = given_panels if given_panels is not None else tuple(free)
    grid = [*panel_keys, *(c for c in (rows, cols) if c is not None)]
    cells = cell_table(results, grid)
    panel_values = list(dict.fromkeys(cells[list(panel_keys)].itertuples(index=False, name=None)))

    def values(column: str | None) -> list[Any]:
        return list(pd.unique(results[column])) if column is not None else [None]

    return _MapLayout(cols, rows, panel_keys, values(cols), values(rows), panel_values, cells)


def _lag_text(lags: str) -> str:
    """A lag set as the figures write it: ``"1,2"``, or ``"empty"`` for the empty set."""
    return lags if lags else "empty"


def _prediction_text(predicted: str) -> str:
    """The theory's prediction: one lag set, or ``"tie 1,2 | 2,3"`` for sets it cannot tell apart."""
    sets = predicted.split(";")
    return _lag_text(predicted) if len(sets) == 1 else "tie " + " | ".join(_lag_text(s) for s in sets)


def _missing(value: Any) -> bool:
    """Whether a grid value is absent: a column of one group that another group's runs lack (NaN)."""
    return isinstance(value, float) and math.isnan(value)


def _value_text(column: str, value: Any) -> str:
    """A grid value as a tick label: lag sets as ``{1,2}``, numbers as written, ``-`` where a group lacks it."""
    if _missing(value):
        return "-"
    return f"{{{value}}}" if column == "parents" else f"{value:g}" if isinstance(value, float) else str(value)


def _axis_text(column: str) -> str:
    return "parents (true lag set)" if column == "parents" else column


def _failed_runs(cell: pd.Series) -> int:
    return int(cell["runs"] - cell["ok"])


def _draw_maps(
    layout: _MapLayout,
    values: Callable[[pd.Series], float],
    texts: Callable[[pd.Series], str],
    *,
    cmap: Any,
    limits: tuple[float, float],
    colorbar_label: str,
    title: Sequence[str],
    notes: Sequence[str],
    mark_disagreements: bool,
) -> Figure:
    """One heatmap panel per panel value: colour = ``values(cell)``, text = ``texts(cell)``. Cells with a
    failed run are hatched (grey when nothing finished), grid points without a run say "no run", and with
    ``mark_disagreements`` every cell where a finished seed selected something else gets a red frame and an x."""
    n_panels = len(layout.panel_values)
    panel_cols = min(n_panels, 3)
    panel_rows = math.ceil(n_panels / panel_cols)
    n_rows, n_cols = len(layout.row_values), len(layout.col_values)
    width = max(6.5, panel_cols * (n_cols * CELL_WIDTH + 1.6) + 1.2)
    height = max(2.6, panel_rows * (n_rows * CELL_HEIGHT + 1.3) + 1.0)
    figure, axes = _figure(width, height, ncols=panel_cols, nrows=panel_rows)
    image = None
    for axis, panel in zip(axes, layout.panel_values, strict=False):
        grid = np.full((n_rows, n_cols), np.nan)
        for r, row in enumerate(layout.row_values):
            for c, col in enumerate(layout.col_values):
                cell = layout.cell(panel, row, col)
                if cell is not None:
                    grid[r, c] = values(cell)
                _draw_cell(axis, cell, r, c, texts, mark_disagreements)
        image = axis.imshow(grid, cmap=cmap, vmin=limits[0], vmax=limits[1], aspect="auto")
        _label_axes(axis, layout, panel)
    for axis in axes[n_panels:]:
        axis.set_axis_off()
    colorbar = figure.colorbar(image, ax=list(axes[:n_panels]), shrink=0.9)
    colorbar.set_label(colorbar_label)
    figure.suptitle("\n".join(textwrap.fill(line, int(width * 12)) for line in title), fontsize=11)
    figure.supxlabel("\n".join(textwrap.fill(line, int(width * 16)) for line in notes), fontsize=8, color="#444444")
    return figure


def _draw_cell(
    axis: Axes,
    cell: pd.Series | None,
    r: int,
    c: int,
    texts: Callable[[pd.Series], str],
    mark_disagreements: bool,
) -> None:
    """The text of one cell and its marks: hatching for failed runs, a red frame and x for a disagreement."""
    from matplotlib.patches import Rectangle

    if cell is None:
        axis.text(c, r, "no run", ha="center", va="center", fontsize=8, color="#555555")
        return
    text = texts(cell)
    if _failed_runs(cell):
        text += ("\n" if cell["ok"] else "") + f"failed {_failed_runs(cell)}"
        hatch = Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="//", edgecolor="#7f7f7f", linewidth=0)
        hatch.set_gid("failed")
        axis.add_patch(hatch)
    axis.text(c, r, text, ha="center", va="center", fontsize=8, bbox={"facecolor": "white", "alpha": 0.6, "lw": 0})
    if mark_disagreements and cell["ok"] and not cell["agrees"]:
        frame = Rectangle((c - 0.45, r - 0.45), 0.9, 0.9, fill=False, edgecolor=DISAGREEMENT_COLOR, linewidth=3)
        frame.set_gid("disagreement")
        axis.add_patch(frame)
        cross = axis.text(
            c + 0.4, r - 0.4, "x", ha="right", va="top", fontsize=11, fontweight="bold", color=DISAGREEMENT_COLOR
        )
        cross.set_gid("disagreement")


def _label_axes(axis: Axes, layout: _MapLayout, panel: tuple[Any, ...]) -> None:
    """Tick labels with the grid values (rotated when long), axis names, and the panel's values as its title."""
    if layout.cols is None:
        axis.set_xticks([])
    else:
        labels = [_value_text(layout.cols, v) for v in layout.col_values]
        rotate = len(labels) > 4 or max(len(t) for t in labels) > 8
        axis.set_xticks(range(len(labels)), labels, rotation=30 if rotate else 0, ha="right" if rotate else "center")
        axis.set_xlabel(_axis_text(layout.cols))
    if layout.rows is None:
        axis.set_yticks([])
    else:
        axis.set_yticks(range(len(layout.row_values)), [_value_text(layout.rows, v) for v in layout.row_values])
        axis.set_ylabel(_axis_text(layout.rows))
    if layout.panels:
        axis.set_title(", ".join(f"{k} = {_value_text(k, v)}" for k, v in zip(layout.panels, panel, strict=True)))
    elif layout.cols is None:
        axis.set_title("one cell (no grid column varies)")


def agreement_summary(results: pd.DataFrame) -> str:
    """'selected = predicted in 7 of 8 finished runs (88%)', with the failures, or why there is no rate."""
    finished = int((results["status"] == "ok").sum())
    failed = len(results) - finished
    rate = agreement_rate(results)
    failures = f"; {failed} failed" if failed else ""
    if math.isnan(rate):
        return f"no finished run{failures}"
    return f"selected = predicted in {round(rate * finished)} of {finished} finished runs ({rate:.0%}){failures}"


def plot_theory_map(
    results: pd.DataFrame,
    rows: str | None = None,
    cols: str | None = None,
    panels: str | Sequence[str] | None = None,
) -> Figure:
    """The theory-vs-practice map: one cell per grid cell, seeds aggregated (``cell_table``).

    Each cell reads "pred P / sel S / k/n": the theory's prediction ("tie A | B" when it cannot tell sets apart:
    selecting any of them agrees), the most common selected lag set, and in how many of the n finished seeds
    the selector chose a predicted set ("found F" for ordinary transformers: the lags ``find_parents`` finds);
    the colour is that selection frequency (green = always, red = never, grey = nothing finished). Every cell
    where a finished seed selected something other than the prediction has a thick red frame and an x; cells
    with failed runs are hatched and say "failed n". The title gives the agreement rate over finished runs
    (``agreement_rate``).

    Args:
        results: the results table (``run_sweep``'s, or ``load_results(DIR)``).
        rows, cols: grid columns for the y and x axes (default: the second and first varying grid column).
        panels: further grid columns, one panel per combination of their values (default: the varying
            columns not on an axis). With one varying column the map is one row; with none, one cell.

    Raises:
        ValueError: an empty or foreign table, a column that is not a grid column, a column placed twice, or
            (with explicit ``panels``) a varying column placed nowhere.

    >>> results = pd.DataFrame({"run_id": ["a", "b", "c"], "seed": 0, "alpha": [0.05, 1.0, 3.0], "status": "ok",
    ...     "predicted_lags": ["1,2", "1,2", "1;2"], "theory_decisive": [True, True, False],
    ...     "selected_lags": ["1,2", "1,3", "2"], "verdict": "holds", "excess_loss": [0.04, 0.03, 0.05],
    ...     "theory_margin": [0.02, 0.01, 0.001], "theory_margin_stderr": [0.001, 0.001, 0.002]})
    >>> axis = plot_theory_map(results).axes[0]  # one row, alpha across
    >>> [" ".join(t.get_text().split()) for t in axis.texts]
    ['pred 1,2 sel 1,2 1/1 seeds', 'pred 1,2 sel 1,3 0/1 seeds', 'x', 'pred tie 1 | 2 sel 2 1/1 seeds']
    """
    from matplotlib.colors import LinearSegmentedColormap

    layout = _map_layout(results, rows, cols, panels)
    cmap = LinearSegmentedColormap.from_list("agreement", ["#f2a7a0", "#f7efc4", "#9fd8a0"]).with_extremes(
        bad=FAILED_COLOR
    )

    def text(cell: pd.Series) -> str:
        if not cell["ok"]:
            return ""
        chose = round(cell["selection_frequency"] * cell["ok"])
        pred, sel = _prediction_text(cell["predicted_lags"]), _lag_text(cell["selected_lags"])
        return f"pred {pred}\n{cell.get('compared', 'sel')} {sel}\n{chose}/{cell['ok']} seeds"

    return _draw_maps(
        layout,
        lambda cell: cell["selection_frequency"],
        text,
        cmap=cmap,
        limits=(0.0, 1.0),
        colorbar_label="selection frequency\n(share of seeds selecting pred)",
        title=["Theory vs practice", agreement_summary(results)],
        notes=[PRED_NOTE, SEL_NOTE, LAG_NOTE],
        mark_disagreements=True,
    )


def plot_excess_loss_map(
    results: pd.DataFrame,
    rows: str | None = None,
    cols: str | None = None,
    panels: str | Sequence[str] | None = None,
) -> Figure:
    """The mean excess loss over the Bayes predictor (nats, last evaluation, over finished seeds) per grid cell,
    in the layout of ``plot_theory_map`` (same arguments and errors); each cell writes its number, cells with
    failed runs are hatched and say "failed n", grid points without a run say "no run"."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    layout = _map_layout(results, rows, cols, panels)
    finite = layout.cells["excess_loss"].dropna()
    limits = (min(0.0, float(finite.min())), float(finite.max())) if len(finite) else (0.0, 1.0)
    if limits[0] == limits[1]:
        limits = (limits[0], limits[0] + 1e-3)

    def text(cell: pd.Series) -> str:
        if not cell["ok"]:
            return ""
        return "not evaluated" if math.isnan(cell["excess_loss"]) else f"{cell['excess_loss']:.3g}"

    cmap = ListedColormap(matplotlib.colormaps["YlOrRd"](np.linspace(0.0, 0.6, 256))).with_extremes(bad=FAILED_COLOR)
    return _draw_maps(
        layout,
        lambda cell: cell["excess_loss"],
        text,
        cmap=cmap,
        limits=limits,
        colorbar_label="excess loss over Bayes (nats)",
        title=["Excess loss over the Bayes predictor (nats)", "mean over the finished seeds of each cell"],
        notes=[LAG_NOTE],
        mark_disagreements=False,
    )


def plot_margin(results: pd.DataFrame) -> Figure:
    """How sure the theory was against how often training agreed: one point per grid cell with a finished run.

    x = the mean theory margin, I~(best) minus the next best I~ within the selector's degree, with a bar of
    3 standard errors each side (a bar crossing 0 is a tie); y = the selection frequency (share of finished
    seeds whose selected lag set is a predicted one). Green points agree in every seed, red ones do not; open
    markers are ties. Cells without a finished run (or without a margin: no other lag set within the degree)
    are counted in the title, not drawn.
    """
    _check_results(results)
    cells = cell_table(results)
    drawn = cells[(cells["ok"] > 0) & cells["theory_margin"].notna()]
    figure, (axis,) = _figure(6.5, 3.6)
    for agrees, color, label in ((True, "tab:green", "agrees in every seed"), (False, DISAGREEMENT_COLOR, "disagrees")):
        for decisive in (True, False):
            group = drawn[(drawn["agrees"] == agrees) & (drawn["theory_decisive"] == decisive)]
            if group.empty:
                continue
            axis.errorbar(
                group["theory_margin"],
                group["selection_frequency"],
                xerr=3 * group["theory_margin_stderr"].fillna(0.0),
                fmt="o",
                color=color,
                markerfacecolor=color if decisive else "white",
                markeredgecolor=color if not decisive else "black",
                label=f"{label}{'' if decisive else ', a tie'} ({len(group)})",
                markersize=6,
                alpha=0.8,
                elinewidth=1,
                capsize=2,
            )
    if drawn.empty:
        axis.text(0.5, 0.5, "no finished run with a margin: nothing to place", ha="center", transform=axis.transAxes)
    else:
        axis.legend(fontsize=8, loc="lower right")
    axis.set_ylim(-0.05, 1.05)
    axis.axvline(0.0, color="#888888", linewidth=0.8)
    axis.set_xlabel("theory margin: I~(best) − next best I~, ± 3 standard errors")
    axis.set_ylabel("selection frequency\n(share of seeds selecting predicted)")
    skipped = len(cells) - len(drawn)
    note = f"; {skipped} without a finished run or a margin, not shown" if skipped else ""
    axis.set_title(f"Theory margin against agreement\n{len(drawn)} grid cells{note}", fontsize=10)
    return figure
