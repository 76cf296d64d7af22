"""probe_data (what the probes accept) and resample_positions (how they corrupt a token)."""

import pytest
import torch

from ih_circuits import IHConfig, NGramTask, ideal_model
from ih_circuits.baselines import ordinary_transformer
from ih_circuits.probes import adapt, probe_data, resample_positions
from ih_circuits.sources import RepeatedTokens


def test_resampling_changes_exactly_one_position_to_a_token_of_the_batch():
    tokens = torch.randint(0, 50, (64, 30), generator=torch.Generator().manual_seed(0)) * 2  # even ids only
    positions = [28, 27, 20]
    corrupted = resample_positions(tokens, positions, torch.Generator().manual_seed(1))
    assert corrupted.shape == (3, 64, 30)
    for variant, position in enumerate(positions):
        changed = corrupted[variant] != tokens
        assert bool(changed[:, position].all()) and int(changed.sum()) == 64
    assert bool((corrupted % 2 == 0).all())  # replacements come from the batch's own tokens
    again = resample_positions(tokens, positions, torch.Generator().manual_seed(1))
    assert torch.equal(corrupted, again)


def test_resampling_follows_the_batch_token_frequencies():
    # Tokens 0 (3/4 of the batch) and 1, 2 (1/8 each): replacing a 0 draws 1 or 2 with equal odds.
    tokens = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 2]]).repeat(4000, 1)
    corrupted = resample_positions(tokens, [0], torch.Generator().manual_seed(0))[0, :, 0]
    share_of_one = float((corrupted == 1).float().mean())
    # 4000 draws of a fair coin: stderr 0.0079, so 0.5 +- 0.04 is a 5-sigma band.
    assert set(corrupted.tolist()) == {1, 2} and abs(share_of_one - 0.5) < 0.04


@pytest.mark.usefixtures("without_runtime_typecheck")
def test_probe_data_accepts_tasks_sources_and_tensors_and_refuses_the_rest():
    model = ordinary_transformer(RepeatedTokens(10, 40, 4, 12), d_model=16, n_heads=2)
    adapter = adapt(model)
    tokens = torch.randint(0, 10, (16, 40), generator=torch.Generator().manual_seed(0))
    from_tensor = probe_data(tokens, adapter)
    assert from_tensor.parents is None and from_tensor.task is None and from_tensor.seq_len == 40
    assert torch.equal(from_tensor.tokens_for(999, 0, "any", torch.device("cpu")), tokens)
    from_source = probe_data(RepeatedTokens(10, 40, 4, 12), adapter)
    assert from_source.parents == (1,) and from_source.max_lag() == 8
    task = NGramTask(vocab_size=3, parents=(1, 2), seq_len=30, window=3)
    assert probe_data(task, adapter).task is task and probe_data(task, adapter).max_lag() == 5
    with pytest.raises(ValueError, match="data must be integers in \\[0, d_vocab=10\\)"):
        probe_data(tokens + 5, adapter)
    with pytest.raises(ValueError, match="data must have an integer dtype"):
        probe_data(tokens.float(), adapter)
    with pytest.raises(ValueError, match="n_ctx is 40"):
        probe_data(torch.zeros(4, 41, dtype=torch.long), adapter)
    with pytest.raises(ValueError, match="data must be an NGramTask, a data source"):
        probe_data([[1, 2, 3]], adapter)
    with pytest.raises(ValueError, match="exceeds the model's d_vocab=10"):
        probe_data(RepeatedTokens(11, 40, 4, 12), adapter)
    ours = adapt(ideal_model(IHConfig(), lags=(1, 2)))
    with pytest.raises(ValueError, match="d_vocab=3 but NGramTask.vocab_size=2"):
        probe_data(NGramTask(vocab_size=2, parents=(1,), seq_len=30), ours)
    with pytest.raises(ValueError, match="at least two distinct"):
        resample_positions(torch.zeros(4, 5, dtype=torch.long), [1], torch.Generator())
