"""RepeatedTokens and the data-source helpers."""

import pytest
import torch

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
    with pytest.raises(ValueError, match="_FloatSource.sample must return an integer tensor"):
        sample_tokens(_FloatSource(), 2, seed=0)
