"""Activation patching with TransformerLens's own utilities, on our model and on an ordinary one.

Clean and corrupted sequences differ in the token at lag 2 of the last token; patching each head's output
at the query position shows which head carries that token. Run:
``.venv/bin/python examples/patch_your_own_model.py`` (IH_CIRCUITS_FAST=1 for a quicker version).
"""

import os

import ih_circuits as ih
from ih_circuits import probes
from ih_circuits.baselines import ordinary_transformer

fast = os.environ.get("IH_CIRCUITS_FAST") == "1"
task = ih.NGramTask(vocab_size=3, parents=(1, 2), seq_len=101, alpha=0.1, window=3)

# The limiting model: head 0 copies lag 1, head 1 copies lag 2, the selector uses both.
ideal = ih.ideal_model(ih.IHConfig(), lags=(1, 2), a=5.0)
effects = probes.head_patching(ideal, task, lag=2, n_sequences=32 if fast else 128)
print(effects.to_string(index=False))
assert effects.set_index(["layer", "head"]).loc[(0, 1), "restored"] > 0.95

# Any TransformerLens model works the same way (here an untrained one, so the effects are small).
model = ordinary_transformer(task, d_model=32, n_heads=2).eval()
print(probes.head_patching(model, task, lag=2, n_sequences=16).to_string(index=False))
