"""What the probes run on: an ``NGramTask``, any data source, or a token tensor; and token resampling.

``probe_data(data, adapter)`` turns what the user passed into ``ProbeData``: a way to get sequences
(``tokens_for``), the vocabulary they use, and what is known about them (true parents, the n-gram task
with its prior). Resampling replaces one position of each sequence by another token drawn from the
batch's own token distribution, so it works on any vocabulary and any data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from ih_circuits.chain import validate_lags
from ih_circuits.checks import check_int, check_tokens
from ih_circuits.seeds import derive_seed
from ih_circuits.sources import DataSource, sample_tokens
from ih_circuits.task import NGramTask

if TYPE_CHECKING:
    from ih_circuits.adapters import TransformerLensAdapter

Data = NGramTask | DataSource | Tensor
DEFAULT_MAX_LAG = 8


@dataclass(frozen=True)
class ProbeData:
    """Sequences for the probes and what is known about them.

    Attributes:
        source: the sampler (``NGramTask`` or another data source), or None for a fixed token tensor.
        tokens: the fixed tokens ``[batch, pos]`` when a tensor was given, else None.
        seq_len: tokens per sequence.
        parents: the lags the next token truly depends on, when the source knows them.
        window: the lags a model of this data is expected to look at (the task's window, else None).
    """

    source: NGramTask | DataSource | None
    tokens: Tensor | None
    seq_len: int
    parents: tuple[int, ...] | None
    window: int | None

    @property
    def task(self) -> NGramTask | None:
        """The n-gram task, when the data is one (needed for Bayes baselines and the selection theory)."""
        return self.source if isinstance(self.source, NGramTask) else None

    def max_lag(self) -> int:
        """Default number of lags to test: the window + 2 when known, else ``DEFAULT_MAX_LAG``, capped to fit."""
        lags = DEFAULT_MAX_LAG if self.window is None else self.window + 2
        return max(1, min(lags, self.seq_len - 2))

    def check_lags(self, lags: Sequence[int], name: str = "lags", limit: int | None = None) -> tuple[int, ...]:
        """``lags`` sorted, refused unless it is a non-empty set inside 1..``limit`` (default ``max_lag()``), the
        lags the probes test."""
        lags = validate_lags(lags, name)
        limit = self.max_lag() if limit is None else limit
        if not lags or max(lags) > limit:
            where = (
                f"the lags tested, max_lag = {limit}"
                if limit != self.max_lag()
                else f"the window + 2 = {limit}"
                if self.window is not None
                else f"{limit} for data without a window"
            )
            raise ValueError(f"{name} must be a non-empty set of lags inside 1..{limit} ({where}); got {lags}")
        return lags

    def tokens_for(self, n_sequences: int, seed: int, purpose: str, device: torch.device) -> Int[Tensor, "batch pos"]:
        """Sequences for one probe: the fixed tokens, or ``n_sequences`` drawn with a seed derived for ``purpose``."""
        if self.tokens is not None:
            return self.tokens.to(device)
        check_int(n_sequences, "n_sequences", 8)
        return sample_tokens(self.source, n_sequences, seed=derive_seed(seed, purpose)).to(device)


def probe_data(data: Data, adapter: TransformerLensAdapter) -> ProbeData:
    """Check ``data`` against the model and describe it.

    Args:
        data: an ``NGramTask``; a data source (``sample(n, seed=...)``, ``vocab_size``, ``seq_len``, optional
            ``parents``), such as ``RepeatedTokens``; or an integer token tensor ``[batch, pos]`` from anywhere.
        adapter: the model's adapter (its vocabulary and context length bound the data).
    """
    if isinstance(data, Tensor):
        check_tokens(data, adapter.d_vocab, "data")
        if data.shape[0] < 2 or data.shape[1] < 3:
            raise ValueError(f"data must have >= 2 sequences of >= 3 tokens; got shape {tuple(data.shape)}")
        if data.shape[1] > adapter.n_ctx:
            raise ValueError(f"data has {data.shape[1]} positions; the model's n_ctx is {adapter.n_ctx}")
        return ProbeData(None, data.long(), data.shape[1], None, None)
    if not isinstance(data, DataSource):
        raise ValueError(
            "data must be an NGramTask, a data source (with sample(n, seed=...), vocab_size and seq_len) or an "
            f"integer token tensor [batch, pos]; got {type(data).__name__}"
        )
    owner = type(data).__name__
    vocab_size = check_int(data.vocab_size, f"{owner}.vocab_size", 1)
    seq_len = check_int(data.seq_len, f"{owner}.seq_len", 1)
    if vocab_size > adapter.d_vocab:
        raise ValueError(f"{owner}.vocab_size={vocab_size} exceeds the model's d_vocab={adapter.d_vocab}")
    if adapter.exact_vocab and vocab_size != adapter.d_vocab:
        raise ValueError(f"the model has d_vocab={adapter.d_vocab} but {owner}.vocab_size={vocab_size}")
    if seq_len > adapter.n_ctx:
        raise ValueError(f"{owner}.seq_len={seq_len} exceeds the model's n_ctx={adapter.n_ctx}")
    if seq_len < 3:
        raise ValueError(f"{owner}.seq_len must be >= 3 (a query row and a target); got {seq_len}")
    parents = getattr(data, "parents", None)
    parents = None if parents is None else tuple(parents)
    window = data.window if isinstance(data, NGramTask) else None
    return ProbeData(data, None, seq_len, parents, window)


def resample_positions(
    tokens: Int[Tensor, "batch pos"], positions: list[int], generator: torch.Generator
) -> Int[Tensor, "variant batch pos"]:
    """One corrupted copy of ``tokens`` per position: that position's token replaced by a different one.

    The replacement is drawn from the batch's own token frequencies (a uniformly chosen token of the batch)
    with the original token excluded by rejection, so it is a plausible token of the data whatever the
    vocabulary (for the n-gram task it is close to uniform over the other d-1 tokens) and needs no
    vocabulary-sized table. Draws come from ``generator`` (CPU), so a seed fixes them.
    """
    pool = tokens.flatten().cpu()
    if bool((pool == pool[0]).all()):
        raise ValueError("tokens must contain at least two distinct token ids to resample a position")
    index = torch.tensor(positions, device=tokens.device)
    original = tokens[:, index].T.reshape(-1).cpu()  # [variant * batch]
    replacement = original.clone()
    pending = torch.ones_like(original, dtype=torch.bool)
    while bool(pending.any()):
        rows = pending.nonzero()[:, 0]
        draw = pool[torch.randint(0, pool.numel(), (len(rows),), generator=generator)]
        accepted = draw != original[rows]
        replacement[rows[accepted]] = draw[accepted]
        pending[rows[accepted]] = False
    corrupted = tokens[None].repeat(len(positions), 1, 1)
    columns = index[:, None, None].expand(-1, tokens.shape[0], 1)
    corrupted.scatter_(2, columns, replacement.reshape(len(positions), -1, 1).to(tokens.device))
    return corrupted
