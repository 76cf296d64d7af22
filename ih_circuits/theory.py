"""Which parents the selector will pick: the modified chi-square mutual information (PAPER.md §5).

For a lag set S let Z_S = (x_{t-s})_{s in S} and X = x_t under the stationary law mu of the chain. The
paper's selector converges to the subset (|S| <= D) that maximises

    I~(S) = E_pi [ sum_z mu(z)^2 ( sum_e mu(e|z)^2 / mu(e) - 1 ) ]
          = E_pi [ sum_{z,e} mu(z,e)^2 / mu(e) - sum_z mu(z)^2 ].

The ordinary chi-square mutual information weights each history by mu(z) instead of mu(z)^2:
I_chi2(S) = E_pi [ sum_{z,e} mu(z,e)^2 / (mu(z) mu(e)) - 1 ]. The squared weight penalises large subsets,
which split the context into rare histories: a superset of the true parents carries the same I_chi2 but a
lower I~. The expectation over kernels pi ~ prior is a Monte-Carlo average over ``n_kernels`` draws,
computed in batches of kernels: stationary laws by batched linear solves, marginals by tensor reductions.
The working memory stays near ``memory.CHUNK_BYTES`` whatever ``n_kernels``; an enumeration too large for one
kernel is refused with ``MemoryBudgetError`` before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from ih_circuits.chain import stationary_window_law, validate_lags, window_law_bytes
from ih_circuits.memory import check_memory, items_per_chunk
from ih_circuits.predictors import candidate_parent_sets
from ih_circuits.priors import DirichletPrior, KernelPrior
from ih_circuits.task import make_generator

__all__ = [
    "SelectionScores",
    "modified_chi2_mi",
    "predicted_parent_set",
    "selection_scores",
    "stationary_window_law",
]


@dataclass
class SelectionScores:
    """Monte-Carlo estimates for each candidate lag set.

    Attributes:
        modified: I~(S), mean over kernels (the selector's objective).
        chi2: the ordinary chi-square mutual information I_chi2(S).
        modified_stderr: standard error of each I~(S) over the kernel draws.
        n_kernels: number of kernels averaged.
    """

    modified: dict[tuple[int, ...], float]
    chi2: dict[tuple[int, ...], float]
    modified_stderr: dict[tuple[int, ...], float]
    n_kernels: int

    def best(self, max_degree: int | None = None) -> tuple[int, ...]:
        """argmax_S I~(S) over the candidates with at most ``max_degree`` lags."""
        allowed = {s: v for s, v in self.modified.items() if max_degree is None or len(s) <= max_degree}
        return max(allowed, key=lambda s: (allowed[s], -len(s)))


def _window_joint(law: Float[Tensor, "kernel state"], d_vocab: int, window: int) -> Tensor:
    """View the law of (x_{t-M}, ..., x_t) as a tensor with one axis per token, oldest first."""
    return law.reshape(law.shape[0], *([d_vocab] * (window + 1)))


def _subset_joint(joint: Tensor, subset: tuple[int, ...], window: int) -> Float[Tensor, "kernel history d_vocab"]:
    """mu(z_S, e): marginal over the tokens at lags S and the current token (lag 0)."""
    keep = [window - s for s in subset] + [window]
    drop = [axis + 1 for axis in range(window + 1) if axis not in keep]
    marginal = joint.sum(dim=drop) if drop else joint
    kernels, d_vocab = joint.shape[0], joint.shape[-1]
    return marginal.reshape(kernels, d_vocab ** len(subset), d_vocab)


def selection_scores(
    vocab_size: int,
    parents: Sequence[int],
    alpha: float = 0.1,
    subsets: Sequence[Sequence[int]] | None = None,
    n_kernels: int = 2000,
    seed: int = 0,
    window: int | None = None,
    *,
    prior: KernelPrior | None = None,
) -> SelectionScores:
    """I~(S) and I_chi2(S) for every candidate subset, with Monte-Carlo standard errors.

    Args:
        vocab_size: d >= 2.
        parents: true parent lags of the chain.
        alpha: Dirichlet concentration of the kernel rows (ignored when ``prior`` is given).
        subsets: candidate lag sets inside 1..window; default every set of at most ``window`` lags.
        n_kernels: kernels drawn from the prior (the standard error shrinks as 1/sqrt(n_kernels)).
        seed: seeds the kernel draws.
        window: M, the largest lag considered; default max(parents).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer >= 2; got {vocab_size!r}")
    parents = validate_lags(parents, "parents")
    window = max(parents, default=1) if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or window < max(max(parents, default=1), 1):
        raise ValueError(f"window must be an integer >= max(parents) = {max(parents, default=1)}; got {window!r}")
    if isinstance(n_kernels, bool) or not isinstance(n_kernels, int) or n_kernels < 2:
        raise ValueError(f"n_kernels must be an integer >= 2; got {n_kernels!r}")
    candidates = candidate_parent_sets(window) if subsets is None else [validate_lags(s, "subsets") for s in subsets]
    for subset in candidates:
        if subset and max(subset) > window:
            raise ValueError(f"subsets must lie inside 1..window={window}; got {subset}")
    prior = DirichletPrior(alpha) if prior is None else prior
    n_rows, order, histories = vocab_size ** len(parents), max(parents, default=0), vocab_size ** (window + 1)
    check_memory(
        4 * 8 * n_kernels * n_rows * vocab_size,
        f"drawing {n_kernels} kernels of {n_rows} rows x {vocab_size} tokens",
        "n_kernels, vocab_size or the number of parents",
    )
    per_kernel = window_law_bytes(vocab_size, order, window + 1) + 8 * 8 * histories  # + law, joint, marginals
    check_memory(
        per_kernel,
        f"the selection theory's exact enumeration of {vocab_size}^{window + 1} = {histories} windows per kernel",
        "vocab_size or window",
    )
    generator = make_generator(seed)
    kernels = prior.sample_rows(n_kernels, n_rows, vocab_size, generator, torch.float64)
    # One preallocated [subset, kernel] table each: small results kept between large temporaries fragment the heap.
    per_modified = torch.empty(len(candidates), n_kernels, dtype=torch.float64)
    per_chi2 = torch.empty_like(per_modified)
    chunk = items_per_chunk(n_kernels, per_kernel)
    for start in range(0, n_kernels, chunk):
        law = stationary_window_law(kernels[start : start + chunk], parents, vocab_size, window + 1)
        joint = _window_joint(law, vocab_size, window)
        for index, subset in enumerate(candidates):
            mu_ze = _subset_joint(joint, subset, window)
            mu_z = mu_ze.sum(-1)
            mu_e = mu_ze.sum(-2)
            ratio = mu_ze.square() / mu_e[:, None, :].clamp_min(1e-300)
            per_modified[index, start : start + chunk] = ratio.sum((-1, -2)) - mu_z.square().sum(-1)
            per_chi2[index, start : start + chunk] = (ratio / mu_z[..., None].clamp_min(1e-300)).sum((-1, -2)) - 1.0
    modified = dict(zip(candidates, per_modified.mean(-1).tolist(), strict=True))
    stderr = dict(zip(candidates, (per_modified.std(-1) / n_kernels**0.5).tolist(), strict=True))
    chi2 = dict(zip(candidates, per_chi2.mean(-1).tolist(), strict=True))
    return SelectionScores(modified, chi2, stderr, n_kernels)


def modified_chi2_mi(
    vocab_size: int,
    parents: Sequence[int],
    alpha: float = 0.1,
    subsets: Sequence[Sequence[int]] | None = None,
    n_kernels: int = 2000,
    seed: int = 0,
    window: int | None = None,
) -> dict[tuple[int, ...], float]:
    """Monte-Carlo I~(S) for each candidate lag set (PAPER.md §5), keyed by the sorted tuple of lags.

    I~(S) = E_pi [ sum_z mu(z)^2 ( sum_e mu(e|z)^2 / mu(e) - 1 ) ] under the stationary law mu.
    ``selection_scores`` returns the same numbers with the ordinary chi-square MI and standard errors.

    >>> scores = modified_chi2_mi(vocab_size=3, parents=(1, 2), alpha=0.1, n_kernels=200, window=3)
    >>> max(scores, key=scores.get)
    (1, 2)
    """
    return selection_scores(vocab_size, parents, alpha, subsets, n_kernels, seed, window).modified


def predicted_parent_set(
    vocab_size: int,
    parents: Sequence[int],
    alpha: float = 0.1,
    window: int | None = None,
    max_degree: int = 2,
    n_kernels: int = 2000,
    seed: int = 0,
) -> tuple[int, ...]:
    """The lag set the theory says the selector converges to: argmax of I~(S) over |S| <= max_degree.

    >>> predicted_parent_set(vocab_size=3, parents=(1, 2), alpha=0.1, window=3, max_degree=2, n_kernels=200)
    (1, 2)
    """
    if isinstance(max_degree, bool) or not isinstance(max_degree, int) or max_degree < 0:
        raise ValueError(f"max_degree must be an integer >= 0; got {max_degree!r}")
    return selection_scores(vocab_size, parents, alpha, None, n_kernels, seed, window).best(max_degree)
