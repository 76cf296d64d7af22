"""Priors over transition kernels (PAPER.md §1, §6).

A prior is a small object with two jobs: draw kernel rows ``pi(.|z)`` (``sample_rows``) and give the
posterior predictive of the next token from the counts of what followed a history (``predictive``).
``DirichletPrior`` is the paper's; any object with the same three methods (``KernelPrior``) plugs into
``NGramTask`` and the Bayes predictors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor


@runtime_checkable
class KernelPrior(Protocol):
    """What ``NGramTask`` and the Bayes predictors need from a prior over kernel rows."""

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
        values = self.alpha if isinstance(self.alpha, Sequence) else (self.alpha,)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= MIN_ALPHA:
                raise ValueError(
                    f"alpha must be >= {MIN_ALPHA} (a float or one float per token; below that the Gamma sampler "
                    f"overflows, and every row is one-hot already); got {self.alpha!r}"
                )
            if value == float("inf"):
                raise ValueError(f"alpha must be finite; got {self.alpha!r}")
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


def prior_from_dict(data: dict[str, Any]) -> DirichletPrior:
    """Inverse of ``DirichletPrior.to_dict``."""
    if data.get("kind") != "dirichlet" or set(data) != {"kind", "alpha"}:
        raise ValueError(f"unknown prior description {data!r}; expected {{'kind': 'dirichlet', 'alpha': ...}}")
    alpha = data["alpha"]
    return DirichletPrior(tuple(alpha) if isinstance(alpha, list) else alpha)
