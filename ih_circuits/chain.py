"""Histories and stationary laws of parent-set Markov chains (PAPER.md §1, §5).

A *history* over lags S = (s_1 < ... < s_k) at position t is z = (x_{t-s_1}, ..., x_{t-s_k}). It is encoded
as the integer z = sum_i x_{t-s_i} d^(k-i): the smallest lag is the most significant digit. Kernel tables
use the same code, ``kernels[b, z, e] = pi_b(e | z)``, so ``history_codes`` indexes them directly.

Dimension names used across the package: ``batch pos query_pos key_pos head lag subset d_vocab history``;
``window`` for a run of consecutive tokens and ``state`` for the code of such a run.
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ih_circuits.checks import check_int
from ih_circuits.memory import check_memory, items_per_chunk

_TELEPORT = 1e-10


def validate_lags(lags: Sequence[int], name: str = "parents") -> tuple[int, ...]:
    """Return ``lags`` as a sorted tuple, or raise ``ValueError`` naming ``name``.

    Lags are positive integers ("lag s" = the token s positions earlier); repeats are refused.

    >>> validate_lags([3, 1])
    (1, 3)
    """
    if isinstance(lags, (str, bytes)) or not isinstance(lags, Sequence):
        raise ValueError(f"{name} must be a sequence of positive integer lags; got {lags!r}")
    values = list(lags)
    for lag in values:
        check_int(lag, f"every lag in {name}={tuple(values)}", 1)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a lag; got {tuple(values)}")
    return tuple(sorted(values))


def digit_table(n_digits: int, d_vocab: int, device: torch.device | str | None = None) -> Int[Tensor, "state n_digits"]:
    """Base-``d_vocab`` digits of every code 0..d^n-1, most significant digit first."""
    codes = torch.arange(d_vocab**n_digits, device=device)
    powers = d_vocab ** torch.arange(n_digits - 1, -1, -1, device=device)
    return (codes[:, None] // powers) % d_vocab


def history_codes(
    tokens: Int[Tensor, "batch pos"], lags: Sequence[int], d_vocab: int
) -> Int[Tensor, "batch pos_plus_one"]:
    """Code of the S-history at positions 0..T (T = the query slot after the last token); -1 if incomplete.

    Position p has a complete history when p - s >= 0 for every lag s. The extra last column is the
    history of the token that would follow the sequence, which is what row T-1 of a predictor needs.

    >>> history_codes(torch.tensor([[0, 1, 2]]), (1,), 3).tolist()
    [[-1, 0, 1, 2]]
    """
    n_pos = tokens.shape[1] + 1
    if not lags:
        return torch.zeros(tokens.shape[0], n_pos, dtype=torch.long, device=tokens.device)
    longest = max(lags)
    padded = torch.nn.functional.pad(tokens.long(), (longest, 0))
    codes = torch.zeros(tokens.shape[0], n_pos, dtype=torch.long, device=tokens.device)
    for lag in lags:
        codes = codes * d_vocab + padded[:, longest - lag : longest - lag + n_pos]
    complete = torch.arange(n_pos, device=tokens.device) >= longest
    return torch.where(complete, codes, torch.full_like(codes, -1))


def _window_history_codes(length: int, parents: tuple[int, ...], d_vocab: int, device) -> Int[Tensor, " state"]:
    """For each run w of ``length`` tokens (oldest first), the code of the parents of the token after it."""
    digits = digit_table(length, d_vocab, device)
    codes = torch.zeros(digits.shape[0], dtype=torch.long, device=device)
    for lag in parents:
        codes = codes * d_vocab + digits[:, length - lag]
    return codes


def _extend(
    law: Float[Tensor, "batch state"],
    kernels: Float[Tensor, "batch history d_vocab"],
    parents: tuple[int, ...],
    d_vocab: int,
    length: int,
) -> Float[Tensor, "batch next_state"]:
    """mu_{k+1}(w, e) = mu_k(w) pi(e | parents of the token after w), for runs w of ``length`` tokens."""
    codes = _window_history_codes(length, parents, d_vocab, law.device)
    joint = law[:, :, None] * kernels[:, codes, :]
    return einops.rearrange(joint, "batch state e -> batch (state e)")


def window_law_bytes(d_vocab: int, order: int, length: int) -> int:
    """Working memory of ``stationary_window_law`` per kernel: the float64 transition system of the
    d^order-state chain (matrix, system, factorisation) and the laws of the longer runs (law, product, sum)."""
    n_states = d_vocab**order if order else 0
    return 8 * (3 * n_states * n_states + 3 * d_vocab ** max(length, order))


def stationary_window_law(
    kernels: Float[Tensor, "batch history d_vocab"], parents: Sequence[int], d_vocab: int, length: int
) -> Float[Tensor, "batch state"]:
    """Stationary joint law of ``length`` consecutive tokens (oldest first) for each kernel in the batch.

    With r = max(parents), the chain on runs of r tokens is Markov with transition
    P(w -> (w[1:], e)) = pi(e | z(w)). Its stationary law solves mu (I - P) = 0, sum mu = 1, which we solve
    exactly and in batch as (I - P^T + 1 1^T) mu = 1 in float64 (P mixed with a 1e-10 teleport, so the
    answer is unique even when a kernel with exact zeros makes the chain reducible). Longer runs follow by
    mu_{k+1}(w, e) = mu_k(w) pi(e | z(w)); shorter ones by marginalising (stationarity makes every offset
    alike). Cost O(batch * d^(3r)); kernels are processed in chunks of about ``memory.CHUNK_BYTES`` of working
    memory, and a law larger than ``memory.memory_limit()`` is refused before anything is allocated.

    Args:
        kernels: ``[batch, d^|parents|, d]`` transition tables, rows summing to 1.
        parents: the parent lags of the chain.
        d_vocab: vocabulary size d.
        length: number of consecutive tokens, >= 1.

    Returns:
        ``[batch, d^length]`` probabilities; code = base-d digits of the run, oldest token most significant.
    """
    parents = validate_lags(parents)
    if length < 1:
        raise ValueError(f"length must be >= 1; got {length}")
    batch = kernels.shape[0]
    order = max(parents, default=0)
    per_kernel = window_law_bytes(d_vocab, order, length)
    check_memory(
        2 * batch * 8 * d_vocab ** max(length, order) + per_kernel,
        f"the stationary law of {length} tokens for {batch} kernels (vocabulary {d_vocab}, order {order})",
        "the batch, the vocabulary size or the window",
    )
    chunk = items_per_chunk(batch, per_kernel)
    if chunk < batch:
        parts = [
            stationary_window_law(kernels[i : i + chunk], parents, d_vocab, length) for i in range(0, batch, chunk)
        ]
        return torch.cat(parts)
    kernels = kernels.double()
    if order == 0:
        law = torch.ones(batch, 1, dtype=torch.float64, device=kernels.device)
    else:
        n_states = d_vocab**order
        codes = _window_history_codes(order, parents, d_vocab, kernels.device)
        shifted = torch.arange(n_states, device=kernels.device) % (n_states // d_vocab)
        next_states = shifted[:, None] * d_vocab + torch.arange(d_vocab, device=kernels.device)
        transition = torch.zeros(batch, n_states, n_states, dtype=torch.float64, device=kernels.device)
        rows = torch.arange(n_states, device=kernels.device)[:, None].expand(n_states, d_vocab)
        transition[:, rows, next_states] = kernels[:, codes, :]
        # A teleport of weight 1e-10 keeps the law unique when a sparse kernel (tiny alpha) makes the chain
        # reducible; for an ergodic chain it moves the law by O(1e-10 x mixing time).
        transition = (1.0 - _TELEPORT) * transition + _TELEPORT / n_states
        system = torch.eye(n_states, dtype=torch.float64, device=kernels.device) - transition.transpose(1, 2) + 1.0
        law = _solve_one_thread(system, torch.ones(batch, n_states, dtype=torch.float64, device=kernels.device))
        law = law.clamp_min(0.0)
        law = law / law.sum(-1, keepdim=True)
    current = order
    while current < length:
        law = _extend(law, kernels, parents, d_vocab, current)
        current += 1
    if length < current:
        law = einops.reduce(law, "batch (old keep) -> batch keep", "sum", keep=d_vocab**length)
    return law


def _solve_one_thread(
    system: Float[Tensor, "batch state state"], rhs: Float[Tensor, "batch state"]
) -> Float[Tensor, "batch state"]:
    """``torch.linalg.solve`` with one CPU thread. The batched float64 LU of torch's CPU build (oneMKL) returns
    invalid pivots with two threads at 400 states (vocabulary 20, order 2): "Parameter 6 was incorrect on entry
    to DLASWP", then a ``RuntimeError``; with one thread it is right, and the law is the same at every thread
    count. Other devices are left alone."""
    if system.device.type != "cpu":
        return torch.linalg.solve(system, rhs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.solve(system, rhs)
    finally:
        torch.set_num_threads(threads)


def burned_in_law(
    kernels: Float[Tensor, "batch history d_vocab"],
    parents: Sequence[int],
    d_vocab: int,
    tolerance: float,
    max_steps: int,
) -> Float[Tensor, "batch state"]:
    """Law of the last r = max(parents) tokens after a burn-in from the uniform law, by power iteration.

    mu_{n+1}(w[1:], e) = sum_{w[0]} mu_n(w) pi(e | z(w)): each step costs O(d^(r+1)) per kernel, against
    O(d^(3r)) for the exact solve of ``stationary_window_law``. A kernel stops once its step changes the law by
    less than ``tolerance`` in L1 (so others in the batch do not hold it back), or after ``max_steps``. The law
    then differs from the stationary one by about tolerance x mixing time; a chain that mixes slower than
    ``max_steps`` (near-reducible kernels, e.g. alpha <= 0.01) keeps its ``max_steps``-step law.

    Returns:
        ``[batch, d^r]`` probabilities over runs of r tokens, coded as in ``stationary_window_law``.
    """
    parents = validate_lags(parents)
    order = max(parents, default=0)
    law = torch.full((kernels.shape[0], d_vocab**order), d_vocab**-order, dtype=torch.float64, device=kernels.device)
    if order == 0:
        return law
    rows = kernels.double()[:, _window_history_codes(order, parents, d_vocab, kernels.device), :]
    active, current = torch.arange(kernels.shape[0], device=kernels.device), law.clone()
    for _ in range(max_steps):
        stepped = einops.reduce(current[:, :, None] * rows, "batch (old rest) e -> batch (rest e)", "sum", old=d_vocab)
        moving = (stepped - current).abs().sum(-1) >= tolerance
        if moving.all():
            current = stepped
            continue
        law[active[~moving]] = stepped[~moving]
        active, current, rows = active[moving], stepped[moving], rows[moving]
        if active.numel() == 0:
            break
    law[active] = current
    return law
