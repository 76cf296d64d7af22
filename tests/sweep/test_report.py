"""The sweep report from a fake sweep directory (sweep.json + results.csv, no training): what a reader needs is
there, the figures are inline, missing values are explained, and nothing is loaded from the network."""

import html
import json
import re
import shutil

import pytest

from ih_circuits.sweep import SweepSpec, load_results, sweep_report
from ih_circuits.sweep.execute import RunOutcome
from ih_circuits.sweep.results import write_results
from ih_circuits.sweep.store import RECORD, RUNS, SPEC_FILE, write_outcome
from tests.sweep.frames import agreeing, failed, results_table

SPEC = {"preset": "cwa", "seeds": [0, 1], "steps": 40, "grid": {"alpha": [0.05, 1.0], "parents": [[1, 2], [1, 3]]}}
GRID = {"alpha": [0.05, 1.0], "parents": [(1, 2), (1, 3)]}
IMAGE = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")
REMOTE = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)
DISAGREEING = "alpha=1.0_parents=1,3_seed=1"
FAILED = ("alpha=0.05_parents=1,3_seed=0", "alpha=0.05_parents=1,3_seed=1")


def mixed(cell, seed):
    """(1.0, 1,3) seed 1 selects 1,2 against the prediction; (0.05, 1,3) fails in both seeds."""
    if (cell["alpha"], cell["parents"]) == (0.05, (1, 3)):
        return failed(cell, seed)
    result = agreeing(cell, seed)
    if (cell["alpha"], cell["parents"], seed) == (1.0, (1, 3), 1):
        result["selected_lags"] = "1,2"
    return result


def fake_sweep(directory, outcome=mixed):
    """A sweep directory as run_sweep leaves it (spec, run records, results.csv), minus the run checkpoints the
    report does not read."""
    directory.mkdir()
    (directory / SPEC_FILE).write_text(json.dumps(SweepSpec.from_dict(SPEC).to_dict()))
    results = results_table(GRID, seeds=(0, 1), outcome=outcome)
    assert list(results["run_id"]) == [r.run_id for r in SweepSpec.from_dict(SPEC).runs()]
    for record in results.to_dict("records"):
        write_outcome(directory, record["run_id"], RunOutcome(record))
    write_results(directory, results)
    return directory


def section(page, heading):
    """The HTML between an <h2> heading and the next one."""
    return page.split(f"<h2>{heading}</h2>", 1)[1].split("<h2>", 1)[0]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    directory = fake_sweep(tmp_path_factory.mktemp("report") / "sweep")
    path = sweep_report(directory)
    assert path == directory / "report.html"
    return path.read_text(encoding="utf-8")


def test_the_report_explains_itself_and_gives_the_agreement_rate(page):
    reader = section(page, "How to read this report")
    for term in ("<b>predicted</b>", "<b>selected</b>", "<b>found</b>", "<b>verdict</b>", "lag 1 is the current"):
        assert term in reader
    assert "selected = predicted in 5 of 6 finished runs (83%); 2 failed." in section(page, "Agreement")


def test_the_three_figures_are_inline_pngs(page):
    assert len(IMAGE.findall(page)) == 3
    assert len(re.findall(r"<img [^>]*src='data:image/png;base64,", page)) == 3


def test_disagreements_and_failures_are_listed(page):
    problems = section(page, "Disagreements and failed runs")
    assert "1 disagreeing and 2 failed runs" in problems
    for run_id in (DISAGREEING, *FAILED):
        assert f"<td>{run_id}</td>" in problems
    assert problems.count("MemoryBudgetError") == 2
    assert "alpha=0.05_parents=1,2_seed=0" not in problems


def test_missing_values_are_explained_or_blank_never_nan(page):
    text = IMAGE.sub("", page)
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    cells = section(page, "Cells (seeds pooled)")
    assert cells.count("<td>no finished run</td>") == 8  # the failed cell: 2 answers, decisive and 5 numbers


def test_the_spec_is_shown_as_read_back(page):
    shown = section(page, "Spec").split("<pre>")[1].split("</pre>")[0]
    assert json.loads(html.unescape(shown)) == SweepSpec.from_dict(SPEC).to_dict()


def test_nothing_is_loaded_from_elsewhere(page):
    assert not REMOTE.search(page)
    assert "<script" not in page and "<link" not in page and "@import" not in page


def test_a_sweep_where_nothing_finished_still_reports(tmp_path):
    page = sweep_report(fake_sweep(tmp_path / "sweep", outcome=failed), tmp_path / "out" / "all failed.html")
    text = page.read_text(encoding="utf-8")
    assert "no finished run; 8 failed." in section(text, "Agreement")
    assert len(IMAGE.findall(text)) == 3 and not re.search(r"\bnan\b", IMAGE.sub("", text), re.IGNORECASE)


def test_bad_directories_and_outputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a sweep directory: sweep.json is missing"):
        sweep_report(tmp_path)
    directory = fake_sweep(tmp_path / "sweep")
    with pytest.raises(ValueError, match="it is a directory"):
        sweep_report(directory, output=tmp_path)
    shutil.rmtree(directory / RUNS)
    with pytest.raises(ValueError, match="holds no finished run yet"):
        sweep_report(directory)


def test_the_report_reads_the_records_not_a_hand_edited_table(tmp_path):
    """results.csv is a copy for other tools: edited to claim agreement everywhere, or replaced by garbage, the
    report is the records' (its text identical to the unedited directory's report)."""
    directory = fake_sweep(tmp_path / "sweep")
    results = load_results(directory)
    results["selected_lags"] = results["predicted_lags"]
    results["status"] = "ok"
    write_results(directory, results)
    edited = section(sweep_report(directory).read_text(encoding="utf-8"), "Agreement")
    assert "selected = predicted in 5 of 6 finished runs (83%); 2 failed." in edited
    (directory / "results.csv").write_text("garbage\n1\n")
    assert "5 of 6 finished runs" in section(sweep_report(directory).read_text(encoding="utf-8"), "Agreement")
    with pytest.raises(ValueError, match=r"results.csv is not a results table: it lacks the columns \['run_id'"):
        load_results(directory)
    record = directory / RUNS / DISAGREEING / RECORD
    record.write_text(record.read_text().replace('"selected_lags": "1,2"', '"selected_lags": "1,3"'))
    agreement = section(sweep_report(directory).read_text(encoding="utf-8"), "Agreement")
    assert "selected = predicted in 5 of 5 finished runs (100%); 2 failed." in agreement  # the edit fails its checksum
    header = " ".join(sweep_report(directory).read_text(encoding="utf-8").split())
    assert (
        "preset cwa, 4 grid cells x 2 seeds; 8 runs: 5 finished, 2 failed, 1 not run yet (or with a damaged" in header
    )
