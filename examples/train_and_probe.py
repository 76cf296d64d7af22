"""Train the paper's model on the n-gram task and ask which parents it chose.

Run: ``.venv/bin/python examples/train_and_probe.py`` (about 15 s; IH_CIRCUITS_FAST=1 for a 3 s version).
"""

import os

import ih_circuits as ih
from ih_circuits import probes

steps = 60 if os.environ.get("IH_CIRCUITS_FAST") == "1" else 300
run = ih.train_preset("cwa", seed=0, steps=steps, quiet=True)
print(run)
print(run.history[["step", "excess_loss", "a", "share[0,1]", "leading_lags"]].tail(3).to_string(index=False))

parents = probes.find_parents(run.model, run.task)
print(parents)
verdict = probes.decomposition_test(run.model, run.task)
print(verdict)
assert parents.lags == (1, 2) and verdict.holds
