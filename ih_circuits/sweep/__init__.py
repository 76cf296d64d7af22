"""Theory against practice over many configurations: ``run_sweep`` trains, probes and compares a grid of runs.

``SweepSpec`` (a dict or TOML file) expands to runs; ``run_sweep(spec, out)`` executes them on a local
process pool or a Ray cluster and returns the results table (``load_results(out)`` reads it back);
``cell_table`` aggregates seeds per grid cell; ``plot_theory_map``, ``plot_excess_loss_map`` and ``plot_margin`` draw
them, and ``sweep_report(out)`` writes the whole comparison as one HTML file.
"""

from ih_circuits.sweep.plots import plot_excess_loss_map, plot_margin, plot_theory_map
from ih_circuits.sweep.report import sweep_report
from ih_circuits.sweep.results import agreement_rate, cell_table, disagreements, grid_columns, load_results
from ih_circuits.sweep.runner import collect, run_sweep
from ih_circuits.sweep.spec import RunSpec, SweepSpec

__all__ = [
    "RunSpec",
    "SweepSpec",
    "agreement_rate",
    "cell_table",
    "collect",
    "disagreements",
    "grid_columns",
    "load_results",
    "plot_excess_loss_map",
    "plot_margin",
    "plot_theory_map",
    "run_sweep",
    "sweep_report",
]
