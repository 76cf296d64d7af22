"""Train a run, save it, and write the self-contained HTML report (opens offline in any browser).

Run: ``.venv/bin/python examples/make_report.py [OUT_DIR]`` (IH_CIRCUITS_FAST=1 for a quicker version).
"""

import os
import sys
from pathlib import Path

import ih_circuits as ih

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/example_report")
steps = 40 if os.environ.get("IH_CIRCUITS_FAST") == "1" else 300
run = ih.train_preset("cwa", seed=1, steps=steps, quiet=True)
run.save(out / "run", overwrite=True)  # the example rewrites its output directory
path = ih.report(out / "run", out / "report.html")
print(f"report written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
