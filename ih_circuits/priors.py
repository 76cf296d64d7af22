"""Priors over transition kernels (PAPER.md §1, §6), and the registry that makes them pluggable.

A prior does three jobs (the ``KernelPrior`` protocol):

- ``sample_rows(batch, n_rows, d_vocab, generator, dtype)`` draws ``batch * n_rows`` independent kernel rows
  pi(.|z), ``[batch, n_rows, d_vocab]``, reproducibly from ``generator``: the data (``NGramTask.sample``) and the
  theory's kernels (``theory.selection_scores``) both come from here;
- ``predictive(counts)`` maps N(z, e), the counts of what followed one history, to the posterior predictive
  P(next = e | counts): the Bayes predictor (``predictors.bayes_predictive``) and the probes' baselines use it;
- ``to_dict()`` returns ``{"kind": name, **arguments}`` with JSON-native arguments, so that checkpoints record it
  and ``prior_from_dict`` rebuilds it as ``cls(**arguments)`` (lists become tuples).

``DirichletPrior`` is the paper's; ``SparseSupportPrior`` (each row uniform on a random few tokens) ships as a
second example. Register your own class with ``register_prior(name, cls)`` so that runs using it
save and load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from ih_circuits.checks import check_int, check_real


@runtime_checkable
class KernelPrior(Protocol):
    """What ``NGramTask``, the theory, the Bayes predictors and the probes need from a prior over kernel rows."""

    def sample_rows(
        self, batch: int, n_rows: int, d_vocab: int, generator: torch.Generator, dtype: torch.dtype
    ) -> Float[Tensor, "batch history d_vocab"]: ...

    def predictive(self, counts: Float[Tensor, "*rows d_vocab"]) -> Float[Tensor, "*rows d_vocab"]: ...

    def to_dict(self) -> dict[str, Any]: ...


MIN_ALPHA = 1e-30  # log(U) / alpha stays finite in float32 down to here


def log_gamma_variates(concentration: Tensor, generator: torch.Generator) -> Tensor:
    """log G with G ~ Gamma(concentration, 1), elementwise, reproducible from ``generator``.

    Uses torch's Gamma sampler (the one behind ``torch.distributions.Dirichlet``, which itself takes no
    generator) on k + 1, then the boost G_k = G_{k+1} U^(1/k) in log space, so tiny concentrations
    (alpha = 0.01) never underflow to an all-zero Dirichlet row.
    """
    boosted = torch._standard_gamma(concentration + 1.0, generator=generator)
    uniform = torch.rand(concentration.shape, generator=generator, dtype=concentration.dtype, device=generator.device)
    return torch.log(boosted) + torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)) / concentration


@dataclass(frozen=True)
class DirichletPrior:
    """Rows pi(.|z) ~ Dirichlet(alpha), independent (PAPER.md §1).

    ``alpha`` is one concentration for every token (the paper's symmetric prior) or one per token.
    Posterior predictive after counts N(z, e): (N(z, e) + alpha_e) / (N(z) + sum_e alpha_e) (PAPER.md §6).

    >>> DirichletPrior(0.5).predictive(torch.tensor([3.0, 1.0], dtype=torch.float64)).tolist()
    [0.7, 0.3]
    """

    alpha: float | tuple[float, ...] = 0.1

    def __post_init__(self) -> None:
        values = self.alpha if isinstance(self.alpha, Sequence) and not isinstance(self.alpha, str) else (self.alpha,)
        for value in values:
            # Below MIN_ALPHA the Gamma sampler overflows, and every row is one-hot already.
            check_real(value, "alpha", MIN_ALPHA)
        if isinstance(self.alpha, Sequence) and not values:
            raise ValueError("alpha must be a float or a non-empty sequence of floats, one per token; got ()")
        if isinstance(self.alpha, Sequence):
            object.__setattr__(self, "alpha", tuple(float(v) for v in self.alpha))
        else:
            object.__setattr__(self, "alpha", float(self.alpha))

    def concentration(self, d_vocab: int, dtype: torch.dtype = torch.float64, device=None) -> Float[Tensor, " d_vocab"]:
        """The vector alpha_e, e = 0..d-1."""
        if isinstance(self.alpha, tuple):
            if len(self.alpha) != d_vocab:
                raise ValueError(f"alpha has {len(self.alpha)} entries but the vocabulary has d_vocab={d_vocab}")
            return torch.tensor(self.alpha, dtype=dtype, device=device)
        return torch.full((d_vocab,), self.alpha, dtype=dtype, device=device)

    def sample_rows(
        self, batch: int, n_rows: int, d_vocab: int, generator: torch.Generator, dtype: torch.dtype
    ) -> Float[Tensor, "batch history d_vocab"]:
        """Draw ``batch * n_rows`` independent Dirichlet rows as normalised Gamma variates (in log space)."""
        alpha = self.concentration(d_vocab, dtype, generator.device)
        log_g = log_gamma_variates(alpha.expand(batch, n_rows, d_vocab).contiguous(), generator)
        weights = (log_g - log_g.amax(-1, keepdim=True)).exp()  # softmax, written out: faster over short rows
        return weights / weights.sum(-1, keepdim=True)

    def predictive(self, counts: Float[Tensor, "*rows d_vocab"]) -> Float[Tensor, "*rows d_vocab"]:
        """Posterior predictive (N(z, e) + alpha_e) / (N(z) + sum alpha)."""
        alpha = self.concentration(counts.shape[-1], counts.dtype, counts.device)
        smoothed = counts + alpha
        return smoothed / smoothed.sum(-1, keepdim=True)

    def to_dict(self) -> dict[str, Any]:
        alpha = list(self.alpha) if isinstance(self.alpha, tuple) else self.alpha
        return {"kind": "dirichlet", "alpha": alpha}


@dataclass(frozen=True)
class SparseSupportPrior:
    """Each row pi(.|z) is uniform on ``support`` distinct tokens chosen uniformly at random: a non-Dirichlet prior.

    Every next token has one of ``support`` equally likely values. Rows are independent, so the Bayes predictor is
    still per history: given the set O of tokens already seen after z (|O| = o <= k = ``support``), the support is
    uniform over the k-sets containing O, so

        P(next = e | counts) = 1/k                     if e in O,
                               (k - o) / ((d - o) k)   otherwise.

    Sparse, flat rows make the dependence of x_t on its nearest parent stronger than a Dirichlet does: with
    vocabulary 3, parents (1, 2) and one selected lag, the theory picks lag 1 under ``SparseSupportPrior(2)`` and
    lag 2 under Dirichlet(0.1) (``tests/test_priors.py``).

    >>> SparseSupportPrior(2).predictive(torch.tensor([3.0, 0.0, 0.0, 0.0], dtype=torch.float64)).tolist()
    [0.5, 0.16666666666666666, 0.16666666666666666, 0.16666666666666666]
    """

    support: int = 2

    def __post_init__(self) -> None:
        check_int(self.support, "support", 1)

    def _check_vocab(self, d_vocab: int) -> None:
        if self.support > d_vocab:
            raise ValueError(f"support must be <= d_vocab={d_vocab} (distinct tokens per row); got {self.support}")

    def sample_rows(
        self, batch: int, n_rows: int, d_vocab: int, generator: torch.Generator, dtype: torch.dtype
    ) -> Float[Tensor, "batch history d_vocab"]:
        """The ``support`` tokens of each row are the smallest of d i.i.d. uniform keys: a uniform random k-set."""
        self._check_vocab(d_vocab)
        keys = torch.rand(batch, n_rows, d_vocab, generator=generator, device=generator.device)
        rank = keys.argsort(-1).argsort(-1)
        return (rank < self.support).to(dtype) / self.support

    def predictive(self, counts: Float[Tensor, "*rows d_vocab"]) -> Float[Tensor, "*rows d_vocab"]:
        """1/k on seen tokens, (k - o) / ((d - o) k) on the others; refuses counts with more than k seen tokens."""
        d_vocab = counts.shape[-1]
        self._check_vocab(d_vocab)
        seen = (counts > 0).to(counts.dtype)
        n_seen = seen.sum(-1, keepdim=True)
        if counts.numel() and int(n_seen.max()) > self.support:
            raise ValueError(
                f"counts show {int(n_seen.max())} distinct next tokens after one history, more than support="
                f"{self.support}: these tokens were not drawn from this prior"
            )
        unseen = (self.support - n_seen) / (d_vocab - n_seen).clamp_min(1)
        return (seen + (1 - seen) * unseen) / self.support

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "sparse_support", "support": self.support}


_REGISTRY: dict[str, type] = {"dirichlet": DirichletPrior, "sparse_support": SparseSupportPrior}


def register_prior(name: str, cls: type) -> None:
    """Make ``prior_from_dict`` rebuild ``{"kind": name, **arguments}`` as ``cls(**arguments)``.

    ``cls`` must provide the three ``KernelPrior`` methods. Registering a name again with the same class is a
    no-op; taking a name already used by another class is an error.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string; got {name!r}")
    missing = [m for m in ("sample_rows", "predictive", "to_dict") if not callable(getattr(cls, m, None))]
    if not isinstance(cls, type) or missing:
        raise ValueError(f"cls must be a class with sample_rows, predictive and to_dict; {cls!r} lacks {missing}")
    if _REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"prior kind {name!r} is already registered to {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls


def registered_priors() -> Mapping[str, type]:
    """The prior kinds ``prior_from_dict`` knows, name -> class (read-only)."""
    return dict(_REGISTRY)


def prior_from_dict(data: dict[str, Any]) -> KernelPrior:
    """Inverse of ``to_dict`` for every registered prior: ``cls(**arguments)``, JSON lists turned into tuples."""
    if not isinstance(data, dict) or data.get("kind") not in _REGISTRY:
        raise ValueError(
            f"unknown prior description {data!r}; expected {{'kind': K, ...}} with K one of {sorted(_REGISTRY)} "
            "(register other priors with ih_circuits.register_prior)"
        )
    arguments = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "kind"}
    cls = _REGISTRY[data["kind"]]
    try:
        return cls(**arguments)
    except TypeError as error:
        raise ValueError(f"prior description {data!r} does not match {cls.__name__}: {error}") from None
