"""The optimal selector: the shares an exact-copier model should reach, against the theory's argmax."""

import pytest

from ih_circuits import NGramTask
from ih_circuits.optimal import optimal_shares, share_distance


def test_with_budget_for_every_parent_the_optimum_leads_with_the_parents():
    """Parents (1, 2), degree 2, window 2: the true pair carries the largest share, and the answer is a function of
    the task (the same seed, the same numbers)."""
    task = NGramTask(3, (1, 2), 40, alpha=0.1)
    result = optimal_shares(task, max_degree=2, window=2, n_sequences=256, steps=60)
    assert set(result.shares) == {"", "1", "2", "1,2"} and sum(result.shares.values()) == pytest.approx(1.0)
    assert result.leading() == "1,2"
    assert result.shares["1,2"] > max(v for k, v in result.shares.items() if k != "1,2") + 2 * result.stderr["1,2"]
    again = optimal_shares(task, max_degree=2, window=2, n_sequences=256, steps=60)
    assert again == result


def test_below_the_parents_the_optimum_is_a_mixture():
    """Parents (1, 2, 3) at alpha 1.0 with a one-lag selector: the theory cannot separate the single lags
    (test_theory: a three-way tie), and the optimum spreads over all three (measured 0.33, 0.30, 0.28 with
    standard errors of 0.015; the bars below leave 5 standard errors each way)."""
    result = optimal_shares(NGramTask(3, (1, 2, 3), 101, alpha=1.0), max_degree=1, window=3)
    singles = [result.shares[k] for k in ("1", "2", "3")]
    assert max(result.shares.values()) < 0.45 and min(singles) > 0.2
    assert all(result.stderr[k] < 0.05 for k in ("1", "2", "3"))
    assert 0.9 < result.loss < 1.05 and result.a > 1


def test_share_distance_is_total_variation():
    assert share_distance({"1,2": 1.0}, {"1,2": 0.5, "1": 0.5}) == pytest.approx(0.5)
    assert share_distance({"1": 1.0}, {"2": 1.0}) == 1.0 and share_distance({"1": 1.0}, {"1": 1.0}) == 0.0
    with pytest.raises(ValueError, match=r"second\['1'\] must be a finite number >= 0.0"):
        share_distance({"1": 1.0}, {"1": float("nan")})


@pytest.mark.usefixtures("without_runtime_typecheck")
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_degree": 0}, "max_degree must be an integer >= 1"),
        ({"max_degree": 1, "window": 1}, r"window must be an integer >= 2"),
        ({"max_degree": 1, "n_folds": 1}, "n_folds must be an integer >= 2"),
        ({"max_degree": 1, "n_sequences": 40}, r"n_sequences must be an integer >= 16 x n_folds = 64"),
        ({"max_degree": 1, "steps": 0}, "steps must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optimal_shares(NGramTask(3, (1, 2), 40), **kwargs)
