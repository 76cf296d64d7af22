"""The in-context n-gram task of PAPER.md §1: every sequence has its own parent-set Markov kernel.

For each sequence a kernel pi is drawn from the prior (one row pi(.|z) per parent history z), the first
max(pa) tokens are uniform (or drawn from the chain's stationary law), and afterwards
x_t ~ pi(. | x_{t-s}, s in pa). ``seq_len`` counts every token, the final target included: the paper's
T = 100 context tokens plus the target x_{T+1} is ``seq_len=101``.

Sampling is vectorised over the batch with a single loop over positions (a Markov chain must be rolled
forward), and all random numbers are drawn up front from one generator, so a seed fixes the tokens on
every device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ih_circuits.chain import digit_table, stationary_window_law, validate_lags
from ih_circuits.checkpoint import check_fields
from ih_circuits.checks import check_device, check_int, check_real, check_tokens
from ih_circuits.memory import check_memory
from ih_circuits.predictors import bayes_predictive, oracle_predictive
from ih_circuits.priors import DirichletPrior, KernelPrior, prior_from_dict
from ih_circuits.seeds import make_generator

# Bytes per kernel entry while sampling: the float32 Gamma draws (concentration, variate, uniform, log, weights),
# the kernels and their cumulative sums.
SAMPLING_BYTES_PER_ENTRY = 7 * 4
# Rolling the chain forward costs about this much per position and per token of the batch (measured on a 2-core
# CPU machine: 2.1 s for 10^5 positions at batch 64, 1.0 s for 10^4 at batch 4096); a longer estimate than
# PROGRESS_SECONDS shows a progress bar, updated every PROGRESS_EVERY positions.
SECONDS_PER_POSITION, SECONDS_PER_TOKEN = 2e-5, 2e-8
PROGRESS_SECONDS, PROGRESS_EVERY = 3.0, 1000


@dataclass
class NGramBatch:
    """Sequences and the kernels that generated them.

    Attributes:
        tokens: ``[batch, seq_len]`` token ids in 0..d-1.
        kernels: ``[batch, d^|pa|, d]``; ``kernels[b, z, e] = pi_b(e | z)`` with z coded as in
            ``ih_circuits.chain`` (smallest lag most significant).
    """

    tokens: Int[Tensor, "batch pos"]
    kernels: Float[Tensor, "batch history d_vocab"]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int | slice | Tensor) -> NGramBatch:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return NGramBatch(self.tokens[index], self.kernels[index])

    def to(self, device: torch.device | str) -> NGramBatch:
        return NGramBatch(self.tokens.to(device), self.kernels.to(device))

    def minibatches(self, batch_size: int, *, seed: int | None = None, shuffle: bool = True) -> Iterator[NGramBatch]:
        """One epoch over the batch in chunks of ``batch_size`` (the last may be shorter), shuffled by ``seed``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=make_generator(seed)).to(self.tokens.device)
        else:
            order = torch.arange(n, device=self.tokens.device)
        for start in range(0, n, batch_size):
            yield self[order[start : start + batch_size]]


