"""Data sources for probes: anything that samples token sequences, beside the n-gram task.

A *data source* is any object with ``sample(n, seed=...)`` returning token ids ``[n, seq_len]`` (a tensor, or
an object whose ``.tokens`` is one, as ``NGramTask.sample`` returns) and the attributes ``vocab_size`` and
``seq_len``; ``parents`` (the lags the next token truly depends on, or ``None`` when unknown) is optional.
``NGramTask`` is one; ``RepeatedTokens`` is the classic induction-head source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import einops
import torch
from jaxtyping import Int
from torch import Tensor

from ih_circuits.checks import check_int, check_tokens, is_int
from ih_circuits.seeds import make_generator


@runtime_checkable
class DataSource(Protocol):
    """What the probes need from a source of sequences (``NGramTask`` and ``RepeatedTokens`` are two)."""

    vocab_size: int
    seq_len: int

    def sample(self, n: int, *, seed: int | None = None) -> object:
        """``n`` sequences: a ``[n, seq_len]`` integer tensor or an object with such a ``.tokens``."""
        ...


@dataclass(frozen=True)
class RepeatedTokens:
    """Repeated random tokens: a uniform random block of ``period`` tokens, repeated to fill ``seq_len``.

    Each sequence draws its own period uniformly from ``min_period..max_period`` and its own block
    (tokens i.i.d. uniform over the vocabulary). From position ``period`` on, x_t = x_{t-period}: a model
    that predicts these tokens must find the earlier copy of its current token and read what followed it,
    the textbook induction head, which conditions on the current token alone (parents ``(1,)``).

    Args:
        vocab_size: d >= 2.
        seq_len: tokens per sequence, >= 2 * max_period (every sequence shows its block at least twice).
        min_period, max_period: range of the block length, 2 <= min_period <= max_period.

    >>> source = RepeatedTokens(vocab_size=10, seq_len=12, min_period=3, max_period=5)
    >>> tokens = source.sample(4, seed=0)
    >>> tokens.shape
    torch.Size([4, 12])
    """

    vocab_size: int
    seq_len: int
    min_period: int = 5
    max_period: int = 20

    def __post_init__(self) -> None:
        check_int(self.vocab_size, "vocab_size", 2)
        check_int(self.min_period, "min_period", 2)
        check_int(self.max_period, "max_period", self.min_period, low_text=f"min_period={self.min_period}")
        check_int(self.seq_len, "seq_len", 2 * self.max_period, low_text=f"2 * max_period = {2 * self.max_period}")

    @property
    def parents(self) -> tuple[int, ...]:
        """The next token is fixed by the current token's earlier copy: parents ``(1,)``."""
        return (1,)

    def sample(
        self,
        n: int,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Int[Tensor, "batch pos"]:
        """``n`` sequences ``[n, seq_len]``; the same seed gives the same tokens on every device."""
        check_int(n, "n", 1)
        generator = make_generator(seed, generator)
        block = torch.randint(0, self.vocab_size, (n, self.max_period), generator=generator)
        period = torch.randint(self.min_period, self.max_period + 1, (n, 1), generator=generator)
        positions = einops.repeat(torch.arange(self.seq_len), "pos -> batch pos", batch=n)
        return block.gather(1, positions % period).to(device)

    def periods(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
        """The period of each sequence made by ``sample`` (the smallest p in range with x_t = x_{t-p} for all t)."""
        candidates = torch.arange(self.min_period, self.max_period + 1, device=tokens.device)
        fits = torch.stack([(tokens[:, p:] == tokens[:, :-p]).all(-1) for p in candidates.tolist()], dim=-1)
        if not bool(fits.any(-1).all()):
            raise ValueError("tokens contain a sequence with no period in min_period..max_period")
        return candidates[fits.int().argmax(-1)]


def sample_tokens(source: DataSource, n: int, *, seed: int) -> Int[Tensor, "batch pos"]:
    """``n`` sequences from ``source`` as a ``[n, seq_len]`` integer tensor (``.tokens`` unwrapped), checked before
    any model sees them: integer ids in ``[0, source.vocab_size)``, exactly ``n`` rows of ``source.seq_len``."""
    sampled = source.sample(n, seed=seed)
    tokens = getattr(sampled, "tokens", sampled)
    what = f"{type(source).__name__}.sample({n})"
    if not is_int(source.vocab_size) or source.vocab_size < 2:
        raise ValueError(f"{type(source).__name__}.vocab_size must be an integer >= 2; got {source.vocab_size!r}")
    if not isinstance(tokens, Tensor):
        raise ValueError(
            f"{what} must return an integer tensor [n, seq_len] (or an object with .tokens); got "
            f"{type(tokens).__name__}"
        )
    check_tokens(tokens, source.vocab_size, f"the tokens of {what} (vocab_size={source.vocab_size})")
    if tuple(tokens.shape) != (n, source.seq_len):
        raise ValueError(
            f"{what} returned tokens of shape {tuple(tokens.shape)}, but its seq_len={source.seq_len} promises "
            f"({n}, {source.seq_len}); return n rows of seq_len tokens, or correct seq_len"
        )
    return tokens.long()
