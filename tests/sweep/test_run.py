"""Running sweeps: records that agree with the saved runs, failures recorded, re-runs that skip, Ray = local."""

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ih_circuits import NGramTask, TrainingRun, theory
from ih_circuits.probes import find_parents
from ih_circuits.sweep import agreement_rate, cell_table, disagreements, load_results, run_sweep, sweep_report
from ih_circuits.sweep.execute import selected_lags
from ih_circuits.sweep.store import RECORD, RUNS

# Every test here runs sweeps in spawned worker processes or on Ray (the module fixture alone takes seconds).
pytestmark = pytest.mark.e2e

# Two cells that train (30 steps is enough for the selector to lead with the true pair at d = 3, alpha 0.05:
# the paper's model picks it within the first 10-20 steps), and two whose batch the memory budget refuses.
SPEC = {
    "preset": "cwa",
    "seeds": [0],
    "steps": 30,
    "fixed": {"alpha": 0.05},
    "grid": {"parents": [[1, 2], [1, 3]], "batch_size": [512, 10**9]},
    "probe": {"n_sequences": 64},
}
ID = "parents=1,3_batch_size=512_seed=0"


def _same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.drop(columns="wall_time_s"), b.drop(columns="wall_time_s"))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "local"
    return out, run_sweep(SPEC, out, workers=2, quiet=True)


def test_records_agree_with_the_saved_runs_and_the_theory(local):
    out, results = local
    assert list(results["run_id"]) == [
        f"parents={p}_batch_size={b}_seed=0" for p in ("1,2", "1,3") for b in (512, 1000000000)
    ]
    _same_table(results, load_results(out))
    row = results.set_index("run_id").loc[ID]
    run = TrainingRun.load(out / RUNS / ID / "run")
    scores = theory.selection_scores(3, (1, 3), 0.05, n_kernels=1000, seed=0, window=3)
    per_kernel = dict(zip(scores.modified, scores.modified_per_kernel, strict=True))
    runner_up = max((s for s in scores.modified if len(s) <= 2 and s != (1, 3)), key=scores.modified.get)
    paired = per_kernel[(1, 3)] - per_kernel[runner_up]
    assert run.predicted_lags == (1, 3) and row["predicted_lags"] == "1,3" and row["theory_decisive"]
    assert row["theory_margin"] == pytest.approx(float(paired.mean()), rel=1e-9)
    assert row["theory_margin_stderr"] == pytest.approx(float(paired.std() / 1000**0.5), rel=1e-9)
    assert row["theory_margin"] > 3 * row["theory_margin_stderr"] > 0
    assert row["selected_lags"] == ",".join(map(str, selected_lags(run))) == "1,3"
    assert row["excess_loss"] == pytest.approx(float(run.history["excess_loss"].iloc[-1]), rel=1e-12)
    found = find_parents(run.model, run.task, n_sequences=256, seed=0).lags
    assert row["found_lags"] == ",".join(map(str, found)) == "1,3"
    assert row["status"] == "ok" and row["error"] == "" and row["steps"] == 30


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(local):
    _, results = local
    failed = results[results["status"] == "failed"]
    assert list(failed["batch_size"]) == [10**9, 10**9]
    assert failed["error"].str.startswith("MemoryBudgetError: sampling").all()
    assert failed["excess_loss"].isna().all() and (failed["predicted_lags"] == "").all()
    assert agreement_rate(results) == 1.0
    cells = cell_table(results)
    assert list(cells["ok"]) == [1, 0, 1, 0] and math.isnan(cells["selection_frequency"].iloc[1])
    assert list(disagreements(results)["run_id"]) == list(failed["run_id"])


