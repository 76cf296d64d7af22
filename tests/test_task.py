"""NGramTask: shapes, seeds, the parent structure of the samples, and argument validation."""

import pytest
import torch

from ih_circuits import DirichletPrior, NGramTask
from ih_circuits.chain import history_codes, stationary_window_law


def martingale_z(tokens, kernels, lags, d, select=None):
    """Martingale CLT statistics for "x_t ~ pi(. | z_t) given the whole past".

    For any weight w_t fixed by the past, sum_t w_t (1[x_t = e] - pi(e | z_t)) has mean 0 and variance
    sum_t w_t^2 pi (1 - pi), so its standardised value is ~N(0, 1). We use w = 1 (the pooled frequency)
    and w = pi(e | z_t) - 1/d (which reacts when the kernel rows are matched to the wrong histories),
    over positions with a full history; ``select`` restricts to positions where a mask is true.
    """
    codes = history_codes(tokens, lags, d)[:, :-1]
    mask = codes >= 0
    if select is not None:
        mask = mask & select
    probs = kernels.double().gather(1, codes.clamp_min(0)[..., None].expand(-1, -1, d))
    onehot = torch.nn.functional.one_hot(tokens, d).double()
    stats = []
    for weight in (torch.ones_like(probs), probs - 1.0 / d):
        resid = (weight * (onehot - probs) * mask[..., None]).sum((0, 1))
        var = (weight.square() * probs * (1 - probs) * mask[..., None]).sum((0, 1))
        stats.append(resid / var.sqrt())
    return torch.cat(stats)


@pytest.mark.parametrize("parents", [(1,), (1, 2), (1, 3), (2, 3)], ids=lambda p: f"parents={p}")
def test_samples_follow_their_kernels(parents):
    task = NGramTask(vocab_size=3, parents=parents, seq_len=60, alpha=1.0)
    batch = task.sample(3000, seed=1)
    z = martingale_z(batch.tokens, batch.kernels, parents, 3)
    # Each Z_e ~ N(0,1); |Z| < 4.5 has two-sided probability 7e-6 per statistic.
    assert z.abs().max() < 4.5


def test_non_parents_carry_no_extra_information():
    task = NGramTask(vocab_size=3, parents=(1, 2), seq_len=80, alpha=1.0)
    batch = task.sample(3000, seed=2)
    lag3 = torch.nn.functional.pad(batch.tokens, (3, 0), value=-1)[:, :-3]
    for value in range(3):
        z = martingale_z(batch.tokens, batch.kernels, (1, 2), 3, select=lag3 == value)
        # N(0,1) under the null, as above: 18 statistics at P(|Z| > 4.5) = 7e-6 each (measured max 2.5).
        assert z.abs().max() < 4.5


def test_wrong_parent_structure_is_detected():
    """The statistic above can fail: scoring the same samples with lags (1, 3) is far off."""
    task = NGramTask(vocab_size=3, parents=(1, 2), seq_len=60, alpha=1.0)
    batch = task.sample(3000, seed=1)
    # Measured max |z| = 168 (165-169 over seeds 1-5); the null gives |z| < 4.5, so 10 separates the two.
    assert martingale_z(batch.tokens, batch.kernels, (1, 3), 3).abs().max() > 10


def test_first_tokens_are_uniform():
    tokens = NGramTask(vocab_size=4, parents=(1, 2), seq_len=10).sample(40000, seed=3).tokens[:, :2]
    freq = torch.nn.functional.one_hot(tokens, 4).double().mean((0, 1))
    # 80000 draws: stderr of a frequency is sqrt(0.25*0.75/80000) = 0.0015.
    assert torch.allclose(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=6 * 0.0015)


def test_stationary_init_starts_from_the_stationary_law():
    task = NGramTask(vocab_size=3, parents=(1, 2), seq_len=12, alpha=1.0, init="stationary")
    batch = task.sample(20000, seed=4)
    law = stationary_window_law(batch.kernels, (1, 2), 3, 2)
    state = batch.tokens[:, 0] * 3 + batch.tokens[:, 1]
    resid = torch.nn.functional.one_hot(state, 9).double() - law
    z = resid.sum(0) / (law * (1 - law)).sum(0).sqrt()
    # Sum of 20000 independent Bernoulli residuals over its exact sd: N(0,1); 9 states at P(|Z| > 4.5) = 7e-6.
    assert z.abs().max() < 4.5
    # And every later position has the same marginal in expectation.
    late = batch.tokens[:, 10] * 3 + batch.tokens[:, 11]
    z_late = (torch.nn.functional.one_hot(late, 9).double() - law).sum(0) / (law * (1 - law)).sum(0).sqrt()
    assert z_late.abs().max() < 4.5  # the same N(0,1) statistic as above


def test_stationary_window_law_is_invariant():
    kernels = DirichletPrior(0.3).sample_rows(50, 9, 3, torch.Generator().manual_seed(0), torch.float64)
    law = stationary_window_law(kernels, (1, 2), 3, 3)
    one_step = stationary_window_law(kernels, (1, 2), 3, 4).reshape(50, 3, 27).sum(1)
    # float64 linear solve: measured differences 8e-11 (invariance) and 6e-11 (marginal); 1e-9 is a 10x margin.
    assert torch.allclose(law, one_step, atol=1e-9)
    assert torch.allclose(law.sum(-1), torch.ones(50, dtype=torch.float64))  # default rtol 1e-5: float rounding
    shorter = stationary_window_law(kernels, (1, 2), 3, 1)
    assert torch.allclose(shorter, law.reshape(50, 9, 3).sum(1), atol=1e-9)


