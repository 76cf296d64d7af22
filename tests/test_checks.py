"""ih_circuits.checks: the one place argument checks are written; each error names the argument and its range."""

import math

import pytest
import torch

from ih_circuits.checks import check_int, check_real, check_tokens


def test_check_int_accepts_integers_in_range_and_names_the_bounds():
    assert check_int(3, "n", 1, 3) == 3
    for value, message in (
        (0, "n must be an integer in [1, 3]; got 0"),
        (4, "n must be an integer in [1, 3]; got 4"),
        (True, "n must be an integer in [1, 3]; got True"),
        (2.0, "n must be an integer in [1, 3]; got 2.0"),
        ("2", "n must be an integer in [1, 3]; got '2'"),
    ):
        with pytest.raises(ValueError) as error:
            check_int(value, "n", 1, 3)
        assert str(error.value) == message
    with pytest.raises(ValueError, match=r"seq_len must be an integer >= max\(parents\) \+ 1 = 3; got 2"):
        check_int(2, "seq_len", 3, low_text="max(parents) + 1 = 3")
    with pytest.raises(ValueError, match=r"k must be an integer <= 5; got 6"):
        check_int(6, "k", high=5)


def test_check_real_refuses_nan_bools_and_infinities_unless_allowed():
    assert check_real(1, "lr", 0.0, low_open=True) == 1.0 and isinstance(check_real(1, "lr"), float)
    for value in (0.0, -1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match="lr must be a finite number > 0.0; got"):
            check_real(value, "lr", 0.0, low_open=True)
    assert check_real(math.inf, "a", -math.inf, low_open=True, finite=False) == math.inf
    for value in (-math.inf, math.nan):
        with pytest.raises(ValueError, match="a must be a number > -inf"):
            check_real(value, "a", -math.inf, low_open=True, finite=False)
    with pytest.raises(ValueError, match=r"p must be a finite number in \[0, 1\); got 1"):
        check_real(1, "p", 0, 1, high_open=True)


def test_check_tokens_returns_the_vocabulary_and_refuses_bad_batches():
    assert check_tokens(torch.tensor([[0, 2]]), None) == 3
    assert check_tokens(torch.tensor([[0, 0]]), None) == 2  # at least two tokens
    assert check_tokens(torch.tensor([[0, 1]]), 5) == 5
    for tokens, message in (
        (torch.tensor([[0.0, 1.0]]), "integer dtype"),
        (torch.tensor([0, 1]), r"shape \[batch, pos\]"),
        (torch.zeros(1, 0, dtype=torch.long), "non-empty"),
        (torch.tensor([[0, 3]]), r"integers in \[0, d_vocab=3\); got min 0, max 3"),
        ([[0, 1]], "torch.Tensor"),
    ):
        with pytest.raises(ValueError, match=message):
            check_tokens(tokens, 3, "tokens")
