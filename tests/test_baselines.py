"""The ordinary TransformerLens baseline: built offline, hookable, trainable by the same trainer."""

import pytest
import torch
from transformer_lens import ActivationCache

from ih_circuits import NGramTask, last_position_nll, next_token_nll, unigram_predictive
from ih_circuits.baselines import has_hooked_transformer, ordinary_transformer, train_ordinary_transformer
from ih_circuits.training import Stage, TrainConfig, train


@pytest.fixture
def task():
    return NGramTask(vocab_size=3, parents=(1, 2), seq_len=41, alpha=0.1, window=3)


def test_builds_offline_and_speaks_transformer_lens(task):
    model = ordinary_transformer(task, d_model=16, n_heads=2)
    tokens = task.sample(4, seed=0).tokens
    logits, cache = model.run_with_cache(tokens)
    assert logits.shape == (4, 41, 3)
    assert isinstance(cache, ActivationCache)
    assert cache["pattern", 0].shape == (4, 2, 41, 41)
    assert "blocks.0.mlp.hook_post" not in cache  # attention only


def test_auto_builds_a_hooked_transformer_where_transformer_lens_has_one(task):
    from transformer_lens.model_bridge import TransformerBridge

    model = ordinary_transformer(task, d_model=16, n_heads=2)
    if has_hooked_transformer():
        from transformer_lens import HookedTransformer

        assert isinstance(model, HookedTransformer)
    else:
        assert isinstance(model, TransformerBridge)
    bridge = ordinary_transformer(task, d_model=16, n_heads=2, kind="bridge")
    assert isinstance(bridge, TransformerBridge) and not model.training and not bridge.training


def test_kind_hooked_on_transformer_lens_4_says_why_not(task):
    if has_hooked_transformer():
        pytest.skip("this TransformerLens has HookedTransformer")
    with pytest.raises(ValueError, match="kind='hooked' needs HookedTransformer, which TransformerLens 4.x removed"):
        ordinary_transformer(task, kind="hooked")


def test_same_seed_same_weights(task):
    a = ordinary_transformer(task, d_model=16, n_heads=2, seed=5)
    b = ordinary_transformer(task, d_model=16, n_heads=2, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_trains_with_the_same_trainer(task):
    model = ordinary_transformer(task, d_model=16, n_heads=2)
    config = TrainConfig(
        stages=(Stage(steps=30, lr=1e-2, optimizer="adam"),),
        batch_size=64,
        objective="all",
        eval_size=128,
        record_every=10,
    )
    run = train(model, task, config, quiet=True)
    # Measured drop 0.51 nats in 30 steps (0.65 and 0.25 with model and data seeds 1 and 2).
    assert run.history["eval_loss"].iloc[-1] < run.history["eval_loss"].iloc[0] - 0.2
    with pytest.raises(ValueError, match="only for IHTransformer"):
        train(model, task, TrainConfig(stages=(Stage(("selector",), steps=1),)), quiet=True)


def test_bad_arguments(task):
    with pytest.raises(ValueError, match="divisible"):
        ordinary_transformer(task, d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="positional_embedding_type"):
        ordinary_transformer(task, positional_embedding_type="alibi")
    with pytest.raises(ValueError, match=r"kind must be one of \('auto', 'hooked', 'bridge'\)"):
        ordinary_transformer(task, kind="hf")


@pytest.mark.slow
def test_learns_the_task_well_below_the_unigram():
    """Notebook 04's full run (the same task, steps and seed)."""
    task = NGramTask(vocab_size=3, parents=(1, 2), seq_len=101, alpha=0.1, window=3)
    run = train_ordinary_transformer(task, steps=800, seed=0, quiet=True)
    history = run.history.set_index("step")
    excess = history["excess_loss"]
    # Notebook 04's numbers: "a plateau (about 0.55-0.6 nats, Bayes is 0.30)"; measured eval loss 0.609, 0.579,
    # 0.567, 0.548 at steps 100-400 and Bayes 0.3029.
    assert history.loc[[100, 200, 300, 400], "eval_loss"].between(0.5, 0.65).all()
    assert round(history["bayes_loss"].iloc[0], 2) == 0.30
    # Notebook 04: "creeps along a plateau for a few hundred steps, and drops towards Bayes between steps 500 and
    # 600". Measured excess over Bayes 0.306, 0.276, 0.264, 0.246 at steps 100-400 (at most 0.03 per 100 steps),
    # 0.197 at 500, 0.051 at 600, 0.039 at 800: asked, with about 40% margins, for a plateau above 0.2 falling
    # less than 0.05 per 100 steps, a fall of more than 0.1 from 500 to 600, and an end below 0.08.
    plateau = excess.loc[[100, 200, 300, 400]]
    assert (plateau > 0.2).all() and (-plateau.diff().dropna() < 0.05).all()
    assert excess.loc[500] - excess.loc[600] > 0.1 and excess.loc[800] < 0.08
    tokens = task.sample(1000, seed=99).tokens
    with torch.no_grad():
        model_nll = -torch.log_softmax(run.model(tokens), -1)[:, :-1].gather(2, tokens[:, 1:, None]).mean()
    unigram = next_token_nll(unigram_predictive(tokens, 0.1, d_vocab=3), tokens).mean()
    bayes = next_token_nll(task.bayes_predictive(tokens), tokens).mean()
    # Measured nll 0.352 against Bayes 0.314 and unigram 0.777: 8% of the gap left, asked for under 50%.
    assert model_nll < bayes + 0.5 * (unigram - bayes)
    assert last_position_nll(task.bayes_predictive(tokens), tokens).mean() < unigram  # measured 0.231 < 0.777