def test_same_seed_same_tokens_and_generator_equivalence(paper_task):
    a = paper_task.sample(64, seed=7)
    b = paper_task.sample(64, seed=7)
    c = paper_task.sample(64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.kernels, b.kernels)
    assert torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.tokens, paper_task.sample(64, seed=8).tokens)


def test_sample_shapes_and_types(paper_task):
    batch = paper_task.sample(5, seed=0)
    assert batch.tokens.dtype == torch.long and batch.tokens.shape == (5, 101)
    assert batch.kernels.shape == (5, 9, 3)
    assert torch.allclose(batch.kernels.sum(-1), torch.ones(5, 9))  # default tolerance: float32 rounding
    assert int(batch.tokens.min()) >= 0 and int(batch.tokens.max()) <= 2


@pytest.mark.parametrize("alpha", [1e-30, 1e-10, 1e-3, 1e3])
def test_extreme_alpha_gives_finite_kernels_and_tokens(alpha):
    batch = NGramTask(vocab_size=3, parents=(1, 2), seq_len=41, alpha=alpha).sample(200, seed=0)
    assert torch.isfinite(batch.kernels).all() and (batch.kernels >= 0).all()
    # float32 rows of 3 entries: measured error <= 1.2e-7 (one ulp); 1e-5 leaves room for other platforms.
    assert torch.allclose(batch.kernels.sum(-1), torch.ones(()), atol=1e-5)
    assert batch.tokens.shape == (200, 41) and 0 <= int(batch.tokens.min()) and int(batch.tokens.max()) <= 2


def test_tiny_alpha_gives_valid_kernels():
    kernels = NGramTask(vocab_size=5, parents=(1,), seq_len=4, alpha=0.005).sample(2000, seed=0).kernels
    assert torch.isfinite(kernels).all()
    assert torch.allclose(kernels.sum(-1), torch.ones_like(kernels[..., 0]))  # default tolerance: float32 rounding


def test_asymmetric_prior_mean():
    prior = DirichletPrior((1.0, 2.0, 7.0))
    task = NGramTask(vocab_size=3, parents=(1,), seq_len=4, prior=prior)
    kernels = task.sample(20000, seed=0).kernels
    mean = kernels.double().mean((0, 1))
    # Dirichlet mean alpha / sum(alpha); 60000 independent rows, stderr <= sqrt(0.25 / 60000) = 0.002, so 0.01 is
    # >= 5 standard errors (the Dirichlet variance gives stderr 0.0006, measured error 0.0009).
    assert torch.allclose(mean, torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64), atol=0.01)


def test_fixed_dataset_minibatches_cover_each_sequence_once(paper_task):
    data = paper_task.fixed_dataset(10, seed=0)
    seen = torch.cat([mb.tokens for mb in data.minibatches(4, seed=1)])
    assert seen.shape == (10, 101)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, data.tokens.tolist()))


def test_task_round_trips_through_dict():
    task = NGramTask(vocab_size=4, parents=(1, 3), seq_len=20, alpha=0.3, window=4, init="stationary")
    assert NGramTask.from_dict(task.to_dict()) == task
    with pytest.raises(ValueError, match="NGramTask has unknown fields"):
        NGramTask.from_dict({**task.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match=r"NGramTask is missing \[.init.\]"):
        NGramTask.from_dict({k: v for k, v in task.to_dict().items() if k != "init"})


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"vocab_size": 1}, "vocab_size"),
        ({"parents": (0, 1)}, "parents"),
        ({"parents": (-1,)}, "parents"),
        ({"parents": (1, 1)}, "parents"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": 1e-39}, r"alpha must be a finite number >= 1e-30"),
        ({"seq_len": 2}, "seq_len"),
        ({"window": 1}, "window"),
        ({"init": "random"}, "init"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    base = {"vocab_size": 3, "parents": (1, 2), "seq_len": 10, "alpha": 0.1}
    with pytest.raises(ValueError, match=argument):
        NGramTask(**{**base, **kwargs})


def test_bad_sample_arguments(paper_task):
    with pytest.raises(ValueError, match="batch_size"):
        paper_task.sample(0, seed=0)
    with pytest.raises(ValueError, match="either seed or generator"):
        paper_task.sample(2, seed=0, generator=torch.Generator())


def test_a_long_chain_shows_progress_and_a_short_one_does_not(monkeypatch, capsys):
    """The estimate, (positions) x (20 us + 20 ns x batch), against PROGRESS_SECONDS (3 s): 10^5 positions at batch
    64 is about 2.1 s (no bar), 2 x 10^5 about 4.3 s (a bar). Checked on the estimate, with the threshold moved
    instead of waiting: no timing here."""
    from ih_circuits import task as task_module

    seconds = 200_000 * (task_module.SECONDS_PER_POSITION + 64 * task_module.SECONDS_PER_TOKEN)
    assert seconds > task_module.PROGRESS_SECONDS > 100_000 * (task_module.SECONDS_PER_POSITION + 64e-8)
    NGramTask(3, (1, 2), 2000).sample(4, seed=0)
    assert "sample" not in capsys.readouterr().err
    monkeypatch.setattr(task_module, "PROGRESS_SECONDS", 0.0)
    batch = NGramTask(3, (1, 2), 2000).sample(4, seed=0)
    assert "sample: " in capsys.readouterr().err
    assert torch.equal(batch.tokens, NGramTask(3, (1, 2), 2000).sample(4, seed=0).tokens)  # the bar changes nothing


def test_a_task_with_another_prior_round_trips_whatever_its_alpha():
    """alpha belongs to the Dirichlet prior; under another prior it is carried along, not checked against it."""
    from ih_circuits import SparseSupportPrior

    task = NGramTask(vocab_size=3, parents=(1,), seq_len=20, alpha=0.0, prior=SparseSupportPrior(2))
    assert NGramTask.from_dict(task.to_dict()) == task