@dataclass(frozen=True)
class NGramTask:
    """In-context learning of a parent-set Markov chain (PAPER.md §1).

    Args:
        vocab_size: d >= 2.
        parents: the parent lags pa, any set of positive integers, e.g. ``(1, 2)`` or ``(1, 3)``.
        seq_len: tokens per sequence including the final target; at least max(pa) + 1.
        alpha: Dirichlet concentration of the kernel rows (> 0), shorthand for ``prior=DirichletPrior(alpha)``;
            set from ``prior`` when that is a symmetric Dirichlet, unused by any computation otherwise.
        window: the lags 1..M a model (and the theory) considers; defaults to max(pa), must be >= max(pa).
        init: ``"uniform"`` (the paper: first max(pa) tokens i.i.d. uniform) or ``"stationary"``
            (first max(pa) tokens from the chain's stationary law, so every position is stationary).
        prior: a ``KernelPrior``; defaults to ``DirichletPrior(alpha)``. Data, the Bayes predictor, the theory,
            training and the probes all use it, and tasks with different priors are different (``==``). A custom
            class must be registered (``register_prior``) for runs that use it to load.

    >>> task = NGramTask(vocab_size=3, parents=(1, 2), seq_len=101, alpha=0.1)
    >>> batch = task.sample(4, seed=0)
    >>> tuple(batch.tokens.shape), tuple(batch.kernels.shape)
    ((4, 101), (4, 9, 3))
    """

    vocab_size: int
    parents: Sequence[int]
    seq_len: int
    alpha: float = 0.1
    window: int | None = None
    init: str = "uniform"
    prior: KernelPrior | None = None

    def __post_init__(self) -> None:
        check_int(self.vocab_size, "vocab_size", 2)
        parents = validate_lags(self.parents, "parents")
        object.__setattr__(self, "parents", parents)
        order = max(parents, default=0)
        check_int(self.seq_len, "seq_len", order + 1, low_text=f"max(parents) + 1 = {order + 1}")
        if self.prior is None:
            object.__setattr__(self, "prior", DirichletPrior(self.alpha))
        elif not isinstance(self.prior, KernelPrior):
            raise ValueError(f"prior must provide sample_rows, predictive and to_dict; got {type(self.prior).__name__}")
        elif isinstance(self.prior, DirichletPrior) and isinstance(self.prior.alpha, float):
            object.__setattr__(self, "alpha", self.prior.alpha)
        window = order if self.window is None else self.window
        check_int(window, "window", max(order, 1), low_text=f"max(max(parents), 1) = {max(order, 1)}")
        object.__setattr__(self, "window", window)
        if self.init not in ("uniform", "stationary"):
            raise ValueError(f"init must be 'uniform' or 'stationary'; got {self.init!r}")

    @property
    def order(self) -> int:
        """max(pa): how many leading tokens have no complete parent history."""
        return max(self.parents, default=0)

    @property
    def n_histories(self) -> int:
        """d^|pa|, the number of kernel rows."""
        return self.vocab_size ** len(self.parents)

    def sample(
        self,
        batch_size: int,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> NGramBatch:
        """Draw ``batch_size`` sequences, each with its own kernel.

        The same ``seed`` gives the same tokens and kernels on any device: random numbers come from one
        generator (CPU for ``seed``; the generator's own device otherwise) and are then moved to ``device``.
        The kernels take batch_size * d^|pa| * d floats and the tokens batch_size * seq_len entries (with their
        uniforms); above ``memory.memory_limit()`` this raises ``MemoryBudgetError`` before drawing. The chain
        is rolled forward one position at a time for the whole batch (about 20 us per position at batch 64), with
        a progress bar when that would take more than a few seconds.
        """
        from tqdm.auto import tqdm

        check_int(batch_size, "batch_size", 1)
        d = self.vocab_size
        small = torch.int8 if d <= 127 else torch.int64
        token_bytes = batch_size * self.seq_len * (4 + 2 * small.itemsize + 8)
        check_memory(
            SAMPLING_BYTES_PER_ENTRY * batch_size * self.n_histories * d + token_bytes,
            f"sampling {batch_size} kernels of {self.n_histories} rows x {d} tokens and {batch_size} sequences of "
            f"{self.seq_len} tokens",
            "batch_size, seq_len, vocab_size or the number of parents",
        )
        gen = make_generator(seed, generator)
        device = check_device(device) if device is not None else gen.device
        kernels = self.prior.sample_rows(batch_size, self.n_histories, d, gen, torch.float32).to(device)
        uniforms = torch.rand(self.seq_len, batch_size, generator=gen, device=gen.device).to(device)
        start = min(self.order, self.seq_len)
        # Tokens are rolled forward position-major in int8 (contiguous columns), then laid out as [batch, pos].
        tokens = torch.empty(self.seq_len, batch_size, dtype=small, device=device)
        if self.init == "uniform" or start == 0:
            tokens[:start] = (uniforms[:start] * d).clamp_max(d - 1).to(small)
        else:
            law = stationary_window_law(kernels, self.parents, d, start).float()
            state = torch.searchsorted(law.cumsum(-1), uniforms[0, :, None].contiguous())
            tokens[:start] = digit_table(start, d, device)[state[:, 0].clamp_max(law.shape[1] - 1)].T.to(small)
        # Inverse-CDF draws: x_t = #{cuts of pi(.|z) below u_t}; only the d-1 inner cuts are compared.
        cuts = einops.rearrange(kernels.cumsum(-1)[..., :-1], "batch history cut -> (batch history) cut")
        row_base = torch.arange(batch_size, device=device) * self.n_histories
        rows = torch.empty_like(row_base)
        seconds = (self.seq_len - start) * (SECONDS_PER_POSITION + SECONDS_PER_TOKEN * batch_size)
        progress = tqdm(total=self.seq_len - start, desc="sample", disable=seconds < PROGRESS_SECONDS, leave=False)
        for t in range(start, self.seq_len):
            rows.copy_(row_base)
            for i, lag in enumerate(self.parents):
                rows.add_(tokens[t - lag], alpha=d ** (len(self.parents) - 1 - i))
            tokens[t] = (uniforms[t, :, None] > cuts.index_select(0, rows)).sum(-1, dtype=small)
            if (t - start) % PROGRESS_EVERY == PROGRESS_EVERY - 1:
                progress.update(PROGRESS_EVERY)
        progress.close()
        tokens = einops.rearrange(tokens, "pos batch -> batch pos").contiguous().long()
        return NGramBatch(tokens, kernels)

    def fixed_dataset(self, n_sequences: int, *, seed: int = 0, device: torch.device | str | None = None) -> NGramBatch:
        """A fixed set of sequences for fixed-data experiments (the authors' setting, PAPER.md §8).

        Iterate over it with ``dataset.minibatches(batch_size, seed=epoch)``.
        """
        return self.sample(n_sequences, seed=seed, device=device)

    def check_tokens(self, tokens: Tensor, name: str = "tokens") -> None:
        """Raise ``ValueError`` unless ``tokens`` is an integer ``[batch, pos]`` tensor in 0..d-1."""
        check_tokens(tokens, self.vocab_size, name)

    def bayes_predictive(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        """Posterior predictive with the true parents and this task's prior (``predictors.bayes_predictive``)."""
        return bayes_predictive(tokens, self.parents, prior=self.prior, d_vocab=self.vocab_size)

    def oracle_predictive(self, batch: NGramBatch) -> Float[Tensor, "batch pos d_vocab"]:
        """The true next-token law given each sequence's own kernel (and this task's ``init``)."""
        start_law = None
        if self.init == "stationary" and self.order > 0:
            start_law = stationary_window_law(batch.kernels, self.parents, self.vocab_size, self.order)
        return oracle_predictive(batch.tokens, batch.kernels, self.parents, start_law=start_law)

    def to_dict(self) -> dict[str, Any]:
        """JSON-native description; ``NGramTask.from_dict`` inverts it.

        Refuses a prior that ``prior_from_dict`` cannot rebuild equal to itself (an unregistered class), so that
        every saved task loads back.
        """
        prior = self.prior.to_dict()
        try:
            rebuilt = prior_from_dict(prior)
        except ValueError as error:
            raise ValueError(f"this task's prior cannot be saved: {error}") from None
        if rebuilt != self.prior:
            raise ValueError(
                f"this task's prior cannot be saved: {prior!r} rebuilds as {rebuilt!r}, not {self.prior!r}; "
                "to_dict() must return {'kind': name, **constructor arguments}"
            )
        return {
            "vocab_size": self.vocab_size,
            "parents": list(self.parents),
            "seq_len": self.seq_len,
            "alpha": self.alpha,
            "window": self.window,
            "init": self.init,
            "prior": prior,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NGramTask:
        """Inverse of ``to_dict``; every field must be present and valid."""
        check_fields(data, {"vocab_size", "parents", "seq_len", "alpha", "window", "init", "prior"}, "NGramTask")
        if not isinstance(data["parents"], list):
            raise ValueError(f"NGramTask parents must be a list of lags; got {data['parents']!r}")
        prior = prior_from_dict(data["prior"])
        alpha = check_real(data["alpha"], "NGramTask alpha")
        if isinstance(prior, DirichletPrior) and isinstance(prior.alpha, float):  # alpha is the prior's own
            check_real(alpha, "NGramTask alpha", 0.0, low_open=True)
            if alpha != prior.alpha:
                raise ValueError(
                    f"NGramTask alpha={alpha} differs from its prior's alpha={prior.alpha}; they must agree"
                )
        return cls(**{**data, "parents": tuple(data["parents"]), "prior": prior})