def test_rerun_skips_finished_runs_and_retries_failed_ones(local):
    out, results = local
    records = {r: (out / RUNS / r / RECORD).stat().st_mtime_ns for r in results["run_id"]}
    again = run_sweep(SPEC, out, workers=2, quiet=True)
    _same_table(results.drop(columns="error"), again.drop(columns="error"))
    for run_id, mtime in records.items():
        finished = results.set_index("run_id").loc[run_id, "status"] == "ok"
        assert ((out / RUNS / run_id / RECORD).stat().st_mtime_ns == mtime) == finished, run_id


def test_ray_gives_the_same_table(local, tmp_path):
    pytest.importorskip("ray")
    _, results = local
    _same_table(results, run_sweep(SPEC, tmp_path / "ray", backend="ray", workers=2, quiet=True))


def test_directories_are_not_overwritten_unless_asked(local, tmp_path):
    out, _ = local
    other = {**SPEC, "seeds": [1]}
    with pytest.raises(ValueError, match="holds a different sweep"):
        run_sweep(other, out, quiet=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files that are not a sweep"):
        run_sweep(SPEC, foreign, quiet=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        run_sweep(SPEC, tmp_path / "x", backend="slurm")
    with pytest.raises(ValueError, match="address='auto' is for backend='ray'"):
        run_sweep(SPEC, tmp_path / "x", address="auto")
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        run_sweep(SPEC, tmp_path / "x", workers=0)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("backend", "workers"), [("local", 1), ("local", 2), ("ray", 2)])
def test_a_worker_that_dies_fails_its_run_and_the_others_finish(backend, workers):
    """The local pool goes down with every run in flight; only the run that kills its worker may fail."""
    from ih_circuits.sweep.backends import run_local, run_ray
    from ih_circuits.sweep.spec import SweepSpec
    from tests.sweep.dying import die_on_seed_1

    if backend == "ray":
        pytest.importorskip("ray")
    runs = SweepSpec.from_dict({"preset": "cwa", "seeds": [0, 1, 2, 3]}).runs()
    if backend == "local":
        outcomes = list(run_local(runs, workers, execute=die_on_seed_1))
    else:
        outcomes = list(run_ray(runs, workers, None, execute=die_on_seed_1))
    status = {run.seed: outcome.record["status"] for run, outcome in outcomes}
    assert len(outcomes) == 4 and status == {0: "ok", 1: "failed", 2: "ok", 3: "ok"}
    outcomes = dict(outcomes)
    error = outcomes[runs[1]].record["error"]
    assert error.startswith("worker process died" if backend == "local" else "Ray task failed")


def _write_spec(path: Path, steps: int, seeds: str) -> Path:
    path.write_text(
        f'preset = "cwa"\nseeds = {seeds}\nsteps = {steps}\n[probe]\nn_sequences = 64\n'
        "[grid]\nparents = [[1, 2], [1, 3]]\n"
    )
    return path


def test_cli_sweep_then_report(tmp_path, capsys):
    from ih_circuits.cli import main

    spec = _write_spec(tmp_path / "spec.toml", 20, "[0]")
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "2 runs in" in printed and "2 finished, 0 failed" in printed
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()
    bad = tmp_path / "bad.toml"
    bad.write_text('preset = "cwa"\nseeds = [0]\n[grid]\nalpha = [-1.0]\n')
    assert main(["sweep", str(bad), "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ih-circuits sweep: error:") and "alpha" in error
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as exited:
        main(["sweep", str(spec), "--out", str(out), "--backend", "mpi"])
    assert exited.value.code == 2


@pytest.mark.slow
def test_killed_sweep_completes_on_rerun_without_redoing_runs(tmp_path):
    spec = _write_spec(tmp_path / "spec.toml", 60, "[0, 1, 2]")
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "ih_circuits.cli", "sweep", str(spec), "--out", str(out), "--workers", "1"]
    child = subprocess.Popen([*command, "--quiet"], start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / RUNS).glob(f"*/{RECORD}")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    done = {p.parent.name: p.stat().st_mtime_ns for p in (out / RUNS).glob(f"*/{RECORD}")}
    assert 1 <= len(done) < 6 and not (out / "results.csv").exists()
    subprocess.run([*command, "--quiet"], check=True)
    results = load_results(out)
    assert len(results) == 6 and (results["status"] == "ok").all()
    assert {r: (out / RUNS / r / RECORD).stat().st_mtime_ns for r in done} == done


@pytest.mark.slow
def test_readme_sweep_block_runs_as_written_and_ray_gives_the_same_table(tmp_path, monkeypatch):
    """The README's sweep code block, verbatim, on examples/sweep.toml (the issue's 24-run grid: alpha x
    parents x 2 seeds), then the same spec on a local Ray instance."""
    import re
    import shutil

    pytest.importorskip("ray")
    root = Path(__file__).parents[2]
    (tmp_path / "examples").mkdir()
    shutil.copy(root / "examples" / "sweep.toml", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Sweeps: theory against practice") :]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    namespace: dict = {"__name__": "__main__"}  # run as the main script would
    exec(compile(code, "README.md", "exec"), namespace)
    local = namespace["results"]
    assert (tmp_path / "out" / "sweep" / "map.png").stat().st_size > 0
    assert local.equals(load_results(tmp_path / "out" / "sweep"))
    _same_table(local, run_sweep("examples/sweep.toml", tmp_path / "ray", backend="ray", workers=2, quiet=True))
    assert len(local) == 24 and (local["status"] == "ok").all()
    cells = cell_table(local)
    assert len(cells) == 12 and set(cells["runs"]) == {2}


def test_cli_sweep_exit_status_says_when_runs_failed(tmp_path, capsys):
    """Exit 1 when some runs failed, 2 when all did; the helpers take a table of failures (a batch of 10^9
    sequences is refused by the memory budget, so those runs fail at once)."""
    from ih_circuits.cli import main
    from ih_circuits.sweep import plot_theory_map

    spec = tmp_path / "spec.toml"
    spec.write_text(
        'preset = "cwa"\nseeds = [0]\nsteps = 20\n[probe]\nn_sequences = 64\n[grid]\nbatch_size = [512, 1000000000]\n'
    )
    assert main(["sweep", str(spec), "--out", str(tmp_path / "some"), "--workers", "1", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "2 runs in" in captured.out and "1 finished, 1 failed" in captured.out
    assert "failed runs are run again" in captured.err
    spec.write_text('preset = "cwa"\nseeds = [0, 1]\nsteps = 20\n[fixed]\nbatch_size = 1000000000\n')
    assert main(["sweep", str(spec), "--out", str(tmp_path / "all"), "--workers", "1", "--quiet"]) == 2
    assert "2 runs in" in capsys.readouterr().out
    results = load_results(tmp_path / "all")
    assert set(results["status"]) == {"failed"} and set(results["selected_lags"]) == {""}
    cells = cell_table(results)
    assert cells["ok"].tolist() == [0] and math.isnan(cells["selection_frequency"].iloc[0])
    assert math.isnan(agreement_rate(results)) and len(disagreements(results)) == 2
    plot_theory_map(results)
    assert main(["report", str(tmp_path / "all")]) == 0


def test_a_sweep_says_how_many_runs_and_about_how_long_before_it_starts(tmp_path, capsys):
    from ih_circuits.cli import main

    spec = _write_spec(tmp_path / "spec.toml", 20, "[0]")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "sweep"), "--workers", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert re.fullmatch(r"2 runs to do \(0 done\), about \d+ s, on 1 local worker", first), first
    spec.write_text(spec.read_text().replace("[[1, 2], [1, 3]]", "[[1, 2], [1, 3], [2, 3]]"))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "big"), "--max-runs", "2", "--quiet"]) == 2
    assert "3 runs (preset cwa, 3 grid cells x 1 seed), above max_runs=2" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


