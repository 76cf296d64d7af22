"""Bayes, GIH, unigram, oracle and model-averaging predictors against loop references and the task."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ih_circuits import (
    NGramTask,
    accuracy,
    bayes_predictive,
    gih_predictive,
    kl_divergence,
    last_position_nll,
    model_averaging,
    next_token_nll,
    unigram_predictive,
)
from ih_circuits.predictors import candidate_parent_sets
from tests.reference import bayes_loop, gih_loop

PARENT_SETS = [(), (1,), (1, 2), (1, 3), (2,)]


def random_tokens(batch, pos, d, seed):
    return torch.randint(0, d, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("parents", PARENT_SETS, ids=lambda p: f"parents={p}")
def test_bayes_equals_brute_force_count(parents):
    tokens = random_tokens(4, 15, 3, seed=len(parents))
    fast = bayes_predictive(tokens, parents, 0.3, d_vocab=3)
    # float32 against a float64 loop: measured difference 6e-8 (one ulp of ~0.5); 1e-6 is a 16x margin.
    assert torch.allclose(fast.double(), bayes_loop(tokens, parents, 0.3, 3), atol=1e-6)
    assert torch.allclose(fast.sum(-1), torch.ones(4, 15))  # default tolerance: float32 rounding


@pytest.mark.parametrize("lags", PARENT_SETS, ids=lambda p: f"lags={p}")
@pytest.mark.parametrize("a", [0.0, 1.5, 6.0, -2.0, math.inf])
def test_gih_equals_attention_loop(lags, a):
    tokens = random_tokens(3, 14, 3, seed=11)
    fast = gih_predictive(tokens, lags, a, d_vocab=3)
    # float32 against a float64 loop: measured difference <= 3e-8 over all cases; 1e-6 is a 30x margin.
    assert torch.allclose(fast.double(), gih_loop(tokens, lags, a, 3), atol=1e-6)


def test_gih_at_infinity_is_the_empirical_conditional_frequency():
    """a = inf equals (Bayes count with alpha -> 0) wherever the query history occurred before."""
    tokens = random_tokens(8, 60, 3, seed=5)
    gih = gih_predictive(tokens, (1, 2), math.inf, d_vocab=3)
    tiny_alpha = bayes_predictive(tokens, (1, 2), 1e-9, d_vocab=3)
    from ih_circuits.predictors import history_counts

    seen = history_counts(tokens, (1, 2), 3).sum(-1) > 0
    # Guards the coverage of the comparison below: on these fixed tokens the measured share is 0.833.
    assert seen.float().mean() > 0.8
    # alpha = 1e-9 shifts each probability by at most d * alpha = 3e-9 (measured 1e-9); 1e-6 covers float32.
    assert torch.allclose(gih[seen], tiny_alpha[seen], atol=1e-6)
    # a = 60: non-matching keys weigh e^-60 ~ 1e-26 against a match (measured difference 2e-25).
    assert torch.allclose(gih_predictive(tokens, (1, 2), 60.0, d_vocab=3), gih, atol=1e-6)


def test_bayes_beats_the_in_context_unigram(paper_task):
    batch = paper_task.sample(2000, seed=0)
    gap = last_position_nll(unigram_predictive(batch.tokens, 0.1, d_vocab=3), batch.tokens) - last_position_nll(
        paper_task.bayes_predictive(batch.tokens), batch.tokens
    )
    # Paired difference: require the mean to exceed 5 standard errors (measured: 31 standard errors).
    assert gap.mean() > 5 * gap.std() / len(gap) ** 0.5


def test_oracle_is_the_floor_of_the_bayes_loss(paper_task):
    batch = paper_task.sample(2000, seed=1)
    oracle = paper_task.oracle_predictive(batch)
    # float32 rows: measured error 1.2e-7 (one ulp); 1e-5 leaves room for other platforms.
    assert torch.allclose(oracle.sum(-1), torch.ones_like(oracle[..., 0]), atol=1e-5)
    gap = next_token_nll(paper_task.bayes_predictive(batch.tokens), batch.tokens).mean(1) - next_token_nll(
        oracle, batch.tokens
    ).mean(1)
    # Paired difference over 2000 sequences: mean > 5 standard errors (measured: 96 standard errors).
    assert gap.mean() > 5 * gap.std() / len(gap) ** 0.5


def test_oracle_with_stationary_start_conditions_on_the_prefix():
    task = NGramTask(vocab_size=3, parents=(1, 3), seq_len=8, alpha=1.0, init="stationary")
    batch = task.sample(4, seed=0)
    oracle = task.oracle_predictive(batch)
    assert torch.allclose(oracle.sum(-1), torch.ones(4, 8), atol=1e-5)  # float32 rows (measured 1.2e-7)
    uniform = NGramTask(vocab_size=3, parents=(1, 3), seq_len=8, alpha=1.0).oracle_predictive(batch)
    assert torch.allclose(uniform[:, :2], torch.full((4, 2, 3), 1 / 3))  # default tolerance: float32 rounding
    assert not torch.allclose(oracle[:, :2], uniform[:, :2])  # measured difference up to 0.22
    assert torch.equal(oracle[:, 2:], uniform[:, 2:])


def test_model_averaging_concentrates_on_the_true_parents():
    """With well-mixing chains (alpha = 1) the posterior of the true set grows with the context.

    At small alpha many chains lock into short cycles that a smaller parent set explains equally well,
    so the posterior there legitimately stays split; alpha = 1 is the identifiable regime.
    """
    task = NGramTask(vocab_size=3, parents=(1, 2), seq_len=400, alpha=1.0, window=3)
    batch = task.sample(200, seed=2)
    result = model_averaging(batch.tokens, candidate_parent_sets(3, 2), 1.0, d_vocab=3)
    true_set = result.posterior[..., result.candidates.index((1, 2))]
    # Measured means (stderr over 200 sequences): 0.345 (0.017) at t = 30, 0.827 (0.021) at t = 100, so 0.6 is
    # 15 and 11 standard errors from them; seeds 3-5 give 0.35-0.38 and 0.82-0.86.
    assert true_set[:, 30].mean() < 0.6 < true_set[:, 100].mean() < true_set[:, -1].mean()
    # Measured 0.998 (stderr 0.0015; seeds 3-5: 0.990-0.996): 0.97 is over 13 standard errors below.
    assert true_set[:, -1].mean() > 0.97
    # float32 sums of 7 posterior weights / 3 probabilities: measured error <= 1.8e-7.
    assert torch.allclose(result.posterior.sum(-1), torch.ones(200, 400), atol=1e-5)
    assert torch.allclose(result.probs.sum(-1), torch.ones(200, 400), atol=1e-5)


def test_model_averaging_with_one_candidate_is_bayes():
    tokens = random_tokens(3, 20, 3, seed=3)
    result = model_averaging(tokens, [(1,)], 0.5, d_vocab=3)
    # Posterior weight 1 on the only candidate: float32 rounding at most (measured 0).
    assert torch.allclose(result.probs, bayes_predictive(tokens, (1,), 0.5, d_vocab=3), atol=1e-6)


def test_metrics():
    tokens = torch.tensor([[0, 1, 1]])
    probs = torch.tensor([[[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]]])
    # Default allclose tolerance (rtol 1e-5): the same float32 logs, computed two ways.
    assert torch.allclose(next_token_nll(probs, tokens), -torch.tensor([[0.5, 0.75]]).log())
    assert torch.allclose(last_position_nll(probs, tokens), -torch.tensor([0.75]).log())
    assert accuracy(probs, tokens).tolist() == [[0.0, 1.0]]
    assert kl_divergence(probs, probs).abs().max() < 1e-7  # KL(p, p) = 0; float32 rounding (measured 0)
    q = torch.full_like(probs, 0.5)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    # float32 against float64: measured relative error 1.3e-7.
    assert kl_divergence(probs, q)[0, 1].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: bayes_predictive(t, (1,), 0.1, d_vocab=2), "d_vocab=2"),
        (lambda t: bayes_predictive(t.float(), (1,), 0.1, d_vocab=3), "integer dtype"),
        (lambda t: bayes_predictive(t[0], (1,), 0.1, d_vocab=3), r"\[batch, pos\]"),
        (lambda t: bayes_predictive(t, (0,), 0.1, d_vocab=3), "lags"),
        (lambda t: bayes_predictive(t, (1,), -1.0, d_vocab=3), "alpha"),
        (lambda t: gih_predictive(t, (1,), float("nan"), d_vocab=3), "a must"),
        (lambda t: gih_predictive(t, (2, 2), 1.0, d_vocab=3), "lags"),
    ],
)
@pytest.mark.usefixtures("without_runtime_typecheck")
def test_bad_inputs_raise_value_error(call, message):
    tokens = torch.tensor([[0, 1, 2, 1]])
    with pytest.raises(ValueError, match=message):
        call(tokens)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 2), min_size=6, max_size=6), min_size=1, max_size=3),
    parents=st.sets(st.integers(1, 4), max_size=2).map(lambda s: tuple(sorted(s))),
    alpha=st.floats(0.05, 3.0),
)
def test_bayes_matches_the_count_on_arbitrary_sequences(rows, parents, alpha):
    tokens = torch.tensor(rows)
    fast = bayes_predictive(tokens, parents, alpha, d_vocab=3).double()
    # float32 against a float64 loop, any alpha in [0.05, 3]: a few ulps of a probability (~1e-7); same for the sums.
    assert torch.allclose(fast, bayes_loop(tokens, parents, alpha, 3), atol=1e-5)
    assert torch.allclose(fast.sum(-1), torch.ones(fast.shape[:2], dtype=torch.float64), atol=1e-5)
