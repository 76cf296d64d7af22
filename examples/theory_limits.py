"""The study "Where the theory holds": run examples/theory_limits.toml and print its tables as Markdown.

Run:  ``.venv/bin/python examples/theory_limits.py [OUT_DIR] [--backend ray] [--workers N]`` (``make study``;
about 25 min on 2 cores). It runs the sweep into ``OUT_DIR/sweep`` (re-running resumes it), writes its HTML report
beside the runs and ``OUT_DIR/results.csv``, and prints the README's tables. ``--tables RESULTS_CSV`` prints the
tables of a finished study without running anything (the README's are those of ``examples/theory_limits.csv``).
``IH_CIRCUITS_FAST=1`` runs a smoke version: the first cell of every group, a few steps each.
"""

import argparse
import json
import os
from pathlib import Path

import pandas as pd

from ih_circuits.sweep import cell_table, load_results, run_sweep, sweep_report
from ih_circuits.sweep.spec import SweepSpec

SPEC = Path(__file__).with_name("theory_limits.toml")
PAPER_COLUMNS = ["parents", "max_degree", "alpha", "vocab_size"]
TRANSFORMER_COLUMNS = ["parents", "vocab_size"]


def smoke_spec() -> dict:
    """The study's groups, each cut to its first cell and a few training steps (a check that everything runs)."""
    spec = SweepSpec.from_toml(SPEC).to_dict()
    for group in spec["group"]:
        group["grid"] = {name: values[:1] for name, values in group["grid"].items()}
        group["seeds"] = group["seeds"][:1]
        group["fixed"] = {**group["fixed"], "steps": 6}
        if group.get("kind") == "transformer":
            group["fixed"].update(d_model=16, heads=2, batch_size=16, eval_size=32)
    return {**spec, "probe": {"n_sequences": 32}}


def shares_text(shares: str) -> str:
    """The two largest shares of a JSON share table, ``"2: 0.48, 1: 0.45"`` (``"{}"`` is the empty set)."""
    if not shares:
        return ""
    ranked = sorted(json.loads(shares).items(), key=lambda item: -item[1])[:2]
    return ", ".join(f"{{{lags}}}: {share:.2f}" for lags, share in ranked)


def cell_shares(results: pd.DataFrame, column: str) -> str:
    """A cell's shares (``selected_shares`` or ``optimal_shares``) averaged over its finished seeds."""
    tables = [json.loads(text) for text in results.loc[results["status"] == "ok", column] if text]
    if not tables:
        return ""
    lag_sets = sorted({lags for table in tables for lags in table})
    return json.dumps({lags: sum(t.get(lags, 0.0) for t in tables) / len(tables) for lags in lag_sets})


def practice_text(cell: pd.Series) -> str:
    """A cell's most common trained set and how many seeds gave a predicted set: ``{1,2} (2/2)``."""
    return f"{{{cell['selected_lags']}}} ({round(cell['selection_frequency'] * cell['ok'])}/{cell['ok']})"


def markdown(rows: list[dict]) -> str:
    """A Markdown table of ``rows`` (dicts with the same keys), numbers right-aligned."""
    header = list(rows[0])
    align = ["---:" if isinstance(rows[0][k], (int, float)) else "---" for k in header]
    lines = [header, align, *[[str(row[k]) for k in header] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def paper_table(results: pd.DataFrame) -> str:
    """One row per cell of the paper's model: the theory's two predictions against training."""
    rows = []
    for (parents, degree, alpha, vocab), runs in results.groupby(PAPER_COLUMNS, sort=False):
        cell = cell_table(runs, []).iloc[0]
        rows.append(
            {
                "parents": f"{{{parents}}}",
                "D": int(degree),
                "alpha": alpha,
                "vocab": int(vocab),
                "argmax I~ (ties)": " or ".join(f"{{{s}}}" for s in cell["predicted_lags"].split(";")),
                "selected (seeds agreeing)": practice_text(cell),
                "optimal shares": shares_text(cell_shares(runs, "optimal_shares")),
                "trained shares": shares_text(cell_shares(runs, "selected_shares")),
                "share TV": f"{cell['share_tv']:.2f}",
                "excess loss": f"{cell['excess_loss']:.3f}",
            }
        )
    return markdown(rows)


def transformer_table(results: pd.DataFrame) -> str:
    """One row per cell of ordinary transformers: the theory's prediction against the lags the model reads."""
    rows = []
    for (parents, vocab), runs in results.groupby(TRANSFORMER_COLUMNS, sort=False):
        cell = cell_table(runs, []).iloc[0]
        ok = runs[runs["status"] == "ok"]
        rows.append(
            {
                "parents": f"{{{parents}}}",
                "vocab": int(vocab),
                "argmax I~ (ties)": " or ".join(f"{{{s}}}" for s in cell["predicted_lags"].split(";")),
                "found (seeds agreeing)": practice_text(cell),
                "verdict": ", ".join(sorted(set(ok["verdict"]))),
                "excess loss": f"{cell['excess_loss']:.3f}",
            }
        )
    return markdown(rows)


def steps_text(results: pd.DataFrame) -> str:
    """``"300 steps"``: the training steps of the runs (each value once)."""
    return " or ".join(str(int(steps)) for steps in sorted(set(results["steps"]))) + " steps"


def tables(results: pd.DataFrame) -> str:
    """The README's tables: the paper's model (every group but the transformers'), then ordinary transformers."""
    paper = results[results["preset"] != "transformer"]
    transformers = results[results["preset"] == "transformer"]
    parts = []
    if len(paper):
        parts.append(f"The paper's model (CWa, {steps_text(paper)}):\n\n" + paper_table(paper))
    if len(transformers):
        parts.append(
            f"Ordinary transformers (2 layers, attention only, {steps_text(transformers)}):\n\n"
            + transformer_table(transformers)
        )
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="out/theory_limits", help="the study's directory")
    parser.add_argument("--backend", choices=("local", "ray"), default="local")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--tables", metavar="RESULTS_CSV", help="print the tables of a finished study and stop")
    args = parser.parse_args()
    if args.tables:
        print(tables(load_results(args.tables)), end="")
        return
    out = Path(args.out)
    spec = smoke_spec() if os.environ.get("IH_CIRCUITS_FAST") == "1" else SPEC
    results = run_sweep(spec, out / "sweep", backend=args.backend, workers=args.workers)
    results.to_csv(out / "results.csv", index=False)
    report = sweep_report(out / "sweep")
    text = tables(results)
    (out / "theory_limits.md").write_text(text)
    print(text, end="")
    print(f"\nreport: {report}; results: {out / 'results.csv'}")


if __name__ == "__main__":
    main()
