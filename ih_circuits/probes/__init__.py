"""Probes: which parents does a model condition on, and is it a generalized induction head?

They run on ``IHTransformer`` and on any TransformerLens model (``HookedTransformer``, ``TransformerBridge``,
any depth), on ``data`` = an ``NGramTask``, a data source such as ``RepeatedTokens``, or a token tensor.

Conventions: position t predicts token t+1; *lag s* of that prediction is the token at position t+1-s
(lag 1 = the current token); an attention head's *offset* o means it attends from t to t-o (0 = itself,
1 = the previous token), so at the query row it reads lag o+1. Heads and layers are numbered from 0.
All probes look at the query row T-2 (the prediction of the last token) unless they say otherwise.

- ``session``: ``ProbeSession`` (one batch, one clean run, every probe) and ``config``: ``ProbeConfig`` (every
  threshold and size); ``api``: the probes as functions of ``(model, data)``, each a session asked one question;
- ``data``: ``probe_data`` (what the data is and knows) and ``resample_positions``;
- ``ih_circuits.adapters`` (below training, so the trainer shares it): the one place that knows a model's
  layout (``adapt``, re-exported here); ``runs``: how a session runs it (clean cache, staged corrupted runs,
  restarts from the cached residual, cost in forwards of the batch);
- ``behavioural``: the query-side resampling and read-out reports; ``roles``: head roles, defined once;
- ``heads``: history matches, induction scores, copier and selector read-outs; ``causal``: attribution and exact
  path patching; ``replacement``: ideal patterns for any TransformerLens model;
- ``parents``: ``ParentReport`` with the truth and the theory; ``decomposition``: its four verdicts;
- ``patching``: ``head_patching`` (each head's ``hook_z`` at the query row).

Every probe leaves the model as it found it (hooks removed, parameters and mode untouched).
"""

from ih_circuits.adapters import IHAdapter, TransformerLensAdapter, adapt
from ih_circuits.probes.api import (
    behavioural_probe,
    classifier_probe,
    copier_lags,
    copier_probe,
    decomposition_test,
    find_parents,
    head_patching,
    representational_probe,
    scan_heads,
)
from ih_circuits.probes.behavioural import BehaviouralReport, RepresentationalReport
from ih_circuits.probes.config import ProbeConfig
from ih_circuits.probes.data import ProbeData, probe_data, resample_positions
from ih_circuits.probes.decomposition import DecompositionReport
from ih_circuits.probes.heads import ClassifierReport, CopierReport, history_matches, selector_probe
from ih_circuits.probes.parents import ParentReport
from ih_circuits.probes.session import ProbeSession

__all__ = [
    "BehaviouralReport",
    "ClassifierReport",
    "CopierReport",
    "DecompositionReport",
    "IHAdapter",
    "ParentReport",
    "ProbeConfig",
    "ProbeData",
    "ProbeSession",
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
