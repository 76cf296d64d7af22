"""ih_circuits.history: the trajectory table's columns and the typed accessors that read them back as arrays."""

import pytest
import torch

from ih_circuits import IHConfig, IHTransformer, NGramTask
from ih_circuits.history import copier_weights, history_columns, selector_shares, subset_column, weight_column
from ih_circuits.training import Stage, TrainConfig, train


def small_setup():
    task = NGramTask(vocab_size=3, parents=(1, 2), seq_len=41, alpha=0.1, window=3)
    model = IHTransformer(IHConfig(d_vocab=3, n_ctx=41, n_heads=3, window=3, max_degree=2))
    config = TrainConfig(stages=(Stage(("all",), steps=12, lr=1.0),), batch_size=256, eval_size=256, record_every=4)
    return model, task, config


def test_column_names_number_heads_and_slots_from_zero():
    assert subset_column(()) == "share[]" and subset_column((0, 2)) == "share[0,2]"
    assert weight_column(1, 0) == "w[1,0]"
    model = IHTransformer(IHConfig(d_vocab=3, n_ctx=12, n_heads=2, window=2, max_degree=1))
    assert history_columns(model)[-7:] == ["share[]", "share[0]", "share[1]", "w[0,0]", "w[0,1]", "w[1,0]", "w[1,1]"]


def test_history_accessors_return_the_recorded_shares_and_weights_as_arrays():
    model, task, config = small_setup()
    run = train(model, task, config, quiet=True)
    shares = selector_shares(run.history)
    assert shares.subsets == tuple(model.config.subsets)
    assert shares.steps.tolist() == run.history["step"].tolist() and shares.shares.shape == (4, len(shares.subsets))
    final = model.selector_shares()
    # Recorded as Python floats from the same float32 tensors: equal to float32 rounding.
    assert shares.shares[-1].tolist() == pytest.approx([float(final[s]) for s in shares.subsets], abs=1e-6)
    weights = copier_weights(run.history)
    assert weights.weights.shape == (4, 3, 3)
    # Same float32 rounding argument as the shares (measured: equal; row sums off by 6e-8).
    assert weights.weights[-1] == pytest.approx(model.copier_weights().detach().double().numpy(), abs=1e-6)
    assert weights.weights.sum(-1) == pytest.approx(torch.ones(4, 3).numpy(), abs=1e-6)  # softmax rows
    with pytest.raises(ValueError, match="no share"):
        selector_shares(run.history[["step", "loss"]])
