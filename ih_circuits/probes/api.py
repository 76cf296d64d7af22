"""The probes as functions of ``(model, data)``: each asks a ``ProbeSession`` one question.

Consecutive calls on the same model, data and settings share one session (its batch, clean run, parents and
roles), so ``find_parents``, ``scan_heads`` and ``decomposition_test`` in a row pay for the clean run and the
lag scan once. The session is reused only while the model's parameters and the data are unchanged (their tensors'
version counters, which every in-place update such as an optimizer step bumps), and only the latest one is kept.
Open a session yourself to choose what it keeps (``session.py``).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from ih_circuits.adapters import adapt
from ih_circuits.probes.behavioural import FLOOR_NATS, BehaviouralReport, RepresentationalReport
from ih_circuits.probes.config import ProbeConfig
from ih_circuits.probes.data import Data, probe_data
from ih_circuits.probes.decomposition import DecompositionReport
from ih_circuits.probes.heads import ClassifierReport, CopierReport
from ih_circuits.probes.parents import ParentReport
from ih_circuits.probes.session import ProbeSession

_latest: list[tuple[tuple, ProbeSession]] = []


def _state(value: object) -> tuple:
    """Identity and in-place version of a model's parameters and buffers, or of a data tensor."""
    if isinstance(value, nn.Module):
        tensors = [*value.parameters(), *value.buffers()]
        return (id(value), value.training, tuple((id(t), t._version) for t in tensors))
    if isinstance(value, torch.Tensor):
        return (id(value), value._version)
    return (id(value),)


def _session(model: nn.Module, data: Data, config: ProbeConfig) -> ProbeSession:
    """The latest session when model, data and config are unchanged, else a new one (which replaces it)."""
    key = (_state(model), _state(data), config)
    if _latest and _latest[0][0] == key:
        return _latest[0][1]
    session = ProbeSession(model, data, config)
    _latest[:] = [(key, session)]
    return session


def _check_lags_first(model: nn.Module, data: Data, lags: tuple[int, ...] | None) -> None:
    """Refuse ``lags`` outside the lags the probes test before the model runs at all."""
    if lags is not None:
        probe_data(data, adapt(model)).check_lags(lags)


def behavioural_probe(
    model: nn.Module,
    data: Data,
    *,
    n_sequences: int = 512,
    seed: int = 0,
    max_lag: int | None = None,
    threshold: float = 0.2,
    floor: float = FLOOR_NATS,
    query_layer: int | None = None,
) -> BehaviouralReport:
    """Which lags does the query row's prediction depend on, through its own history?

    For each lag s = 1..max_lag the token at position T-1-s (lag s of the final token) is replaced by another
    token of the batch, and KL(p_clean || p_corrupted) is measured at the query row T-2 on the query side
    (``behavioural.py``).

    Args:
        model: ``IHTransformer`` or any TransformerLens model.
        data: an ``NGramTask``, a data source such as ``RepeatedTokens``, or a token tensor ``[batch, pos]``.
        n_sequences: sequences drawn from a source (a tensor is used as given).
        seed: fixes the sequences and the replacement tokens.
        max_lag: lags tested; default the task's window + 2, else 8.
        threshold: relative bar, in (0, 1].
        floor: absolute bar in nats, >= 0.
        query_layer: TransformerLens models: the layer whose input residual at the query row is the query's
            history (default: the earliest layer with an induction head, else 1); ``IHTransformer`` uses its
            copier output.
    """
    config = ProbeConfig(
        n_sequences=n_sequences, seed=seed, max_lag=max_lag, threshold=threshold, floor=floor, query_layer=query_layer
    )
    return _session(model, data, config).behaviour


def representational_probe(
    model: nn.Module,
    data: Data,
    *,
    n_sequences: int = 256,
    seed: int = 0,
    max_lag: int | None = None,
    query_layer: int | None = None,
) -> RepresentationalReport:
    """Which lags' tokens can be read linearly from the query's gathered history? Ridge read-outs at the history
    site, trained on half of the sequences and scored on the other half."""
    config = ProbeConfig(n_sequences=n_sequences, seed=seed, max_lag=max_lag, query_layer=query_layer)
    return _session(model, data, config).representation


def find_parents(
    model: nn.Module,
    data: Data,
    *,
    n_sequences: int = 512,
    seed: int = 0,
    max_lag: int | None = None,
    query_layer: int | None = None,
) -> ParentReport:
    """Which parent tokens does the model's prediction condition on?

    Args:
        model: ``IHTransformer`` or any TransformerLens model, any depth.
        data: an ``NGramTask``, a data source such as ``RepeatedTokens``, or an integer token tensor.
        n_sequences: sequences in the batch (the linear read-out trains on half of them).
        seed: fixes every draw.
        max_lag: lags tested; default the task's window + 2, else 8.
        query_layer: TransformerLens models: where the query's history is read (default found: the input of
            the earliest layer with an induction head, else layer 1; the summary says which and why).

    ``.lags`` follows the package convention (lag 1 = the current token): an exact textbook induction head
    reports ``(1,)``. A model that does not beat the in-context unigram, or whose prediction no lag moves by
    more than 0.01 nats, reports ``()`` and says why (``summary()``).
    """
    config = ProbeConfig(n_sequences=n_sequences, seed=seed, max_lag=max_lag, query_layer=query_layer)
    return _session(model, data, config).parents()


