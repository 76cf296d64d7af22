"""ih_circuits.chain against brute force on tiny inputs: digits, history codes, lag checks, stationary laws."""

import itertools

import pytest
import torch

from ih_circuits.chain import burned_in_law, digit_table, history_codes, stationary_window_law, validate_lags
from ih_circuits.priors import DirichletPrior


@pytest.mark.parametrize(("n_digits", "d_vocab"), [(1, 2), (2, 3), (3, 2), (2, 4)])
def test_digit_table_lists_every_code_most_significant_digit_first(n_digits, d_vocab):
    expected = [list(digits) for digits in itertools.product(range(d_vocab), repeat=n_digits)]
    assert digit_table(n_digits, d_vocab).tolist() == expected


@pytest.mark.parametrize("lags", [(1,), (2,), (1, 2), (1, 3), (2, 3), (1, 2, 4)])
def test_history_codes_match_a_loop_over_positions(lags):
    d = 3
    tokens = torch.randint(0, d, (4, 9), generator=torch.Generator().manual_seed(len(lags)))
    codes = history_codes(tokens, lags, d)
    for b in range(4):
        for p in range(10):  # position 9 is the query slot after the last token
            if p - max(lags) < 0:
                expected = -1
            else:
                expected = 0
                for lag in lags:  # the smallest lag is the most significant digit
                    expected = expected * d + int(tokens[b, p - lag])
            assert int(codes[b, p]) == expected, (b, p)


def test_history_codes_of_no_lags_are_all_zero():
    assert history_codes(torch.tensor([[2, 0, 1]]), (), 3).tolist() == [[0, 0, 0, 0]]


@pytest.mark.usefixtures("without_runtime_typecheck")  # the wrong types reach our own check
def test_validate_lags_sorts_and_refuses_what_is_not_a_lag_set():
    assert validate_lags([3, 1], "parents") == (1, 3)
    assert validate_lags((), "lags") == ()
    for bad, message in (
        ([1, 1], "parents must not repeat a lag"),
        ([0], "every lag in parents=\\(0,\\) must be an integer >= 1"),
        ([True], "must be an integer >= 1"),
        ([1.0], "must be an integer >= 1"),
        ("12", "parents must be a sequence of positive integer lags"),
    ):
        with pytest.raises(ValueError, match=message):
            validate_lags(bad, "parents")


def brute_force_stationary_law(kernel: torch.Tensor, parents: tuple[int, ...], d: int, length: int) -> list[float]:
    """Power iteration on the explicit chain over runs of `length` >= max(parents) tokens, with Python loops."""
    order = max(parents)
    runs = list(itertools.product(range(d), repeat=length))
    law = {run: 1.0 / len(runs) for run in runs}
    for _ in range(3000):
        stepped = dict.fromkeys(runs, 0.0)
        for run, mass in law.items():
            z = 0
            for lag in parents:  # the token after `run` has parents run[-lag]
                z = z * d + run[-lag]
            for e in range(d):
                stepped[run[1:] + (e,)] += mass * float(kernel[z, e])
        law = stepped
    assert length >= order
    return [law[run] for run in runs]


@pytest.mark.parametrize(("parents", "length"), [((1,), 1), ((1, 2), 2), ((1, 3), 3), ((2,), 3), ((1, 2), 4)])
def test_stationary_window_law_matches_power_iteration(parents, length):
    d = 2
    kernels = DirichletPrior(1.0).sample_rows(3, d ** len(parents), d, torch.Generator().manual_seed(5), torch.float64)
    law = stationary_window_law(kernels, parents, d, length)
    for b in range(3):
        # Dirichlet(1) rows on 2 tokens mix fast: 3000 power steps converge to float64 precision, and the
        # solver's 1e-10 teleport moves the law by ~1e-10 x mixing time, far below 1e-8.
        assert law[b].tolist() == pytest.approx(brute_force_stationary_law(kernels[b], parents, d, length), abs=1e-8)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("restore_threads")
def test_the_stationary_law_is_the_same_at_one_and_two_threads():
    """400 states (vocabulary 20, order 2): oneMKL's batched LU gave invalid pivots at 2 threads (a RuntimeError
    after "DLASWP" on this machine); the solve now runs on one thread, so every thread count gives the same law."""
    kernels = DirichletPrior(0.1).sample_rows(4, 400, 20, torch.Generator().manual_seed(7), torch.float64)
    laws = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        laws.append(stationary_window_law(kernels, (1, 2), 20, 2))
    assert torch.equal(laws[0], laws[1]) and torch.get_num_threads() == 2
    assert torch.allclose(laws[0].sum(-1), torch.ones(4, dtype=torch.float64))


def test_shorter_stationary_windows_are_marginals():
    kernels = DirichletPrior(0.5).sample_rows(4, 9, 3, torch.Generator().manual_seed(6), torch.float64)
    long = stationary_window_law(kernels, (1, 2), 3, 3).reshape(4, 3, 3, 3)
    # Stationarity: the law of the first two tokens equals that of the last two (float64 solve: 1e-10).
    assert torch.allclose(stationary_window_law(kernels, (1, 2), 3, 2), long.sum(-1).reshape(4, 9), atol=1e-10)
    assert torch.allclose(stationary_window_law(kernels, (1, 2), 3, 2), long.sum(1).reshape(4, 9), atol=1e-10)
    assert torch.allclose(stationary_window_law(kernels, (1, 2), 3, 1), long.sum((1, 2)), atol=1e-10)


def test_burned_in_law_starts_uniform_and_converges_to_the_stationary_law():
    kernels = DirichletPrior(1.0).sample_rows(5, 9, 3, torch.Generator().manual_seed(7), torch.float64)
    assert torch.equal(burned_in_law(kernels, (1, 2), 3, 1e-12, 0), torch.full((5, 9), 1 / 9, dtype=torch.float64))
    burned = burned_in_law(kernels, (1, 2), 3, 1e-13, 10_000)
    # The stopping rule leaves an L1 step below 1e-13; Dirichlet(1) chains mix in a few steps, so 1e-10 is loose.
    assert torch.allclose(burned, stationary_window_law(kernels, (1, 2), 3, 2), atol=1e-10)
