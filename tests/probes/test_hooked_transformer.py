"""``HookedTransformer`` (TransformerLens 3.x), trained here, through every probe.

Runs where the installed TransformerLens has ``HookedTransformer`` (``make test-tl3``); skipped on 4.x, which
removed it. A ``HookedTransformer`` is initialised differently from the native ``TransformerBridge`` (its
output weights are not scaled down with depth) and learns more slowly at the bridge's learning rates, so it
has its own recipes, measured on this 2-core machine:
- repeated tokens (the recipe of test_trained_models.py otherwise): Adam lr 2e-3, 800 steps. Seeds 0-2: final
  loss 0.88-0.89, lag-1 query-side effect 4.3-4.8 nats, lag 2 0.7, every other lag < 0.06. At the bridge's
  lr 1e-2 it stays on the plateau (loss 1.8 after 320 steps).
- n-gram parents (1, 2): d_model 32, 2 heads, initializer_range 0.05, Adam lr 3e-3, 1000 steps (~30 s).
  Seeds 0 and 1: parents (1, 2) = truth = theory, verdict "GIH circuit with smoothing"; after 500 steps the
  parents are already right but the copier heads are not yet formed ("not a GIH circuit").
Re-measured with TransformerLens 3.x on seed 0 for the loss and patching bounds below (each comment gives the value).
"""

import pytest

from ih_circuits import NGramTask, RepeatedTokens, views
from ih_circuits.baselines import has_hooked_transformer, ordinary_transformer, train_on_source
from ih_circuits.probes import decomposition_test, find_parents, head_patching, scan_heads

pytestmark = pytest.mark.skipif(not has_hooked_transformer(), reason="this TransformerLens has no HookedTransformer")


def hooked(data, **shape):
    from transformer_lens import HookedTransformer

    model = ordinary_transformer(data, kind="hooked", seed=0, n_layers=2, **shape)
    assert isinstance(model, HookedTransformer)
    return model


def test_hooked_transformer_on_repeated_tokens_forms_an_induction_head():
    source = RepeatedTokens(vocab_size=32, seq_len=40, min_period=4, max_period=12)
    model = hooked(source, d_model=32, n_heads=2)
    losses = train_on_source(model, source, steps=800, batch_size=64, lr=2e-3, seed=0)
    # Measured on TL 3.x (seed 0): first 5 steps 3.59, last 20 0.887, i.e. 0.25x. The plateau the model sits on
    # without an induction head is 1.8 (0.50x), so 0.4x separates the two.
    assert losses["loss"].iloc[-20:].mean() < 0.4 * losses["loss"].iloc[:5].mean()
    report = find_parents(model, source, n_sequences=256, max_lag=14)
    assert report.lags[0] == 1 and set(report.lags) <= {1, 2}, report.summary()
    # Module docstring, seeds 0-2: lag-1 effect 4.3-4.8 nats (2x over 2.0), lags >= 3 below 0.06.
    assert report.query_effects[1] > 2.0 and max(report.query_effects[s] for s in range(3, 15)) < 0.1
    heads = scan_heads(model, source, lags=(1,), n_sequences=64)
    assert set(heads[heads["role"] == "induction"]["layer"]) == {1}
    patching = head_patching(model, source, 1, n_sequences=64)
    # Measured on TL 3.x: L1H0 restores 0.96 of the lag-1 effect, the others 0.05-0.34; asked for over 0.6.
    assert patching["restored"].max() > 0.6 and len(patching) == 4
    view = views.attention_data(model, source.sample(1, seed=0), 1, lags=(1,))
    assert view.props["attention"].shape == (2, 32, 32) and "HookedTransformer" in view.title  # the last 32 positions


def test_hooked_transformer_on_ngrams_reports_its_parents_and_a_gih_circuit():
    task = NGramTask(vocab_size=3, parents=(1, 2), seq_len=41, alpha=0.1)
    model = hooked(task, d_model=32, n_heads=2, initializer_range=0.05)
    losses = train_on_source(model, task, steps=1000, batch_size=128, lr=3e-3, seed=0)
    # Measured on TL 3.x (seed 0): first 5 steps 0.97, last 20 0.50 nats. On this task (T = 41) the Bayes loss
    # measures 0.43 and the in-context unigram 0.87, so below 0.65 asks for most of the way from the unigram.
    assert losses["loss"].iloc[-20:].mean() < 0.65
    report = find_parents(model, task, n_sequences=512)
    assert report.lags == (1, 2) and report.matches_truth and report.matches_theory, report.summary()
    verdict = decomposition_test(model, task, n_sequences=128)
    assert verdict.verdict in ("holds", "GIH circuit with smoothing"), verdict.reason