def test_a_sweep_that_asks_for_the_optimal_selector_records_both_share_tables(tmp_path):
    """``[theory] optimal = true``: each run records its trained selector's shares by lag set, the optimal
    selector's (the same for every seed of the cell) and the total-variation distance between them."""
    import json

    from ih_circuits.optimal import optimal_shares, share_distance

    spec = {
        "preset": "cwa",
        "seeds": [0, 1],
        "steps": 20,
        "fixed": {"parents": [1, 2, 3], "alpha": 1.0, "max_degree": 1, "batch_size": 256},
        "probe": {"n_sequences": 32},
        "theory": {"optimal": True},
    }
    results = run_sweep(spec, tmp_path / "sweep", workers=2, quiet=True)
    assert (results["status"] == "ok").all() and (results["predicted_lags"] == "2;3;1").all()
    assert not results["theory_decisive"].any()
    optimal = [json.loads(text) for text in results["optimal_shares"]]
    assert optimal[0] == optimal[1]
    expected = optimal_shares(NGramTask(3, (1, 2, 3), 101, alpha=1.0), max_degree=1, window=3)
    assert optimal[0] == pytest.approx(expected.shares, abs=1e-6)
    for row, best in zip(results.itertuples(), optimal, strict=True):
        selected = json.loads(row.selected_shares)
        assert set(selected) <= {"", "1", "2", "3"} and sum(selected.values()) == pytest.approx(1.0)
        assert row.share_tv == pytest.approx(share_distance(best, selected)) and 0 <= row.share_tv <= 1
    assert load_results(tmp_path / "sweep")["share_tv"].tolist() == pytest.approx(results["share_tv"].tolist())


