"""Sweep figures from synthetic results tables: what each map cell says and how it is coloured and marked,
failed and missing runs, the panel layout, argument errors, and no overlapping text."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from ih_circuits.sweep import plot_excess_loss_map, plot_margin, plot_theory_map
from ih_circuits.sweep.results import OUTCOME_COLUMNS
from tests.figures import all_texts, assert_texts_inside_and_apart
from tests.sweep.frames import agreeing, failed, results_table

GRID = {"alpha": [0.05, 1.0], "parents": [(1, 2), (1, 3)]}


def one_disagreement(cell, seed):
    """Every run agrees but seed 1 of (alpha 1.0, parents 1,3), which selected 1,2."""
    outcome = agreeing(cell, seed)
    if cell["alpha"] == 1.0 and cell["parents"] == (1, 3) and seed == 1:
        outcome["selected_lags"] = "1,2"
    return outcome


def with_failures(cell, seed):
    """(0.05, 1,3) fails in both seeds, (1.0, 1,2) in seed 0 only; the rest agrees."""
    spot = (cell["alpha"], cell["parents"])
    if spot == (0.05, (1, 3)) or (spot == (1.0, (1, 2)) and seed == 0):
        return failed(cell, seed)
    return agreeing(cell, seed)


def heatmaps(figure):
    return [axis for axis in figure.axes if axis.images]


def cell_texts(axis):
    """{(column, row): text} of the cell annotations (the x markers are left out)."""
    return {tuple(map(round, t.get_position())): t.get_text() for t in axis.texts if t.get_gid() is None}


def marked(axis, gid):
    """The (column, row) cells holding a patch with this gid."""
    return {
        (round(p.get_x() + p.get_width() / 2), round(p.get_y() + p.get_height() / 2))
        for p in axis.patches
        if p.get_gid() == gid
    }


def test_map_shows_prediction_selection_frequency_and_marks_the_disagreement():
    results = results_table(GRID, outcome=one_disagreement)
    figure = plot_theory_map(results)
    (axis,) = heatmaps(figure)
    # columns = alpha (first varying), rows = parents (second), in the table's order
    assert [t.get_text() for t in axis.get_xticklabels()] == ["0.05", "1"]
    assert [t.get_text() for t in axis.get_yticklabels()] == ["{1,2}", "{1,3}"]
    texts = cell_texts(axis)
    assert texts[(0, 0)] == "pred 1,2\nsel 1,2\n2/2 seeds"
    assert texts[(1, 1)] == "pred 1,3\nsel 1,3\n1/2 seeds"
    image = axis.images[0]
    assert image.get_array()[0, 0] == 1.0 and image.get_array()[1, 1] == 0.5
    agree, half = (image.cmap(image.norm(v)) for v in (1.0, 0.5))
    assert agree[1] > agree[0] and half != agree  # agreement is green; half agreement another colour
    assert marked(axis, "disagreement") == {(1, 1)}
    crosses = [t for t in axis.texts if t.get_gid() == "disagreement"]
    assert [t.get_text() for t in crosses] == ["x"] and crosses[0].get_position()[0] > 1
    assert marked(axis, "failed") == set()
    assert "selected = predicted in 7 of 8 finished runs (88%)" in figure._suptitle.get_text()
    assert "lag 1 = the current token" in figure._supxlabel.get_text()


def test_failed_cells_are_hatched_and_say_so():
    figure = plot_theory_map(results_table(GRID, outcome=with_failures))
    (axis,) = heatmaps(figure)
    texts = cell_texts(axis)
    assert texts[(0, 1)] == "failed 2"
    assert texts[(1, 0)] == "pred 1,2\nsel 1,2\n1/1 seeds\nfailed 1"
    assert marked(axis, "failed") == {(0, 1), (1, 0)}
    assert marked(axis, "disagreement") == set()
    assert np.isnan(axis.images[0].get_array()[1, 0]) or axis.images[0].get_array().mask[1, 0]
    assert "5 of 5 finished runs (100%); 3 failed" in figure._suptitle.get_text()


def test_no_finished_run_still_plots_every_figure_without_nan():
    results = results_table(GRID, outcome=failed)
    figures = [plot_theory_map(results), plot_excess_loss_map(results), plot_margin(results)]
    assert "no finished run; 8 failed" in figures[0]._suptitle.get_text()
    assert set(cell_texts(heatmaps(figures[1])[0]).values()) == {"failed 2"}
    assert "nothing to place" in " ".join(t.get_text() for t in figures[2].axes[0].texts)
    for figure in figures:
        FigureCanvasAgg(figure).draw()
        assert not any("nan" in t.get_text().lower() for t in all_texts(figure))


def test_a_grid_point_without_a_run_says_so():
    results = results_table(GRID)
    partial = results[~results["run_id"].str.startswith("alpha=1.0_parents=1,3")]
    (axis,) = heatmaps(plot_theory_map(partial))
    assert cell_texts(axis)[(1, 1)] == "no run"
    assert np.isnan(axis.images[0].get_array()[1, 1]) or axis.images[0].get_array().mask[1, 1]


def test_three_keys_make_one_panel_per_value_of_the_third():
    grid = {**GRID, "vocab_size": [3, 5, 7]}
    figure = plot_theory_map(results_table(grid))
    axes = heatmaps(figure)
    assert [a.get_title() for a in axes] == ["vocab_size = 3", "vocab_size = 5", "vocab_size = 7"]
    assert all(a.images[0].get_array().shape == (2, 2) for a in axes)
    swapped = heatmaps(plot_theory_map(results_table(grid), rows="vocab_size", cols="parents", panels="alpha"))
    assert [a.get_title() for a in swapped] == ["alpha = 0.05", "alpha = 1"]
    assert swapped[0].images[0].get_array().shape == (3, 2)
    assert len(heatmaps(plot_excess_loss_map(results_table(grid), panels=["vocab_size", "alpha"]))) == 6


def test_one_key_is_one_row_and_no_key_is_one_cell():
    (row,) = heatmaps(plot_theory_map(results_table({"parents": [(1, 2), (1, 3), (2, 3), (1,)]})))
    assert row.images[0].get_array().shape == (1, 4) and row.get_yticks().size == 0
    assert cell_texts(row)[(3, 0)] == "pred 1\nsel 1\n2/2 seeds"
    (cell,) = heatmaps(plot_theory_map(results_table({})))
    assert cell.images[0].get_array().shape == (1, 1) and cell_texts(cell) == {(0, 0): "pred 1,2\nsel 1,2\n2/2 seeds"}


def test_excess_loss_map_writes_the_mean_over_finished_seeds():
    figure = plot_excess_loss_map(results_table(GRID, outcome=with_failures))
    (axis,) = heatmaps(figure)
    texts = cell_texts(axis)
    assert texts[(0, 0)] == "0.055"  # seeds 0 and 1: 0.05 and 0.06
    assert texts[(1, 0)] == "0.06\nfailed 1" and texts[(0, 1)] == "failed 2"
    assert axis.images[0].get_array()[0, 0] == pytest.approx(0.055)
    assert "excess loss" in figure.axes[-1].get_ylabel()


def test_margin_places_each_finished_cell_coloured_by_agreement():
    results = results_table(GRID, outcome=one_disagreement)
    figure = plot_margin(results)
    axis = figure.axes[0]
    agreeing_points, disagreeing_points = (c.lines[0].get_xydata().tolist() for c in axis.containers)
    assert len(agreeing_points) == 3 and disagreeing_points == [[pytest.approx(0.01), 0.5]]
    bars = axis.containers[1].lines[2][0].get_segments()[0]  # +- 3 standard errors of 0.001 around 0.01
    assert bars[:, 0].tolist() == [pytest.approx(0.007), pytest.approx(0.013)]
    assert "I~(best)" in axis.get_xlabel() and "3 standard errors" in axis.get_xlabel()
    assert "selection frequency" in axis.get_ylabel()


def tie_in_one_cell(cell, seed):
    """(alpha 1.0, parents 1,3): the theory cannot tell 1,3 from 1,2; seed 1 selects 1,2, which agrees."""
    outcome = agreeing(cell, seed)
    if cell["alpha"] == 1.0 and cell["parents"] == (1, 3):
        outcome.update(predicted_lags="1,3;1,2", theory_decisive=False, theory_margin=0.0005)
        outcome["selected_lags"] = "1,2" if seed == 1 else "1,3"
    return outcome


def test_a_tie_is_shown_as_a_tie_and_selecting_any_tied_set_agrees():
    results = results_table(GRID, outcome=tie_in_one_cell)
    (axis,) = heatmaps(plot_theory_map(results))
    texts = cell_texts(axis)
    assert texts[(1, 1)] == "pred tie 1,3 | 1,2\nsel 1,3\n2/2 seeds"
    assert not any(patch.get_gid() == "disagreement" for patch in axis.patches)
    margin = plot_margin(results).axes[0]
    (ties,) = [c for c in margin.containers if "a tie" in c.get_label()]
    assert ties.lines[0].get_markerfacecolor() == "white" and ties.lines[0].get_xydata().tolist() == [[0.0005, 1.0]]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"rows": "nope"}, r"rows='nope' is not a grid column of the results; allowed: \['alpha', 'parents'"),
        ({"panels": ["status"]}, r"panels='status' is not a grid column"),
        ({"rows": "alpha", "cols": "alpha"}, "rows, cols and panels must name different columns"),
        ({"panels": []}, r"\['vocab_size'\] vary across the runs but are on no axis"),
    ],
)
def test_bad_placements_are_refused(arguments, message):
    results = results_table({**GRID, "vocab_size": [3, 5]})
    for plot in (plot_theory_map, plot_excess_loss_map):
        with pytest.raises(ValueError, match=message):
            plot(results, **arguments)


@pytest.mark.parametrize(
    ("results", "message"),
    [
        (results_table(GRID).iloc[:0], "results is empty"),
        (results_table(GRID).drop(columns="selected_lags"), r"results lacks the columns \['selected_lags'\]"),
        ({"status": ["ok"]}, "results must be a sweep results table"),
    ],
)
def test_tables_that_are_not_results_are_refused(results, message, without_runtime_typecheck):
    for plot in (plot_theory_map, plot_excess_loss_map, plot_margin):
        with pytest.raises(ValueError, match=message):
            plot(results)


def test_no_text_overlaps_or_leaves_the_figure():
    mixed = {**GRID, "parents": [(1, 2), (1, 3), (2, 3), (1,)], "vocab_size": [3, 5, 7]}
    results = results_table(mixed, outcome=with_failures)
    figures = [
        plot_theory_map(results),
        plot_theory_map(results_table(GRID, outcome=one_disagreement)),
        plot_excess_loss_map(results),
        plot_theory_map(results_table({"parents": [(1, 2), (1, 3), (2, 3), (1,), (1, 2, 3)]})),
        plot_theory_map(results_table({})),
        plot_margin(results_table(GRID, outcome=one_disagreement)),
        plot_margin(results_table(GRID, outcome=failed)),
    ]
    for figure in figures:
        assert_texts_inside_and_apart(figure)


@pytest.mark.e2e  # a fresh interpreter importing torch: seconds
def test_importing_the_sweep_package_does_not_load_matplotlib():
    code = "import sys, ih_circuits.sweep; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_synthetic_tables_have_the_documented_columns():
    """The frames used here carry every column the results table documents, in its order."""
    results = results_table(GRID, outcome=with_failures)
    assert list(results.columns[:5]) == ["run_id", "preset", "seed", "alpha", "parents"]
    assert tuple(results.columns[-len(OUTCOME_COLUMNS) :]) == OUTCOME_COLUMNS
    assert (results["status"] == "failed").sum() == 3


def test_a_table_read_with_plain_pandas_or_without_tie_columns_still_agrees(tmp_path):
    """pd.read_csv turns "1" into 1 and "" into NaN; the helpers read lag sets as text whatever they became. A run
    without the tie column (written before it existed) counts as not decisive, never as decisive."""
    import pandas as pd

    from ih_circuits.sweep import agreement_rate, cell_table

    results = results_table({"parents": [(1,), (2,)]})
    results.to_csv(tmp_path / "plain.csv", index=False)
    plain = pd.read_csv(tmp_path / "plain.csv")
    assert plain["predicted_lags"].dtype.kind == "i" and plain["selected_lags"].tolist() == [1, 1, 2, 2]
    assert agreement_rate(plain) == 1.0 and cell_table(plain)["agrees"].all()
    results["theory_decisive"] = float("nan")
    assert not cell_table(results)["theory_decisive"].any()


def test_cell_table_has_share_tv_only_when_the_optimal_selector_was_computed():
    from ih_circuits.sweep import cell_table

    results = results_table(GRID)
    assert "share_tv" not in cell_table(results)
    results["share_tv"] = [0.1 * (i % 2) for i in range(len(results))]
    assert cell_table(results)["share_tv"].tolist() == pytest.approx([0.05] * len(cell_table(results)))


def test_ordinary_transformers_are_compared_on_their_found_lags():
    """A transformer has no selector: its cells compare the prediction with find_parents' answer ("found"),
    and a found set outside the prediction is a disagreement, in the map and in the rate."""
    from ih_circuits.sweep.results import agreement_rate, cell_table, disagreements, results_frame

    paper = results_table({"parents": [(1, 2)]}, seeds=(0,))
    transformers = results_table({"parents": [(1, 2), (2, 3)]}, seeds=(0,))
    transformers["preset"], transformers["selected_lags"] = "transformer", ""
    transformers.loc[1, "found_lags"] = "1,2,3"
    paper["group"], transformers["group"] = "paper", "tf"
    results = results_frame(pd.concat([paper, transformers]).to_dict("records"))
    cells = cell_table(results)
    assert cells[["group", "parents", "compared", "selected_lags", "agrees"]].values.tolist() == [
        ["paper", "1,2", "sel", "1,2", True],
        ["tf", "1,2", "found", "1,2", True],
        ["tf", "2,3", "found", "1,2,3", False],
    ]
    assert agreement_rate(results) == pytest.approx(2 / 3)
    assert disagreements(results)["run_id"].tolist() == ["parents=2,3_seed=0"]
    axis = heatmaps(plot_theory_map(results, cols="parents", rows="group"))[0]
    assert cell_texts(axis)[(1, 1)] == "pred 2,3\nfound 1,2,3\n0/1 seeds"
    assert marked(axis, "disagreement") == {(1, 1)}


def test_a_map_of_several_groups_shows_every_group_s_cells():
    """Grid columns one group lacks are NaN in the other's rows: those cells are still found and drawn (their
    missing value labelled "-"), never left as "no run"."""
    from ih_circuits.sweep.results import results_frame

    paper = results_table({"max_degree": [1, 2]}, seeds=(0,))
    transformers = results_table({"parents": [(1, 2)]}, seeds=(0,))
    transformers["preset"] = "transformer"
    paper["group"], transformers["group"] = "paper", "tf"
    results = results_frame(pd.concat([paper, transformers]).to_dict("records"))
    axis = heatmaps(plot_theory_map(results, cols="group", rows="max_degree"))[0]
    assert [t.get_text() for t in axis.get_yticklabels()] == ["1", "2", "-"]
    texts = cell_texts(axis)
    assert texts[(0, 0)].startswith("pred 1,2\nsel") and texts[(1, 2)].startswith("pred 1,2\nfound")
    assert texts[(1, 0)] == texts[(0, 2)] == "no run"