def scan_heads(
    model: nn.Module,
    data: Data,
    *,
    lags: tuple[int, ...] | None = None,
    n_sequences: int = 256,
    seed: int = 0,
    max_offset: int | None = None,
) -> pd.DataFrame:
    """One row per (layer, head) of any TransformerLens model (or ``IHTransformer``): what the head does
    (``ProbeSession.heads``; roles as ``roles.py`` defines them).

    Args:
        lags: the history lags for the induction score; default the parents the session finds, else (1,).
        n_sequences: sequences drawn from a source (a tensor is used as given).
        max_offset: offsets 0..max_offset considered; default the whole context.
    """
    _check_lags_first(model, data, lags)
    config = ProbeConfig(n_sequences=n_sequences, seed=seed, max_offset=max_offset)
    return _session(model, data, config).heads(lags)


def copier_probe(
    model: nn.Module,
    data: Data,
    *,
    n_sequences: int = 128,
    seed: int = 0,
    max_lag: int | None = None,
    layer: int = 0,
    from_patterns: bool = False,
) -> CopierReport:
    """Which lag does each head of ``layer`` (default 0, the copier) read at the query row? ``IHTransformer``'s
    positional copier answers from its weights (unless ``from_patterns``), any other layer from its attention
    on data."""
    config = ProbeConfig(n_sequences=n_sequences, seed=seed, max_lag=max_lag)
    return _session(model, data, config).copier(layer, from_patterns)


def copier_lags(model: nn.Module, data: Data, **kwargs: object) -> list[int]:
    """The dominant lag of each copier head (``copier_probe(...).dominant_lags``)."""
    return copier_probe(model, data, **kwargs).dominant_lags


def classifier_probe(
    model: nn.Module,
    data: Data,
    lags: tuple[int, ...] | None = None,
    *,
    layer: int | None = None,
    n_sequences: int = 256,
    seed: int = 0,
) -> ClassifierReport:
    """Attention mass of the query row (T-2) on keys whose history over ``lags`` matches the query's.

    With ``lags=(1,)`` this is the usual induction score. ``lags`` defaults to the found parents; ``layer`` to the
    last layer. For ``IHTransformer`` the ideal is the GIH's mass e^a N / (e^a N + T' - N).
    """
    _check_lags_first(model, data, lags)
    session = _session(model, data, ProbeConfig(n_sequences=n_sequences, seed=seed))
    if lags is None and not session.behaviour.used_lags:
        raise ValueError("the model uses no lag (behavioural probe); pass lags=... to probe the classifier")
    return session.classifier(lags, layer)


def decomposition_test(
    model: nn.Module,
    data: Data,
    *,
    lags: tuple[int, ...] | None = None,
    n_sequences: int = 256,
    seed: int = 0,
    kl_threshold: float = 0.05,
    recovered_threshold: float = 0.9,
    control_ratio: float = 0.25,
) -> DecompositionReport:
    """Is the model a generalized induction head on its parents? See ``decomposition.py`` for the checks.

    Args:
        model: ``IHTransformer`` or any TransformerLens model, any depth.
        data: an ``NGramTask``, a data source such as ``RepeatedTokens``, or an integer token tensor.
        lags: the parents to test; default the found parents. Must lie inside the lags the probes test,
            1..window+2 (1..8 for data without a window), so that the controls can compare them.
        n_sequences: sequences in the batch.
        kl_threshold: largest KL (nats) between the model and a replacement for "holds".
        recovered_threshold: smallest kept fraction of the model's gain over the in-context unigram.
        control_ratio: a lag outside ``lags`` must move the query prediction (query side) less than this
            times the weakest lag in ``lags``.
    """
    _check_lags_first(model, data, lags)
    config = ProbeConfig(
        n_sequences=n_sequences,
        seed=seed,
        kl_threshold=kl_threshold,
        recovered_threshold=recovered_threshold,
        control_ratio=control_ratio,
    )
    return _session(model, data, config).decomposition(lags)


def head_patching(model: nn.Module, data: Data, lag: int, *, n_sequences: int = 64, seed: int = 0) -> pd.DataFrame:
    """Patch every head's ``hook_z`` at the query row from a clean run into one where lag ``lag`` is resampled
    (``patching.py``)."""
    return _session(model, data, ProbeConfig(n_sequences=n_sequences, seed=seed)).head_patching(lag)
