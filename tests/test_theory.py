"""The modified chi-square MI (PAPER.md §5): closed-form checks and the predicted parent sets."""

import pytest
import torch

from ih_circuits.chain import stationary_window_law
from ih_circuits.priors import DirichletPrior
from ih_circuits.theory import modified_chi2_mi, predicted_parent_set, selection_scores
from tests.reference import modified_mi_single


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3, 1.0])
def test_predicted_parent_set_is_the_true_parents(alpha):
    assert predicted_parent_set(vocab_size=3, parents=(1, 2), alpha=alpha, window=3, max_degree=2) == (1, 2)


def test_non_contiguous_parents_are_predicted():
    assert predicted_parent_set(vocab_size=3, parents=(1, 3), alpha=0.1, window=3, max_degree=2) == (1, 3)


def test_budget_smaller_than_the_parent_set_picks_a_subset():
    best = predicted_parent_set(vocab_size=3, parents=(1, 2, 3), alpha=0.1, window=3, max_degree=2)
    assert len(best) == 2 and set(best) <= {1, 2, 3}


def test_superset_has_equal_chi2_but_lower_modified_mi():
    scores = selection_scores(3, (1, 2), 0.1, n_kernels=500, seed=1, window=3)
    assert scores.chi2[(1, 2, 3)] == pytest.approx(scores.chi2[(1, 2)], rel=1e-9)
    assert scores.modified[(1, 2, 3)] < scores.modified[(1, 2)]
    assert abs(scores.modified[()]) < 1e-12


def test_modified_mi_matches_the_definition_kernel_by_kernel():
    """One kernel at a time, with mu(e|z) = mu(z,e)/mu(z) written out in a loop."""
    generator = torch.Generator().manual_seed(0)
    kernels = DirichletPrior(0.1).sample_rows(6, 9, 3, generator, torch.float64)
    law = stationary_window_law(kernels, (1, 2), 3, 4).reshape(6, 3, 3, 3, 3)
    by_loop = []
    for k in range(6):
        joint_13 = law[k].sum(dim=1).permute(1, 0, 2)  # axes: x_{t-3}, x_{t-2}, x_{t-1}, x_t -> keep lags 1, 3
        table = joint_13.reshape(9, 3)
        by_loop.append(modified_mi_single(table))
    expected = sum(by_loop) / 6
    got = selection_scores(3, (1, 2), 0.1, subsets=[(1, 3)], n_kernels=6, seed=0, window=3).modified[(1, 3)]
    assert got == pytest.approx(expected, rel=1e-9)


def test_modified_chi2_mi_is_seeded():
    a = modified_chi2_mi(vocab_size=3, parents=(1,), alpha=0.2, n_kernels=100, seed=3, window=2)
    b = modified_chi2_mi(vocab_size=3, parents=(1,), alpha=0.2, n_kernels=100, seed=3, window=2)
    assert a == b and set(a) == {(), (1,), (2,), (1, 2)}


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"vocab_size": 1}, "vocab_size"),
        ({"parents": (1, 1)}, "parents"),
        ({"alpha": 0.0}, "alpha"),
        ({"window": 1}, "window"),
        ({"subsets": [(4,)]}, "subsets"),
        ({"n_kernels": 1}, "n_kernels"),
    ],
)
def test_bad_arguments(kwargs, argument):
    base = {"vocab_size": 3, "parents": (1, 2), "alpha": 0.1, "window": 3, "n_kernels": 10}
    with pytest.raises(ValueError, match=argument):
        modified_chi2_mi(**{**base, **kwargs})
