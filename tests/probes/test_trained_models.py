"""Probes on ordinary TransformerLens models trained in the test suite (attention-only, 2 layers, rotary).

Recipes (hyperparameters found by a sweep on this 2-core machine, seeds 0-2 all form the circuit):
repeated random tokens, vocabulary 32, length 40, periods 4..12; d_model 32, 2 heads, LayerNorm; Adam lr 1e-2,
batch 64, 320 steps. Measured: a layer-0 previous-token head and layer-1 induction heads; query-side effects
about 4.1 nats on lag 1 and 0.7 on lag 2 (the model partly matches on lag 2 too), < 0.05 beyond.
"""

import pytest

from ih_circuits import RepeatedTokens
from ih_circuits.baselines import ordinary_transformer, train_on_source
from ih_circuits.probes import decomposition_test, find_parents, scan_heads

SOURCE = RepeatedTokens(vocab_size=32, seq_len=40, min_period=4, max_period=12)
# A TransformerBridge on every TransformerLens version, so the recipes hold on 3.x and 4.x alike (the
# HookedTransformer recipes are in test_hooked_transformer.py).
SHAPE = {"d_model": 32, "n_heads": 2, "n_layers": 2, "positional_embedding_type": "rotary", "kind": "bridge"}


@pytest.fixture(scope="module")
def repeated_model():
    model = ordinary_transformer(SOURCE, seed=0, **SHAPE)
    losses = train_on_source(model, SOURCE, steps=320, batch_size=64, lr=1e-2, seed=0)
    return model, losses


@pytest.mark.e2e
def test_training_on_repeated_tokens_forms_an_induction_circuit(repeated_model):
    model, losses = repeated_model
    # A uniform guess costs log 32 = 3.47 nats; copying the second repeat makes about half the positions free.
    assert losses["loss"].iloc[-20:].mean() < 0.6 * losses["loss"].iloc[:5].mean()
    heads = scan_heads(model, SOURCE, lags=(1,), n_sequences=64)
    layer0 = heads[heads["layer"] == 0]
    previous = layer0[(layer0["offset"] == 1) & (layer0["role"] == "copier")]
    assert len(previous) >= 1
    assert set(heads[heads["role"] == "induction"]["layer"]) == {1}


@pytest.mark.e2e
def test_trained_model_conditions_on_the_current_token_not_on_the_period(repeated_model):
    model, _ = repeated_model
    # Lags up to 14 include every "period lag" p + 1 (p = 4..12): where the earlier copy of the current token sits.
    report = find_parents(model, SOURCE, n_sequences=256, max_lag=14)
    effects = report.query_effects
    assert report.lags == (1,), report.summary()
    assert effects[1] > 2.0 and effects[1] > 3 * effects[2]
    assert max(effects[s] for s in range(3, 15)) < 0.1
    # Lag 2's effect is 17-18% of lag 1's (0.74 +- 0.09 of 4.36 on TL 4.x, 0.80 of 4.34 on 3.x), against the 0.2
    # relative bar: undecided at 256 sequences, asking 1015 (4.x) and 4319 (3.x); at 1024 on 4.x it is excluded.
    behaviour = report.behavioural
    assert behaviour.undecided == (2,) and report.matches_truth is None
    assert 256 < behaviour.needed_sequences < 10_000 and "lags (2,) are neither used nor excluded" in report.summary()
    verdict = decomposition_test(model, SOURCE, lags=(1,), n_sequences=128)
    structural = {check for check, _ in verdict.failing} & {"parents", "induction head", "copier heads"}
    assert not structural, verdict.reason


def test_untrained_model_of_the_same_shape_reports_no_parents():
    model = ordinary_transformer(SOURCE, seed=0, **SHAPE)
    # Lag 1 moves its prediction (KL 0.18) through a random bigram. At 256 sequences the loss increase (+0.013 +-
    # 0.036) can be told neither from zero nor from half the effect (0.09, what conditioning would cost):
    # inconclusive, asking for about 500 (measured 502). At 1024 (+0.022 +- 0.018) it is a fixed map.
    small = find_parents(model, SOURCE, n_sequences=256)
    assert small.lags == () and not small.conclusive and 256 < small.behavioural.needed_sequences <= 1024
    assert decomposition_test(model, SOURCE, n_sequences=256).verdict == "inconclusive"
    report = find_parents(model, SOURCE, n_sequences=1024)
    assert report.lags == () and report.conclusive and not report.uses_context
    assert "a fixed map, not conditioning; the model does not use its context" in report.summary()
    assert decomposition_test(model, SOURCE, n_sequences=1024).verdict == "not a GIH circuit"


@pytest.mark.slow
def test_a_three_layer_model_runs_through_every_probe():
    model = ordinary_transformer(SOURCE, seed=0, **{**SHAPE, "n_layers": 3})
    train_on_source(model, SOURCE, steps=320, batch_size=64, lr=1e-2, seed=0)
    report = find_parents(model, SOURCE, n_sequences=256)
    heads = scan_heads(model, SOURCE, n_sequences=64)
    verdict = decomposition_test(model, SOURCE, n_sequences=64)
    assert len(heads) == 3 * 2 and set(heads["layer"]) == {0, 1, 2}
    assert report.lags[:1] == (1,) and verdict.verdict in (
        "holds",
        "GIH circuit with smoothing",
        "not a GIH circuit",
        "inconclusive",
    )