MIXED = {
    "seeds": [0],
    "probe": {"n_sequences": 32},
    "group": [
        {"name": "paper", "preset": "cwa", "steps": 20, "fixed": {"batch_size": 256, "parents": [1, 3]}},
        {
            "name": "tf",
            "kind": "transformer",
            "fixed": {"steps": 10, "d_model": 16, "heads": 2, "batch_size": 16, "eval_size": 32},
            "grid": {"parents": [[1, 2], [2, 3]]},
        },
    ],
}


def test_ordinary_transformers_run_beside_the_paper_model_and_ray_gives_the_same_table(tmp_path):
    """One spec, two groups: the transformer runs record found lags, the theory's prediction (D = heads) and no
    selector; each is saved and reloads to the model that gave its answer; Ray gives the same table."""
    results = run_sweep(MIXED, tmp_path / "local", workers=2, quiet=True)
    assert (results["status"] == "ok").all(), results["error"].tolist()
    assert results["group"].tolist() == ["paper", "tf", "tf"]
    assert results["preset"].tolist() == ["cwa", "transformer", "transformer"]
    tf = results[results["group"] == "tf"]
    assert (tf["selected_lags"] == "").all() and (tf["selected_shares"] == "").all() and tf["share_tv"].isna().all()
    for row in tf.itertuples():
        task = NGramTask(3, tuple(int(p) for p in row.parents.split(",")), 101, alpha=0.1, window=3)
        assert row.predicted_lags == theory.task_prediction(task, 2, 3, quiet=True).text()
        run = TrainingRun.load(tmp_path / "local" / RUNS / row.run_id / "run")
        assert type(run.model).__name__ == "TransformerBridge" and run.step == 10
        found = find_parents(run.model, task, n_sequences=32, seed=0)
        assert ",".join(map(str, found.lags)) == row.found_lags
    assert cell_table(results)["compared"].tolist() == ["sel", "found", "found"]
    page = sweep_report(tmp_path / "local").read_text(encoding="utf-8")
    for group in ("paper", "tf"):
        assert f"<h3>Theory vs practice per grid cell, group {group}</h3>" in page
        assert f"<h3>Excess loss over the Bayes predictor, group {group}</h3>" in page
    ray = run_sweep(MIXED, tmp_path / "ray", backend="ray", workers=2, quiet=True)
    _same_table(results, ray)
