"""Sweep cost: the 24-run grid of ``examples/sweep.toml`` with 1 and 2 local workers, and on a local Ray instance.

Prints the wall time of each (same spec, fresh directory each), the speed-up of 2 workers over 1, whether
every backend gave the same table (all columns but ``wall_time_s``), and the grid's agreement rate.
Run: ``.venv/bin/python benchmarks/bench_sweep.py [--ray]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from ih_circuits.sweep import SweepSpec, agreement_rate, disagreements, run_sweep

SPEC = Path(__file__).resolve().parents[1] / "examples" / "sweep.toml"


def timed(spec: SweepSpec, out: Path, **options) -> tuple[float, pd.DataFrame]:
    start = time.perf_counter()
    results = run_sweep(spec, out, quiet=True, **options)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ray", action="store_true", help="also time the Ray backend (needs ih_circuits[ray])")
    args = parser.parse_args()
    spec = SweepSpec.from_toml(SPEC)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        one, base = timed(spec, scratch / "w1", workers=1)
        two, results = timed(spec, scratch / "w2", workers=2)
        tables = {"2 workers": results}
        print(f"{len(base)} runs, 1 local worker: {one:.1f} s ({one / len(base):.2f} s per run)")
        print(f"{len(base)} runs, 2 local workers: {two:.1f} s; speed-up {one / two:.2f}x")
        if args.ray:
            ray_time, tables["ray"] = timed(spec, scratch / "ray", backend="ray", workers=2)
            print(f"{len(base)} runs, Ray (local instance, 2 CPUs): {ray_time:.1f} s; speed-up {one / ray_time:.2f}x")
    stable = base.drop(columns="wall_time_s")
    for name, table in tables.items():
        same = table.drop(columns="wall_time_s").equals(stable)
        print(f"{name}: {'the same table as 1 worker' if same else 'A DIFFERENT TABLE from 1 worker'}")
    wrong = disagreements(base)
    print(f"agreement (selected = predicted): {agreement_rate(base):.0%} of finished runs; {len(wrong)} disagree")
    if len(wrong):
        print(wrong[["run_id", "predicted_lags", "selected_lags", "found_lags", "verdict"]].to_string(index=False))


if __name__ == "__main__":
    main()
