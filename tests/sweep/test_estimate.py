"""The estimate a sweep prints before it starts: measured on part of one run, scaled by each cell's steps."""

import pytest

from ih_circuits.sweep import SweepSpec
from ih_circuits.sweep.estimate import format_duration, run_seconds, sweep_seconds


def test_durations_read_in_the_unit_that_fits():
    assert [format_duration(s) for s in (0.2, 40.0, 89.0, 600.0, 5399.0, 36000.0)] == [
        "1 s",
        "40 s",
        "89 s",
        "10 min",
        "90 min",
        "10.0 h",
    ]


def test_the_estimate_scales_with_each_cells_steps_and_the_workers(monkeypatch):
    """With the measured (setup, step, probe) fixed at (1, 0.1, 2) s: cells of 10 and 30 steps, 2 seeds each, cost
    2 x (1 + 1 + 2) + 2 x (1 + 3 + 2) = 20 s of work, 10 s on 2 workers."""
    from ih_circuits.sweep import estimate

    monkeypatch.setattr(estimate, "run_seconds", lambda run: (1.0, 0.1, 2.0))
    runs = SweepSpec.from_dict({"preset": "cwa", "seeds": [0, 1], "grid": {"steps": [10, 30]}}).runs()
    assert sweep_seconds(runs, 1) == pytest.approx(20.0)
    assert sweep_seconds(runs, 2) == pytest.approx(10.0)
    assert sweep_seconds([], 2) == 0.0


def test_a_run_is_timed_in_part_and_cells_that_fail_give_no_estimate():
    """A batch of 10^9 sequences is refused by the memory budget in every run: no estimate rather than a crash
    (the runs then fail with that error as records). A small run is timed through 10 steps and its probe."""
    failing = SweepSpec.from_dict({"preset": "cwa", "steps": 20, "fixed": {"batch_size": 10**9}}).runs()
    assert sweep_seconds(failing, 2) is None
    run = SweepSpec.from_dict({"preset": "cwa", "steps": 20, "fixed": {"batch_size": 64}, "probe": {"n_sequences": 16}})
    setup, step, probe = run_seconds(run.runs()[0])
    assert setup >= 0 and step > 0 and probe > 0


def test_a_ctrl_c_during_the_estimate_stops_the_sweep(monkeypatch):
    """train() holds a Ctrl-C until its step ends and returns the run marked interrupted; the estimate passes the
    interrupt on instead of going on to the probe and the sweep."""
    from types import SimpleNamespace

    from ih_circuits.sweep import estimate

    monkeypatch.setattr(estimate, "train", lambda *args, **kwargs: SimpleNamespace(interrupted=True))
    run = SweepSpec.from_dict({"preset": "cwa", "steps": 20}).runs()[0]
    with pytest.raises(KeyboardInterrupt):
        run_seconds(run)
