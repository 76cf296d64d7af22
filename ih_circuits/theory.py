"""Which parents the selector will pick: the modified chi-square mutual information (PAPER.md §5).

For a lag set S let Z_S = (x_{t-s})_{s in S} and X = x_t under the stationary law mu of the chain. The
paper's selector converges to the subset (|S| <= D) that maximises

    I~(S) = E_pi [ sum_z mu(z)^2 ( sum_e mu(e|z)^2 / mu(e) - 1 ) ]
          = E_pi [ sum_{z,e} mu(z,e)^2 / mu(e) - sum_z mu(z)^2 ].

The ordinary chi-square mutual information weights each history by mu(z) instead of mu(z)^2:
I_chi2(S) = E_pi [ sum_{z,e} mu(z,e)^2 / (mu(z) mu(e)) - 1 ]. The squared weight penalises large subsets,
which split the context into rare histories: a superset of the true parents carries the same I_chi2 but a
lower I~. The expectation over kernels pi ~ prior is a Monte-Carlo average over ``n_kernels`` draws, and the
standard error is the standard deviation of the per-kernel values over sqrt(n_kernels). The inner sums, for one
kernel, come from one of two paths:

- ``"exact"``: enumerate the stationary law of the d^(M+1) runs of M + 1 = window + 1 tokens (a batched linear
  solve for the law of the last max(parents) tokens, extended by the kernel), then marginalise per subset. Cost
  per kernel O(d^(3 max(parents)) + 2^M d^(M+1)): instant at vocabulary 3, impossible at vocabulary 20 and
  window 5 (64 million windows per kernel).
- ``"monte_carlo"``: sample ``n_samples`` independent stationary windows per kernel, count (z_S, x_t) per subset,
  and estimate the squared probabilities by collisions (U-statistics), which are unbiased (formulas and biases in
  ``selection_scores``). Cost per kernel O(2^M n_samples log n_samples) whatever d, plus the start law.

``method="auto"`` enumerates when it is cheap (``EXACT_MAX_WORK``, ``SOLVE_MAX_STATES``) and samples otherwise,
so vocabulary-3 calls are exact. Both paths draw the same kernels from ``seed`` (the windows have their own
stream), so they differ only by the Monte Carlo path's sampling noise; the per-kernel tables on
``SelectionScores`` allow paired comparisons. Work is chunked over kernels to about ``memory.CHUNK_BYTES``; a
step too large for one kernel is refused with ``MemoryBudgetError`` before anything is allocated, and a call
``estimated_seconds`` puts above ``PROGRESS_SECONDS`` shows a progress bar over the kernels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import einops
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ih_circuits.chain import burned_in_law, digit_table, stationary_window_law, validate_lags, window_law_bytes
from ih_circuits.checks import check_int
from ih_circuits.memory import check_memory, items_per_chunk
from ih_circuits.predictors import candidate_parent_sets
from ih_circuits.priors import DirichletPrior, KernelPrior
from ih_circuits.seeds import make_generator
from ih_circuits.task import SAMPLING_BYTES_PER_ENTRY, NGramTask

__all__ = [
    "Prediction",
    "SelectionScores",
    "modified_chi2_mi",
    "predicted_parent_set",
    "selection_scores",
    "stationary_window_law",
    "task_prediction",
]

METHODS = ("auto", "exact", "monte_carlo")
# "auto" enumerates when the per-kernel work, (number of subsets) x d^(window+1) windows, is at most this (vocabulary
# 20 at window 3: 8 x 160000; vocabulary 10 at window 4: 16 x 10^5; vocabulary 3 up to window 7) ...
EXACT_MAX_WORK = 2**22
# ... and the stationary law of runs of max(parents) tokens has at most this many states (vocabulary 22 at order 2).
# Its batched solve costs O(states^3): about 5-10 ms per kernel at 400 states and 0.6 s at 2500 on 2 cores. Monte
# Carlo above it starts from a burn-in of the law instead (chain.burned_in_law): each kernel iterates until a step
# moves its law by less than BURN_IN_TOLERANCE in L1, at most BURN_IN_MAX_STEPS steps (at alpha = 0.1 every kernel
# settles within about 40 steps at vocabulary 50 and 300 at vocabulary 20).
SOLVE_MAX_STATES = 512
BURN_IN_TOLERANCE = 1e-10
BURN_IN_MAX_STEPS = 2000
# Monte Carlo defaults: 10^7 sampled windows in all, about 12 s on 2 cores at vocabulary 20 / window 5 or vocabulary
# 50 / window 3 (2000 kernels x 10^4 windows takes 30-40 s there). Fewer kernels than exact, more windows each: the
# within-kernel noise is part of the standard error, and dominates it at vocabulary 50.
DEFAULT_KERNELS = {"exact": 2000, "monte_carlo": 500}
DEFAULT_SAMPLES = 20_000
# Seconds per kernel, for the estimate that decides whether to show a progress bar (measured on 2 cores): exact
# enumeration about 1.2 ns per (subset, window) pair plus the O(states^3) solve (0.4 s at 2500 states); Monte Carlo
# about 40 ns per (subset, sampled window) plus the start law (the solve, or about 100 burn-in steps over
# d^(order+1) entries).
EXACT_SECONDS_PER_PAIR, SOLVE_SECONDS_PER_CUBED_STATE = 1.2e-9, 4e-11
MONTE_CARLO_SECONDS_PER_PAIR, BURN_IN_SECONDS_PER_ENTRY = 4e-8, 2e-7
PROGRESS_SECONDS = 3.0
# An explicit method="exact" estimated above this is refused, pointing to Monte Carlo or fewer kernels.
EXACT_MAX_SECONDS = 600.0
# A lag set whose I~ is below the best's by less than this many standard errors of the paired difference (over the
# same kernels) is tied with it: the kernel draws cannot tell the two apart.
TIE_STANDARD_ERRORS = 3.0
# The prediction behind training, probes and sweeps (task_prediction): a function of the task, the degree and the
# window only, so every seed of a sweep cell gets the same one.
PREDICTION_KERNELS, PREDICTION_SEED = 1000, 0
# Kernels are drawn in blocks of about this many entries (a constant, so the draws never depend on the memory
# settings; 2000 vocabulary-3 kernels are one block, so the exact numbers are those of one batched draw).
KERNEL_BLOCK_ENTRIES = 2**20


@dataclass(frozen=True)
class Prediction:
    """The theory's prediction within a selector's degree D, with its uncertainty over the kernel draws.

    The best set is argmax_{|S| <= D} I~(S). Another set S is **tied** with it when the mean of the paired
    differences I~_k(best) - I~_k(S) over the kernels k is below ``TIE_STANDARD_ERRORS`` standard errors of that
    mean (std_k / sqrt(n_kernels)): the draws cannot tell which is larger.

    Attributes:
        lags: the best set, then every set tied with it (by decreasing I~); one set when the prediction is
            decisive.
        margin: I~(best) - I~(runner-up), the runner-up being the best other set within the degree (NaN when the
            degree allows one set only).
        margin_stderr: the paired standard error of ``margin``.
        max_degree: D.
    """

    lags: tuple[tuple[int, ...], ...]
    margin: float
    margin_stderr: float
    max_degree: int

    @property
    def best(self) -> tuple[int, ...]:
        """The set with the largest I~ (the smallest such set on an exact tie)."""
        return self.lags[0]

    @property
    def decisive(self) -> bool:
        """Whether no other set is tied with the best."""
        return len(self.lags) == 1

    def text(self) -> str:
        """The tied sets as sweeps record them: ``"1,2"``, or ``"1,2;2,3"`` for a tie (``""`` the empty set)."""
        return ";".join(",".join(str(lag) for lag in lags) for lags in self.lags)


@dataclass
class SelectionScores:
    """Estimates for each candidate lag set, averaged over kernels drawn from the prior.

    Attributes:
        modified: I~(S), mean over kernels (the selector's objective).
        chi2: the ordinary chi-square mutual information I_chi2(S).
        modified_stderr: standard error of each I~(S): the spread of the per-kernel values over
            sqrt(n_kernels), so it holds the kernel-to-kernel variance and any within-kernel sampling noise.
        n_kernels: number of kernels averaged.
        chi2_stderr: the same standard error for I_chi2(S).
        method: ``"exact"`` (enumerated stationary laws) or ``"monte_carlo"`` (sampled windows).
        n_samples: sampled windows per kernel for ``"monte_carlo"``; None for ``"exact"``.
        modified_per_kernel: ``[subset, kernel]`` per-kernel I~ (rows in the order of ``modified``'s keys), for
            paired comparisons: the difference of two subsets over the same kernels has a much smaller standard
            error than either score.
        chi2_per_kernel: the same for I_chi2.
    """

    modified: dict[tuple[int, ...], float]
    chi2: dict[tuple[int, ...], float]
    modified_stderr: dict[tuple[int, ...], float]
    n_kernels: int
    chi2_stderr: dict[tuple[int, ...], float]
    method: str
    n_samples: int | None
    modified_per_kernel: Float[Tensor, "subset kernel"] = field(repr=False)
    chi2_per_kernel: Float[Tensor, "subset kernel"] = field(repr=False)

    def best(self, max_degree: int | None = None) -> tuple[int, ...]:
        """argmax_S I~(S) over the candidates with at most ``max_degree`` lags (>= 0; None: any size)."""
        if max_degree is not None:
            check_int(max_degree, "max_degree", 0)
        allowed = {s: v for s, v in self.modified.items() if max_degree is None or len(s) <= max_degree}
        return max(allowed, key=lambda s: (allowed[s], -len(s)))

    def prediction(self, max_degree: int) -> Prediction:
        """The best set within ``max_degree`` lags and every set tied with it (``Prediction``)."""
        best = self.best(max_degree)
        index = {s: i for i, s in enumerate(self.modified)}
        others = [s for s in self.modified if len(s) <= max_degree and s != best]
        if not others:
            return Prediction((best,), float("nan"), float("nan"), max_degree)
        differences = self.modified_per_kernel[index[best]] - self.modified_per_kernel[[index[s] for s in others]]
        means = differences.mean(-1)
        stderrs = differences.std(-1) / self.n_kernels**0.5
        bars = zip(others, means.tolist(), stderrs.tolist(), strict=True)
        tied = [s for s, mean, stderr in bars if mean <= TIE_STANDARD_ERRORS * stderr]
        runner_up = int(means.argmin())
        ranked = sorted(tied, key=lambda s: (-self.modified[s], len(s)))
        return Prediction((best, *ranked), float(means[runner_up]), float(stderrs[runner_up]), max_degree)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per candidate lag set, in candidate order: ``lags`` (a tuple, () for the empty set), ``size``,
        ``modified``, ``modified_stderr``, ``chi2``, ``chi2_stderr``.

        >>> scores = selection_scores(3, (1,), 0.1, n_kernels=20, window=2)
        >>> scores.to_dataframe()["lags"].tolist()
        [(), (1,), (2,), (1, 2)]
        """
        subsets = list(self.modified)
        return pd.DataFrame(
            {
                "lags": pd.Series(subsets, dtype=object),
                "size": [len(s) for s in subsets],
                "modified": [self.modified[s] for s in subsets],
                "modified_stderr": [self.modified_stderr[s] for s in subsets],
                "chi2": [self.chi2[s] for s in subsets],
                "chi2_stderr": [self.chi2_stderr[s] for s in subsets],
            }
        )


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


def _exact_bytes_per_kernel(d_vocab: int, order: int, window: int) -> int:
    """The stationary window law and, per subset, the joint and its marginals (float64)."""
    return window_law_bytes(d_vocab, order, window + 1) + 8 * 8 * d_vocab ** (window + 1)


def _exact_tables(
    kernels: Float[Tensor, "kernel history d_vocab"],
    parents: tuple[int, ...],
    d_vocab: int,
    window: int,
    candidates: list[tuple[int, ...]],
    out: tuple[Float[Tensor, "subset kernel"], Float[Tensor, "subset kernel"]],
) -> None:
    """Write per-kernel I~(S) and I_chi2(S) into ``out``, from the enumerated stationary law of window + 1 tokens."""
    per_modified, per_chi2 = out
    n_kernels = kernels.shape[0]
    chunk = items_per_chunk(n_kernels, _exact_bytes_per_kernel(d_vocab, max(parents, default=0), window))
    for start in range(0, n_kernels, chunk):
        law = stationary_window_law(kernels[start : start + chunk], parents, d_vocab, window + 1)
        joint = _window_joint(law, d_vocab, window)
        for index, subset in enumerate(candidates):
            mu_ze = _subset_joint(joint, subset, window)
            mu_z = mu_ze.sum(-1)
            mu_e = mu_ze.sum(-2)
            ratio = mu_ze.square() / mu_e[:, None, :].clamp_min(1e-300)
            per_modified[index, start : start + chunk] = ratio.sum((-1, -2)) - mu_z.square().sum(-1)
            per_chi2[index, start : start + chunk] = (ratio / mu_z[..., None].clamp_min(1e-300)).sum((-1, -2)) - 1.0


def _start_law_bytes(d_vocab: int, order: int) -> int:
    """Working memory per kernel of the start law: the exact solve, or the burn-in (the kernel rows of every run,
    their product with the law and a copy; law, step and a copy)."""
    if d_vocab**order <= SOLVE_MAX_STATES:
        return window_law_bytes(d_vocab, order, order)
    return 8 * (3 * d_vocab ** (order + 1) + 3 * d_vocab**order)


def _monte_carlo_bytes_per_kernel(d_vocab: int, order: int, window: int, n_parent_rows: int, n_samples: int) -> int:
    """Start law, kernel cumulative sums, and per sampled window: its int32 tokens, float64 uniforms, the kernel
    row it reads (float64) and the comparison (bool), and about 14 int64/float64 words of row codes and counting
    temporaries (codes, sort values and indices, runs and counts, inverse, weights)."""
    per_window = 4 * (window + 1) + 8 * (window + 2) + 9 * d_vocab + 8 * 14
    return _start_law_bytes(d_vocab, order) + 16 * n_parent_rows * d_vocab + per_window * n_samples


def _start_law(
    kernels: Float[Tensor, "kernel history d_vocab"], parents: tuple[int, ...], d_vocab: int
) -> Float[Tensor, "kernel state"]:
    """Law of the last r = max(parents) tokens the sampled windows start from: stationary (exact solve) up to
    ``SOLVE_MAX_STATES`` states, else after a burn-in of the law (``chain.burned_in_law``)."""
    order = max(parents, default=0)
    if order == 0:
        return torch.ones(kernels.shape[0], 1, dtype=torch.float64)
    if d_vocab**order <= SOLVE_MAX_STATES:
        return stationary_window_law(kernels, parents, d_vocab, order)
    return burned_in_law(kernels, parents, d_vocab, BURN_IN_TOLERANCE, BURN_IN_MAX_STEPS)


def _sample_windows(
    kernels: Float[Tensor, "kernel history d_vocab"],
    start_law: Float[Tensor, "kernel state"],
    parents: tuple[int, ...],
    d_vocab: int,
    window: int,
    n_samples: int,
    generator: torch.Generator,
) -> Int[Tensor, "window kernel sample"]:
    """``n_samples`` independent runs of window + 1 tokens per kernel (oldest first): the first r = max(parents)
    tokens from ``start_law``, the rest rolled forward by inverse-CDF draws from the kernel rows.

    The uniforms are drawn as one ``[kernel, sample, draw]`` block, so a chunk of kernels consumes the stream
    exactly as its slice of the whole batch would.
    """
    n_kernels, n_rows = kernels.shape[0], kernels.shape[1]
    order = max(parents, default=0)
    n_draws = (1 if order else 0) + window + 1 - order
    uniforms = torch.rand(n_kernels, n_samples, n_draws, generator=generator, dtype=torch.float64)
    tokens = torch.empty(window + 1, n_kernels, n_samples, dtype=torch.int32)
    if order:
        state = torch.searchsorted(start_law.cumsum(-1), uniforms[..., 0].contiguous())
        digits = digit_table(order, d_vocab)[state.clamp_max(start_law.shape[1] - 1)]
        tokens[:order] = einops.rearrange(digits, "kernel sample pos -> pos kernel sample")
    cuts = einops.rearrange(kernels.cumsum(-1)[..., :-1], "kernel history cut -> (kernel history) cut")
    row_base = torch.arange(n_kernels)[:, None] * n_rows
    for draw, t in enumerate(range(order, window + 1), start=n_draws - (window + 1 - order)):
        rows = row_base.expand(n_kernels, n_samples).clone()
        for i, lag in enumerate(parents):
            rows.add_(tokens[t - lag], alpha=d_vocab ** (len(parents) - 1 - i))
        tokens[t] = (uniforms[..., draw, None] > cuts[rows]).sum(-1)
    return tokens


def _collision_sums(
    tokens: Int[Tensor, "window kernel sample"],
    subset: tuple[int, ...],
    inverse_mu_e: Float[Tensor, "kernel d_vocab"],
) -> tuple[Float[Tensor, " kernel"], Float[Tensor, " kernel"], Float[Tensor, " kernel"]]:
    """From the counts n(z,e) of (z_S, x_t) in each kernel's windows: sum_{z,e} n(z,e)(n(z,e)-1)/mu(e),
    sum_z n(z)(n(z)-1), and sum over z with n(z) >= 2 of sum_e n(z,e)(n(z,e)-1)/((n(z)-1) mu(e)) - n(z).

    A window's key is (kernel, z, e) in base d (int32 when the [kernel, d^(|S|+1)] table fits, else int64).
    Counts by ``bincount`` when that table is no larger than the windows, else by sorting the keys and taking
    run lengths; both give the nonzero cells in increasing key order.
    """
    window, n_kernels, n_samples = tokens.shape[0] - 1, tokens.shape[1], tokens.shape[2]
    d_vocab = inverse_mu_e.shape[1]
    cells = d_vocab ** (len(subset) + 1)
    dtype = torch.int32 if n_kernels * cells < 2**31 else torch.int64
    codes = torch.arange(n_kernels, dtype=dtype)[:, None].expand(n_kernels, n_samples)
    for lag in (*subset, 0):
        codes = codes * d_vocab + tokens[window - lag]
    if cells <= n_samples:
        table = torch.bincount(codes.flatten(), minlength=n_kernels * cells)
        keys = table.nonzero().squeeze(-1)
        n_ze = table[keys]
    else:
        keys, n_ze = torch.unique_consecutive(torch.sort(codes.flatten()).values, return_counts=True)
    n_ze = n_ze.double()
    kernel_of_ze = keys // cells
    weighted = n_ze * (n_ze - 1.0) * inverse_mu_e[kernel_of_ze, keys % d_vocab]
    z_keys, z_of_ze = torch.unique_consecutive(keys // d_vocab, return_inverse=True)
    n_z = torch.zeros(z_keys.shape[0], dtype=torch.float64).index_add_(0, z_of_ze, n_ze)
    weighted_z = torch.zeros_like(n_z).index_add_(0, z_of_ze, weighted)
    kernel_of_z = z_keys // (cells // d_vocab)
    per_history = torch.where(n_z >= 2, weighted_z / (n_z - 1.0).clamp_min(1.0) - n_z, 0.0)
    sums = torch.zeros(3, n_kernels, dtype=torch.float64)
    sums[0].index_add_(0, kernel_of_ze, weighted)
    sums[1].index_add_(0, kernel_of_z, n_z * (n_z - 1.0))
    sums[2].index_add_(0, kernel_of_z, per_history)
    return sums[0], sums[1], sums[2]


def _monte_carlo_tables(
    kernels: Float[Tensor, "kernel history d_vocab"],
    parents: tuple[int, ...],
    d_vocab: int,
    window: int,
    candidates: list[tuple[int, ...]],
    out: tuple[Float[Tensor, "subset kernel"], Float[Tensor, "subset kernel"]],
    n_samples: int,
    generator: torch.Generator,
) -> None:
    """Write per-kernel collision estimates of I~(S) and I_chi2(S) into ``out``, from ``n_samples`` sampled windows
    per kernel (formulas in ``selection_scores``)."""
    per_modified, per_chi2 = out
    n_kernels, order = kernels.shape[0], max(parents, default=0)
    pairs = n_samples * (n_samples - 1.0)
    chunk = items_per_chunk(
        n_kernels, _monte_carlo_bytes_per_kernel(d_vocab, order, window, kernels.shape[1], n_samples)
    )
    # Counting keys (kernel, z, e) must fit in int64: chunk x d^(|S|+1) < 2^63.
    chunk = min(chunk, max(1, 2**62 // d_vocab ** (max(map(len, candidates), default=0) + 1)))
    for start in range(0, n_kernels, chunk):
        part = kernels[start : start + chunk].double()
        law = _start_law(part, parents, d_vocab)
        # mu(e): the last token's marginal of the start law (for order 0, the single kernel row).
        mu_e = einops.reduce(law, "kernel (rest e) -> kernel e", "sum", e=d_vocab) if order else part[:, 0]
        inverse_mu_e = 1.0 / mu_e.clamp_min(1e-300)
        tokens = _sample_windows(part, law, parents, d_vocab, window, n_samples, generator)
        for index, subset in enumerate(candidates):
            pairs_ze, pairs_z, chi2 = _collision_sums(tokens, subset, inverse_mu_e)
            per_modified[index, start : start + chunk] = (pairs_ze - pairs_z) / pairs
            per_chi2[index, start : start + chunk] = chi2 / n_samples


def _kernel_blocks(
    prior: KernelPrior, n_kernels: int, n_rows: int, d_vocab: int, generator: torch.Generator
) -> Iterator[tuple[int, Float[Tensor, "kernel history d_vocab"]]]:
    """(first index, kernels) in blocks of about ``KERNEL_BLOCK_ENTRIES`` entries, drawn in order from ``generator``."""
    block = max(1, KERNEL_BLOCK_ENTRIES // (n_rows * d_vocab))
    for start in range(0, n_kernels, block):
        yield start, prior.sample_rows(min(block, n_kernels - start), n_rows, d_vocab, generator, torch.float64)


def estimated_seconds(
    method: str, d_vocab: int, order: int, window: int, n_subsets: int, n_kernels: int, n_samples: int | None
) -> float:
    """Rough wall time of ``selection_scores`` on 2 CPU cores (the constants above), for the progress bar."""
    states = d_vocab**order if order else 0
    if method == "exact" or states <= SOLVE_MAX_STATES:
        start = SOLVE_SECONDS_PER_CUBED_STATE * states**3
    else:
        start = BURN_IN_SECONDS_PER_ENTRY * states * d_vocab
    if method == "exact":
        return n_kernels * (start + EXACT_SECONDS_PER_PAIR * n_subsets * d_vocab ** (window + 1))
    return n_kernels * (start + MONTE_CARLO_SECONDS_PER_PAIR * n_subsets * (n_samples or DEFAULT_SAMPLES))


def _sampling_generator(seed: int | None) -> torch.Generator:
    """The Monte Carlo windows' own stream, derived from ``seed`` (the kernels keep ``make_generator(seed)``)."""
    if seed is None:
        return make_generator(None)
    digest = hashlib.sha256(f"{seed}:theory:monte_carlo".encode()).digest()
    return make_generator(int.from_bytes(digest[:8], "little") >> 1)


def _check_method(method: str, n_samples: int | None) -> None:
    """Raise ``ValueError`` naming ``method`` or ``n_samples`` unless they are allowed."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(repr(m) for m in METHODS)}; got {method!r}")
    if n_samples is None:
        return
    check_int(n_samples, "n_samples (None, or pairs of windows are counted)", 2)
    if method == "exact":
        raise ValueError(f"n_samples applies to method='monte_carlo' or 'auto', not 'exact'; got n_samples={n_samples}")


def _resolve_method(method: str, vocab_size: int, order: int, window: int, n_subsets: int) -> str:
    """``"auto"`` -> exact when n_subsets x d^(window+1) <= EXACT_MAX_WORK and d^order <= SOLVE_MAX_STATES."""
    if method != "auto":
        return method
    cheap = n_subsets * vocab_size ** (window + 1) <= EXACT_MAX_WORK and vocab_size**order <= SOLVE_MAX_STATES
    return "exact" if cheap else "monte_carlo"


def selection_scores(
    vocab_size: int,
    parents: Sequence[int],
    alpha: float = 0.1,
    subsets: Sequence[Sequence[int]] | None = None,
    n_kernels: int | None = None,
    seed: int = 0,
    window: int | None = None,
    *,
    prior: KernelPrior | None = None,
    method: str = "auto",
    n_samples: int | None = None,
    quiet: bool = False,
) -> SelectionScores:
    """I~(S) and I_chi2(S) for every candidate subset, with standard errors over the kernel draws.

    Kernels pi_1..pi_K come from the prior, drawn from ``make_generator(seed)`` in blocks of
    ``KERNEL_BLOCK_ENTRIES`` entries, identically for both methods. Each kernel's I~_k(S) and I_chi2_k(S) fill a
    [subset, kernel] table; the scores are its means over kernels and the standard errors its standard deviations
    over sqrt(K), so they hold the kernel-to-kernel variance and, for Monte Carlo, the sampling noise.

    ``"exact"`` takes mu from the enumerated stationary law of window + 1 tokens. ``"monte_carlo"`` draws
    N = ``n_samples`` windows per kernel (from a stream derived from ``seed``), each from its own chain: the first
    r = max(parents) tokens from the law of r consecutive tokens, the other window + 1 - r rolled forward by the
    kernel. That law is the exact stationary one when it has at most ``SOLVE_MAX_STATES`` states, else the law
    after a burn-in by power iteration from the uniform law (``chain.burned_in_law``: until a step moves it by
    less than ``BURN_IN_TOLERANCE``, at most ``BURN_IN_MAX_STEPS`` steps; the iteration costs d^(r+1) per step
    against d^(3r) for the solve, and a convergence test per kernel, which a sampled burn-in would not give).
    Positions of one chain are never pooled, so the windows are independent and there is no autocorrelation
    bias. With n(z,e) the number of windows with history z at lags S and current token e, n(z) = sum_e n(z,e),
    and mu(e) the last-token marginal of the start law:

        I~_k(S)     = [ sum_{z,e} n(z,e)(n(z,e)-1) / mu(e) - sum_z n(z)(n(z)-1) ] / (N(N-1)),
        I_chi2_k(S) = (1/N) sum_{z: n(z)>=2} n(z) [ sum_e n(z,e)(n(z,e)-1) / (n(z)(n(z)-1) mu(e)) - 1 ].

    For independent windows E[n(z,e)(n(z,e)-1)] = N(N-1) mu(z,e)^2, so I~_k is unbiased (plug-in squares
    n^2/N^2 would add (d - 1 - I~_k)/N). Given n(z), the bracket of I_chi2_k is unbiased for sum_e mu(e|z)^2/mu(e) - 1;
    histories seen fewer than twice contribute 0, which biases I_chi2_k down by sum_z mu(z)(1 - mu(z))^(N-1)
    (sum_e mu(e|z)^2/mu(e) - 1), the chi-square mass of histories rarer than about 1/N: small for the parents,
    large for big subsets at large d (a superset of the parents then shows a lower I_chi2, not an equal one).
    After a burn-in both estimators are unbiased for the burned-in law, off the stationary one by about
    ``BURN_IN_TOLERANCE`` x the mixing time.

    Args:
        vocab_size: d >= 2.
        parents: true parent lags of the chain.
        alpha: Dirichlet concentration of the kernel rows (ignored when ``prior`` is given).
        subsets: candidate lag sets inside 1..window; default every set of at most ``window`` lags (2^window).
        n_kernels: kernels drawn from the prior (the standard error shrinks as 1/sqrt(n_kernels)); default
            ``DEFAULT_KERNELS[method]``: 2000 for exact, 500 for Monte Carlo.
        seed: seeds the kernel draws and, separately, the sampled windows.
        window: M, the largest lag considered; default max(parents).
        prior: a ``KernelPrior``; defaults to ``DirichletPrior(alpha)``.
        method: ``"exact"``, ``"monte_carlo"`` or ``"auto"``: exact when the per-kernel work, (number of subsets)
            x d^(window+1), is at most ``EXACT_MAX_WORK`` = 2^22 and d^max(parents) <= ``SOLVE_MAX_STATES`` = 512,
            else Monte Carlo.
        n_samples: sampled windows per kernel for Monte Carlo, >= 2 (default ``DEFAULT_SAMPLES`` = 20000); not
            allowed with ``method="exact"``, unused when ``"auto"`` enumerates.
        quiet: no progress bar (one is shown when ``estimated_seconds`` exceeds ``PROGRESS_SECONDS``).

    Returns:
        ``SelectionScores``: means, standard errors, per-kernel tables and the method used.

    >>> scores = selection_scores(3, (1,), 0.1, n_kernels=50, window=2, method="monte_carlo", n_samples=2000)
    >>> scores.method, scores.n_samples, scores.best(max_degree=1)
    ('monte_carlo', 2000, (1,))
    """
    check_int(vocab_size, "vocab_size", 2)
    parents = validate_lags(parents)
    window = max(parents, default=1) if window is None else window
    check_int(window, "window", max(parents, default=1), low_text=f"max(parents) = {max(parents, default=1)}")
    _check_method(method, n_samples)
    if n_kernels is not None:
        check_int(n_kernels, "n_kernels (or None)", 2)
    candidates = candidate_parent_sets(window) if subsets is None else [validate_lags(s, "subsets") for s in subsets]
    for subset in candidates:
        if subset and max(subset) > window:
            raise ValueError(f"subsets must lie inside 1..window={window}; got {subset}")
    prior = DirichletPrior(alpha) if prior is None else prior
    kernel_stream = make_generator(seed)
    order, n_rows = max(parents, default=0), vocab_size ** len(parents)
    method = _resolve_method(method, vocab_size, order, window, len(candidates))
    n_kernels = DEFAULT_KERNELS[method] if n_kernels is None else n_kernels
    block = min(n_kernels, max(1, KERNEL_BLOCK_ENTRIES // (n_rows * vocab_size)))
    check_memory(
        2 * SAMPLING_BYTES_PER_ENTRY * block * n_rows * vocab_size + 2 * 8 * len(candidates) * n_kernels,
        f"drawing kernels of {n_rows} rows x {vocab_size} tokens in blocks of {block}, and the [subset, kernel] "
        f"tables of {len(candidates)} x {n_kernels}",
        "vocab_size, the number of parents or n_kernels",
    )
    if method == "exact":
        n_samples = None
        histories = vocab_size ** (window + 1)
        check_memory(
            _exact_bytes_per_kernel(vocab_size, order, window),
            f"the selection theory's exact enumeration of {vocab_size}^{window + 1} = {histories} windows per kernel",
            "vocab_size or window",
        )
    else:
        if vocab_size ** (max(map(len, candidates), default=0) + 1) > 2**62:
            raise ValueError(
                f"subsets: Monte Carlo counts (z_S, x_t) by 64-bit keys, and vocab_size={vocab_size} with "
                f"{max(map(len, candidates))} lags has too many; lower window, the subset sizes or vocab_size"
            )
        n_samples = DEFAULT_SAMPLES if n_samples is None else n_samples
        check_memory(
            _monte_carlo_bytes_per_kernel(vocab_size, order, window, n_rows, n_samples),
            f"the selection theory's Monte Carlo over {n_samples} windows of {window + 1} tokens per kernel "
            f"(vocabulary {vocab_size}, start law over {vocab_size}^{order} runs)",
            "n_samples, vocab_size or window",
        )
    # One preallocated [subset, kernel] table each: small results kept between large temporaries fragment the heap.
    per_modified = torch.empty(len(candidates), n_kernels, dtype=torch.float64)
    per_chi2 = torch.empty_like(per_modified)
    from tqdm.auto import tqdm

    seconds = estimated_seconds(method, vocab_size, order, window, len(candidates), n_kernels, n_samples)
    if method == "exact" and seconds > EXACT_MAX_SECONDS:
        per_kernel = seconds / n_kernels
        raise ValueError(
            f"method='exact' at vocab_size={vocab_size} (a {vocab_size}^{order}-state stationary solve and "
            f"{vocab_size}^{window + 1} windows per kernel) would take about {seconds / 60:.0f} min for {n_kernels} "
            f"kernels on 2 cores; use method='monte_carlo' (or 'auto'), or n_kernels <= "
            f"{int(EXACT_MAX_SECONDS / per_kernel)}"
        )
    sampling = _sampling_generator(seed) if method == "monte_carlo" else None
    progress = tqdm(
        total=n_kernels, desc=f"theory ({method})", unit="kernel", disable=quiet or seconds < PROGRESS_SECONDS
    )
    with progress:
        for start, kernels in _kernel_blocks(prior, n_kernels, n_rows, vocab_size, kernel_stream):
            out = (per_modified[:, start : start + len(kernels)], per_chi2[:, start : start + len(kernels)])
            if sampling is None:
                _exact_tables(kernels, parents, vocab_size, window, candidates, out)
            else:
                _monte_carlo_tables(kernels, parents, vocab_size, window, candidates, out, n_samples, sampling)
            progress.update(len(kernels))
    return SelectionScores(
        modified=dict(zip(candidates, per_modified.mean(-1).tolist(), strict=True)),
        chi2=dict(zip(candidates, per_chi2.mean(-1).tolist(), strict=True)),
        modified_stderr=dict(zip(candidates, (per_modified.std(-1) / n_kernels**0.5).tolist(), strict=True)),
        n_kernels=n_kernels,
        chi2_stderr=dict(zip(candidates, (per_chi2.std(-1) / n_kernels**0.5).tolist(), strict=True)),
        method=method,
        n_samples=n_samples,
        modified_per_kernel=per_modified,
        chi2_per_kernel=per_chi2,
    )


def modified_chi2_mi(
    vocab_size: int,
    parents: Sequence[int],
    alpha: float = 0.1,
    subsets: Sequence[Sequence[int]] | None = None,
    n_kernels: int | None = None,
    seed: int = 0,
    window: int | None = None,
    *,
    prior: KernelPrior | None = None,
    method: str = "auto",
    n_samples: int | None = None,
) -> dict[tuple[int, ...], float]:
    """I~(S) for each candidate lag set (PAPER.md §5), keyed by the sorted tuple of lags.

    I~(S) = E_pi [ sum_z mu(z)^2 ( sum_e mu(e|z)^2 / mu(e) - 1 ) ] under the stationary law mu, averaged over
    kernels from the prior (``prior``, or Dirichlet(``alpha``) when None); ``method`` and ``n_samples`` as in
    ``selection_scores``, which returns the same numbers with the ordinary chi-square MI and standard errors.

    >>> scores = modified_chi2_mi(vocab_size=3, parents=(1, 2), alpha=0.1, n_kernels=200, window=3)
    >>> max(scores, key=scores.get)
    (1, 2)
    """
    return selection_scores(
        vocab_size, parents, alpha, subsets, n_kernels, seed, window, prior=prior, method=method, n_samples=n_samples
    ).modified


def task_prediction(task: NGramTask, max_degree: int, window: int | None = None, *, quiet: bool = False) -> Prediction:
    """The theory's prediction for ``task`` and a selector of degree ``max_degree`` that sees lags 1..window (at
    least the task's order): ``PREDICTION_KERNELS`` kernels from the task's prior, always seeded with
    ``PREDICTION_SEED``, method ``"auto"``. Training (``TrainingRun.predicted_lags``, the best set), the probes'
    comparison with the theory and the sweeps' ``predicted_lags`` all come from here.

    >>> from ih_circuits.task import NGramTask
    >>> task_prediction(NGramTask(vocab_size=3, parents=(1, 2), seq_len=20), max_degree=2, window=3).text()
    '1,2'
    """
    check_int(max_degree, "max_degree", 0)
    window = max(task.order, 1 if window is None else check_int(window, "window", 1))
    kernels = {"prior": task.prior, "n_kernels": PREDICTION_KERNELS, "seed": PREDICTION_SEED}
    return selection_scores(task.vocab_size, task.parents, window=window, quiet=quiet, **kernels).prediction(max_degree)


def predicted_parent_set(
    vocab_size: int,
    parents: Sequence[int],
    alpha: float = 0.1,
    window: int | None = None,
    max_degree: int = 2,
    n_kernels: int | None = None,
    seed: int = 0,
    *,
    prior: KernelPrior | None = None,
    method: str = "auto",
    n_samples: int | None = None,
) -> tuple[int, ...]:
    """The lag set the theory says the selector converges to: argmax of I~(S) over |S| <= max_degree.

    Kernels come from ``prior`` (Dirichlet(``alpha``) when None); ``method`` and ``n_samples`` as in
    ``selection_scores``.

    >>> predicted_parent_set(vocab_size=3, parents=(1, 2), alpha=0.1, window=3, max_degree=2, n_kernels=200)
    (1, 2)
    """
    check_int(max_degree, "max_degree", 0)
    return selection_scores(
        vocab_size, parents, alpha, None, n_kernels, seed, window, prior=prior, method=method, n_samples=n_samples
    ).best(max_degree)
