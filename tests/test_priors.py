"""Priors: the shipped non-Dirichlet prior against brute force, the registry, and a custom prior end to end."""

import math
from dataclasses import dataclass
from itertools import combinations

import pytest
import torch

import ih_circuits as ih
from ih_circuits import priors
from ih_circuits.priors import DirichletPrior, SparseSupportPrior, prior_from_dict, register_prior
from ih_circuits.theory import predicted_parent_set, selection_scores
from ih_circuits.training import TrainingRun


def brute_force_sparse_predictive(counts: list[float], support: int) -> list[float]:
    """Average of the row law over every k-set S that contains the seen tokens (all equally likely a posteriori)."""
    d = len(counts)
    seen = {e for e, n in enumerate(counts) if n > 0}
    sets = [set(s) for s in combinations(range(d), support) if seen <= set(s)]
    return [sum((e in s) / support for s in sets) / len(sets) for e in range(d)]


def test_sparse_support_rows_are_uniform_on_k_random_tokens():
    rows = SparseSupportPrior(2).sample_rows(400, 25, 5, torch.Generator().manual_seed(0), torch.float64)
    assert rows.shape == (400, 25, 5)
    assert ((rows == 0) | (rows == 0.5)).all() and ((rows > 0).sum(-1) == 2).all()
    # Each token is in a row's support with probability k/d = 0.4; over n = 10,000 rows the frequency has standard
    # error sqrt(0.4 * 0.6 / n) = 0.0049, so 0.02 is four standard errors.
    frequency = (rows > 0).double().mean((0, 1))
    assert torch.allclose(frequency, torch.full((5,), 0.4, dtype=torch.float64), atol=0.02)


@pytest.mark.parametrize("support", [1, 2, 3])
def test_sparse_support_predictive_equals_the_brute_force_posterior(support):
    generator = torch.Generator().manual_seed(support)
    for _ in range(20):
        seen = torch.randperm(5, generator=generator)[: int(torch.randint(0, support + 1, (1,), generator=generator))]
        counts = torch.zeros(5, dtype=torch.float64)
        counts[seen] = torch.randint(1, 4, (len(seen),), generator=generator).double()
        expected = brute_force_sparse_predictive(counts.tolist(), support)
        # Both sides are sums of a few rationals in float64: agreement to 1e-12.
        assert SparseSupportPrior(support).predictive(counts).tolist() == pytest.approx(expected, abs=1e-12)


def test_sparse_support_refuses_what_it_cannot_have_drawn():
    with pytest.raises(ValueError, match="support must be an integer >= 1; got 0"):
        SparseSupportPrior(0)
    with pytest.raises(ValueError, match="support must be <= d_vocab=3"):
        SparseSupportPrior(4).sample_rows(1, 1, 3, torch.Generator(), torch.float32)
    with pytest.raises(ValueError, match="3 distinct next tokens after one history, more than support=2"):
        SparseSupportPrior(2).predictive(torch.tensor([1.0, 1.0, 1.0]))


def test_bayes_predictive_uses_the_prior_it_is_given():
    task = ih.NGramTask(vocab_size=4, parents=(1,), seq_len=60, prior=SparseSupportPrior(2))
    batch = task.sample(64, seed=0)
    bayes = task.bayes_predictive(batch.tokens)
    oracle = task.oracle_predictive(batch)
    dirichlet = ih.bayes_predictive(batch.tokens, (1,), 0.1, d_vocab=4)
    assert torch.isfinite(ih.next_token_nll(bayes, batch.tokens)).all()
    # Once both tokens of a row's support have been seen, the sparse posterior is the true row exactly.
    settled = (bayes > 0).sum(-1) == 2
    assert settled.float().mean() > 0.5
    assert torch.allclose(bayes[settled], oracle[settled], atol=1e-6)
    assert not torch.allclose(dirichlet[settled], oracle[settled], atol=1e-2)


