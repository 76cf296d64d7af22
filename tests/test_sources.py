"""RepeatedTokens and the data-source helpers."""

import pytest
import torch

import ih_circuits as ih
from ih_circuits import NGramTask
from ih_circuits.sources import DataSource, RepeatedTokens, sample_tokens


def test_repeated_tokens_repeat_their_block_with_a_period_per_sequence():
    source = RepeatedTokens(vocab_size=10, seq_len=40, min_period=4, max_period=12)
    tokens = source.sample(256, seed=0)
    assert tokens.shape == (256, 40) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 10
    periods = source.periods(tokens)
    assert all(bool(torch.equal(row[p:], row[:-p])) for row, p in zip(tokens, periods.tolist(), strict=True))
    # 256 draws of a uniform period in 4..12: every value appears (P(one missing) <= 9 (8/9)^256 < 1e-11).
    assert set(periods.tolist()) == set(range(4, 13))
    assert torch.equal(tokens, source.sample(256, seed=0)) and not torch.equal(tokens, source.sample(256, seed=1))
    assert source.parents == (1,)


def test_data_source_protocol_and_sample_tokens():
    task = NGramTask(vocab_size=3, parents=(1,), seq_len=20)
    for source in (task, RepeatedTokens(5, 20, 2, 6)):
        assert isinstance(source, DataSource)
        tokens = sample_tokens(source, 8, seed=3)
        assert tokens.shape == (8, 20) and torch.equal(tokens, sample_tokens(source, 8, seed=3))


class _FloatSource:
    vocab_size, seq_len = 4, 10

    def sample(self, n, *, seed=None):
        return torch.zeros(n, 10)


@pytest.mark.usefixtures("without_runtime_typecheck")
def test_bad_sources_and_arguments_are_refused():
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2 \\* max_period = 24"):
        RepeatedTokens(vocab_size=10, seq_len=20, min_period=4, max_period=12)
    with pytest.raises(ValueError, match="max_period must be an integer >= min_period=5"):
        RepeatedTokens(vocab_size=10, seq_len=20, min_period=5, max_period=4)
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 2"):
        RepeatedTokens(vocab_size=1, seq_len=20)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        RepeatedTokens(4, 40).sample(0, seed=0)
    with pytest.raises(ValueError, match=r"the tokens of _FloatSource.sample\(2\) .* must have an integer dtype"):
        sample_tokens(_FloatSource(), 2, seed=0)


class _Source:
    """A source whose ``sample`` returns whatever ``make(n)`` builds."""

    vocab_size, seq_len = 4, 10

    def __init__(self, make):
        self.make = make

    def sample(self, n, *, seed=None):
        return self.make(n)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda n: torch.full((n, 10), 4), r"\(vocab_size=4\) must be integers in \[0, d_vocab=4\); got min 4, max 4"),
        (lambda n: torch.full((n, 10), -1), r"must be integers in \[0, d_vocab=4\); got min -1"),
        (lambda n: torch.zeros(n, 9, dtype=torch.long), r"shape \(2, 9\), but its seq_len=10 promises \(2, 10\)"),
        (lambda n: torch.zeros(n + 1, 10, dtype=torch.long), r"shape \(3, 10\), but its seq_len=10 promises"),
        (lambda n: torch.zeros(n * 10, dtype=torch.long), r"must have shape \[batch, pos\]; got \(20,\)"),
        (lambda n: torch.zeros(n, 10, 2, dtype=torch.long), r"must have shape \[batch, pos\]; got \(2, 10, 2\)"),
        (lambda n: [[0] * 10] * n, r"_Source.sample\(2\) must return an integer tensor .*; got list"),
    ],
)
@pytest.mark.usefixtures("without_runtime_typecheck")
def test_tokens_from_a_source_are_checked_before_any_model_sees_them(make, message):
    """Range, rank and length, whatever the probes or the trainer then do with them."""
    with pytest.raises(ValueError, match=message):
        sample_tokens(_Source(make), 2, seed=0)
    model = ih.IHTransformer(ih.IHConfig(d_vocab=4, n_ctx=10))
    with pytest.raises(ValueError, match=message):
        ih.baselines.train_on_source(model, _Source(make), steps=1, batch_size=2)
