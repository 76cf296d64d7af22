"""Probes: which parents does a model condition on, and is it a generalized induction head?

They run on ``IHTransformer`` and on any TransformerLens model (``HookedTransformer``, ``TransformerBridge``,
any depth), on ``data`` = an ``NGramTask``, a data source such as ``RepeatedTokens``, or a token tensor.

Conventions: position t predicts token t+1; *lag s* of that prediction is the token at position t+1-s
(lag 1 = the current token); an attention head's *offset* o means it attends from t to t-o (0 = itself,
1 = the previous token), so at the query row it reads lag o+1. Heads and layers are numbered from 0.
All probes look at the query row T-2 (the prediction of the last token) unless they say otherwise.

- ``data``: ``probe_data`` (what the data is and knows) and ``resample_positions``;
- ``ih_circuits.adapters`` (below training, so the trainer shares it): the one place that knows a model's
  layout (``adapt``, re-exported here);
- ``behavioural``: query-side resampling per lag (``behavioural_probe``) and linear read-outs
  (``representational_probe``);
- ``heads``: ``scan_heads`` (role of every head), ``copier_probe``, ``selector_probe``, ``classifier_probe``;
- ``parents``: ``find_parents``, with the truth and the theory;
- ``decomposition``: ``decomposition_test`` and its three verdicts;
- ``patching``: ``head_patching`` with TransformerLens's ``generic_activation_patch``.

Every probe leaves the model as it found it (hooks removed, parameters and mode untouched).
"""

from ih_circuits.adapters import IHAdapter, TransformerLensAdapter, adapt
from ih_circuits.probes.behavioural import (
    BehaviouralReport,
    RepresentationalReport,
    behavioural_probe,
    representational_probe,
)
from ih_circuits.probes.data import ProbeData, probe_data, resample_positions
from ih_circuits.probes.decomposition import DecompositionReport, decomposition_test
from ih_circuits.probes.heads import (
    ClassifierReport,
    CopierReport,
    classifier_probe,
    copier_lags,
    copier_probe,
    history_matches,
    scan_heads,
    selector_probe,
)
from ih_circuits.probes.parents import ParentReport, find_parents
from ih_circuits.probes.patching import head_patching

__all__ = [
    "BehaviouralReport",
    "ClassifierReport",
    "CopierReport",
    "DecompositionReport",
    "IHAdapter",
    "ParentReport",
    "ProbeData",
    "RepresentationalReport",
    "TransformerLensAdapter",
    "adapt",
    "behavioural_probe",
    "classifier_probe",
    "copier_lags",
    "copier_probe",
    "decomposition_test",
    "find_parents",
    "head_patching",
    "history_matches",
    "probe_data",
    "representational_probe",
    "resample_positions",
    "scan_heads",
    "selector_probe",
]