def test_tasks_with_different_priors_differ_and_a_dirichlet_prior_sets_alpha():
    base = {"vocab_size": 3, "parents": (1, 2), "seq_len": 20}
    assert ih.NGramTask(**base) == ih.NGramTask(**base, prior=DirichletPrior(0.1))
    assert ih.NGramTask(**base) != ih.NGramTask(**base, prior=SparseSupportPrior(2))
    assert ih.NGramTask(**base, prior=SparseSupportPrior(2)) != ih.NGramTask(**base, prior=SparseSupportPrior(3))
    assert ih.NGramTask(**base, prior=DirichletPrior(0.3)).alpha == 0.3
    assert len({ih.NGramTask(**base), ih.NGramTask(**base, prior=SparseSupportPrior(2))}) == 2


@dataclass(frozen=True)
class FlatPrior:
    """A test prior: every row is uniform, so the next token is uniform whatever was seen."""

    scale: float = 1.0

    def sample_rows(self, batch, n_rows, d_vocab, generator, dtype):
        return torch.full((batch, n_rows, d_vocab), 1.0 / d_vocab, dtype=dtype, device=generator.device)

    def predictive(self, counts):
        return torch.full_like(counts, 1.0 / counts.shape[-1])

    def to_dict(self):
        return {"kind": "flat", "scale": self.scale}


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(priors, "_REGISTRY", dict(priors._REGISTRY))


def test_a_registered_prior_saves_and_loads_and_an_unregistered_one_is_refused(registry):
    task = ih.NGramTask(vocab_size=3, parents=(1,), seq_len=10, prior=FlatPrior(2.0))
    with pytest.raises(ValueError, match="prior cannot be saved: unknown prior description.*'flat'"):
        task.to_dict()
    register_prior("flat", FlatPrior)
    register_prior("flat", FlatPrior)  # the same class again: a no-op
    assert ih.NGramTask.from_dict(task.to_dict()) == task
    with pytest.raises(ValueError, match="'flat' is already registered to FlatPrior"):
        register_prior("flat", SparseSupportPrior)
    with pytest.raises(ValueError, match="cls must be a class with sample_rows, predictive and to_dict"):
        register_prior("number", int)
    with pytest.raises(ValueError, match="does not match FlatPrior"):
        prior_from_dict({"kind": "flat", "width": 1})
    assert set(priors.registered_priors()) == {"dirichlet", "sparse_support", "flat"}


def test_a_custom_prior_changes_the_predicted_parent_set():
    # Vocabulary 3, parents (1, 2), one selected lag: Dirichlet(0.1) favours lag 2, sparse flat rows favour lag 1.
    common = {"vocab_size": 3, "parents": (1, 2), "window": 3, "n_kernels": 4000, "seed": 0}
    for prior, winner, loser in ((DirichletPrior(0.1), (2,), (1,)), (SparseSupportPrior(2), (1,), (2,))):
        scores = selection_scores(**common, prior=prior)
        subsets = list(scores.modified)  # the rows of modified_per_kernel
        gap = scores.modified_per_kernel[subsets.index(winner)] - scores.modified_per_kernel[subsets.index(loser)]
        # The gap is a mean over 4000 independent kernels: require it above five of its standard errors.
        assert gap.mean() > 5 * gap.std() / math.sqrt(gap.numel())
        assert predicted_parent_set(**common, max_degree=1, prior=prior) == winner
    assert predicted_parent_set(**common, max_degree=1, alpha=0.1) == (2,)


def test_a_custom_prior_trains_saves_reloads_and_probes(tmp_path):
    prior = SparseSupportPrior(2)
    run = ih.train_preset("cwa", seed=0, prior=prior, max_degree=1, steps=40, batch_size=512, eval_size=256, quiet=True)
    assert run.task.prior == prior and run.predicted_lags == (1,)
    history = run.history
    # Bayes under the sparse prior is finite and below the model's loss, so the excess loss is well defined.
    assert history["bayes_loss"].between(0, math.log(3)).all() and (history["excess_loss"] > 0).all()
    run.save(tmp_path / "run")
    loaded = TrainingRun.load(tmp_path / "run")
    assert loaded.task == run.task and loaded.task.prior == prior
    report = ih.probes.find_parents(loaded.model, loaded.task, n_sequences=256)
    assert report.predicted == (1,) and report.true_parents == (1, 2)
