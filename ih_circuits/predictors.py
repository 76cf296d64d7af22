"""Reference predictors and metrics (PAPER.md §4, §6), vectorised over batch and position.

Every predictor returns ``Float[Tensor, "batch pos d_vocab"]`` in the TransformerLens convention: row t
is the distribution of token t+1 given tokens[:, :t+1]. The last row predicts the token after the
sequence; metrics score rows 0..T-2 against tokens[:, 1:].

All counting predictors share one primitive, ``history_counts``: for each row t, how often each token
followed the query's history z*_t = (x_{t+1-s})_{s in S} among the target positions l <= t whose own
history (x_{l-s}) lies inside the sequence. It is a cumulative sum of one-hot (history, token) codes,
O(batch * pos * d^(|S|+1)) memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ih_circuits.chain import history_codes, validate_lags
from ih_circuits.checks import check_real, check_tokens
from ih_circuits.memory import items_per_chunk
from ih_circuits.priors import DirichletPrior, KernelPrior

Tokens = Int[Tensor, "batch pos"]
Probs = Float[Tensor, "batch pos d_vocab"]


def history_counts(
    tokens: Tokens, lags: Sequence[int], d_vocab: int, first_target: int | None = None
) -> Float[Tensor, "batch pos d_vocab"]:
    """N(z*_t, e): targets l in [first_target, t] with history z*_t that hold token e, for each row t.

    ``first_target`` defaults to max(lags) (the first position with a complete history). Rows whose
    query history is incomplete (t + 1 < max(lags)) get zero counts.

    Two exact ways to count, chosen per call by memory: a cumulative sum over one-hot (history, token) codes,
    O(pos * d^(|S|+1)) per sequence (small vocabularies), or the matches of the query's history against
    every earlier target's, O(pos^2) per sequence (large vocabularies). Sequences are processed in chunks
    of about ``memory.CHUNK_BYTES``, so the working memory does not grow with the batch.
    """
    lags = validate_lags(lags, "lags")
    first = max(lags, default=0) if first_target is None else max(first_target, max(lags, default=0))
    codes = history_codes(tokens, lags, d_vocab)
    batch, n_pos = tokens.shape
    n_codes = d_vocab ** len(lags) * d_vocab
    by_cumsum, by_matches = 8.0 * n_pos * (n_codes + 1), 6.0 * n_pos * n_pos + 12.0 * n_pos * d_vocab
    count = _counts_by_cumsum if by_cumsum <= by_matches else _counts_by_matches
    chunk = items_per_chunk(batch, min(by_cumsum, by_matches))
    if chunk >= batch:
        return count(tokens, codes, d_vocab, n_codes, first)
    counts = torch.empty(batch, n_pos, d_vocab, dtype=torch.float32, device=tokens.device)
    for start in range(0, batch, chunk):
        part = slice(start, start + chunk)
        counts[part] = count(tokens[part], codes[part], d_vocab, n_codes, first)
    return counts


def _counts_by_cumsum(
    tokens: Tokens, codes: Int[Tensor, "batch pos_plus_one"], d_vocab: int, n_codes: int, first: int
) -> Float[Tensor, "batch pos d_vocab"]:
    """``history_counts`` as a running sum of one-hot (history, token) codes, read at the query's history."""
    batch, n_pos = tokens.shape
    keys = codes[:, :n_pos] * d_vocab + tokens
    counted = (torch.arange(n_pos, device=tokens.device) >= first) & (codes[:, :n_pos] >= 0)
    onehot = torch.zeros(batch, n_pos, n_codes + 1, dtype=torch.float32, device=tokens.device)
    onehot.scatter_(2, torch.where(counted, keys, n_codes)[..., None], 1.0)
    cumulative = onehot[..., :n_codes].cumsum(dim=1)
    query = codes[:, 1:]
    index = query.clamp_min(0)[..., None] * d_vocab + torch.arange(d_vocab, device=tokens.device)
    counts = cumulative.gather(2, index)
    return counts * (query >= 0)[..., None]


def _counts_by_matches(
    tokens: Tokens, codes: Int[Tensor, "batch pos_plus_one"], d_vocab: int, n_codes: int, first: int
) -> Float[Tensor, "batch pos d_vocab"]:
    """``history_counts`` as match[t, l] = [l <= t, target l counted, history(l) = z*_t] times onehot(x_l).

    Integer counts below 2^24 are exact in float32, so this equals the cumulative-sum count.
    """
    n_pos = tokens.shape[1]
    positions = torch.arange(n_pos, device=tokens.device)
    counted = (positions >= first) & (codes[:, :n_pos] >= 0)  # [batch, key_pos]
    query = codes[:, 1:]  # [batch, query_pos]
    match = (query[:, :, None] == codes[:, None, :n_pos]) & counted[:, None, :] & (query >= 0)[:, :, None]
    match &= positions[None, :, None] >= positions[None, None, :]
    onehot = F.one_hot(tokens.long(), d_vocab).float()
    return torch.bmm(match.float(), onehot)


def bayes_predictive(
    tokens: Tokens,
    parents: Sequence[int],
    alpha: float = 0.1,
    *,
    prior: KernelPrior | None = None,
    d_vocab: int | None = None,
    first_target: int | None = None,
) -> Probs:
    """Posterior predictive of the next token with known parents (PAPER.md §6).

    P(x_{t+1} = e | x_0..x_t) = (N(z*, e) + alpha) / (N(z*) + d alpha), counting targets l <= t whose parent
    window lies inside the sequence (l >= max(pa)); a custom ``prior`` replaces the Dirichlet(alpha) rule.

    Args:
        tokens: ``[batch, pos]`` ids in 0..d-1.
        parents: the parent lags.
        alpha: Dirichlet concentration (> 0), used when ``prior`` is None.
        prior: any ``KernelPrior``; its ``predictive`` maps counts to probabilities.
        d_vocab: vocabulary size; inferred as max(tokens)+1 when None.
        first_target: count only targets l >= first_target (used by model averaging).

    >>> p = bayes_predictive(torch.tensor([[0, 1, 0, 1, 0]]), (1,), 1.0, d_vocab=2)
    >>> p[0, -1].tolist()  # after token 0, "1" followed twice and "0" never: (2+1)/(2+2)
    [0.25, 0.75]
    """
    d_vocab = check_tokens(tokens, d_vocab)
    prior = DirichletPrior(alpha) if prior is None else prior
    return prior.predictive(history_counts(tokens, parents, d_vocab, first_target))


def unigram_predictive(tokens: Tokens, alpha: float = 0.1, *, d_vocab: int | None = None) -> Probs:
    """In-context unigram: (N(e) + alpha) / (t + 1 + d alpha) over tokens 0..t (Bayes with no parents)."""
    return bayes_predictive(tokens, (), alpha, d_vocab=d_vocab)


def gih_predictive(tokens: Tokens, lags: Sequence[int], a: float, *, d_vocab: int | None = None) -> Probs:
    """Next-token distribution of the generalized induction head (PAPER.md §4).

    p(e) = [e^a N(z*,e) + N(e) - N(z*,e)] / [e^a N(z*) + T' - N(z*)]. Row t predicts token t+1 from
    tokens[:, :t+1]: the context targets are l = 1..t (T' = t; the model's key j holds token j+1), a
    target matches when its S-history is complete and equals the query's z*. ``a = inf`` gives
    N(z*,e)/N(z*), or the in-context unigram N(e)/T' when N(z*) = 0. Row 0 has no context: uniform.

    Args:
        tokens: ``[batch, pos]`` ids in 0..d-1.
        lags: the selected lags S* (any set of positive integers; () attends uniformly).
        a: classifier scale, a real number or ``float("inf")``.
        d_vocab: vocabulary size; inferred as max(tokens)+1 when None.

    >>> gih_predictive(torch.tensor([[0, 1, 0, 1, 0]]), (1,), float("inf"), d_vocab=2)[0, -1].tolist()
    [0.0, 1.0]
    """
    d_vocab = check_tokens(tokens, d_vocab)
    lags = validate_lags(lags, "lags")
    check_real(a, "a", -math.inf, low_open=True, finite=False)
    matched = history_counts(tokens, lags, d_vocab, first_target=1).double()
    totals = history_counts(tokens, (), d_vocab, first_target=1).double()
    n_matched = matched.sum(-1, keepdim=True)
    n_context = totals.sum(-1, keepdim=True)
    # Divide numerator and denominator by e^max(a, 0) so that large a never overflows.
    w_match = 1.0 if a >= 0 else math.exp(a)
    w_other = 0.0 if a == math.inf else math.exp(-max(a, 0.0))
    numerator = w_match * matched + w_other * (totals - matched)
    denominator = w_match * n_matched + w_other * (n_context - n_matched)
    fallback = torch.where(n_context > 0, totals / n_context.clamp_min(1), torch.full_like(totals, 1.0 / d_vocab))
    probs = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), fallback)
    return probs.float()


def oracle_predictive(
    tokens: Tokens,
    kernels: Float[Tensor, "batch history d_vocab"],
    parents: Sequence[int],
    *,
    start_law: Float[Tensor, "batch state"] | None = None,
) -> Probs:
    """The true next-token law: pi(. | z*_t) once the query history is complete.

    Before that (rows t < max(pa) - 1) the next token is uniform, or, when ``start_law`` gives the law of
    the first max(pa) tokens (``init="stationary"``), its conditional given the tokens so far.
    """
    if not isinstance(kernels, Tensor) or kernels.ndim != 3:
        raise ValueError(f"kernels must be a torch.Tensor [batch, d^|parents|, d]; got {type(kernels).__name__}")
    d_vocab = kernels.shape[-1]
    check_tokens(tokens, d_vocab)
    parents = validate_lags(parents)
    expected = (tokens.shape[0], d_vocab ** len(parents), d_vocab)
    if tuple(kernels.shape) != expected:
        raise ValueError(
            f"kernels must have shape [batch, d^|parents|, d] = {list(expected)} for {tokens.shape[0]} sequences and "
            f"parents {parents}; got {list(getattr(kernels, 'shape', []))}"
        )
    query = history_codes(tokens, parents, d_vocab)[:, 1:]
    rows = kernels.gather(1, query.clamp_min(0)[..., None].expand(-1, -1, d_vocab))
    probs = torch.where((query >= 0)[..., None], rows, torch.full_like(rows, 1.0 / d_vocab))
    order = max(parents, default=0)
    if start_law is not None:
        for t in range(min(order - 1, tokens.shape[1])):
            prefix = einops.reduce(
                start_law,
                "batch (prefix nxt rest) -> batch prefix nxt",
                "sum",
                nxt=d_vocab,
                rest=d_vocab ** (order - t - 2),
            )
            code = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
            for position in range(t + 1):
                code = code * d_vocab + tokens[:, position]
            joint = prefix[torch.arange(tokens.shape[0], device=tokens.device), code]
            probs[:, t] = (joint / joint.sum(-1, keepdim=True).clamp_min(1e-300)).to(probs.dtype)
    return probs


def candidate_parent_sets(window: int, max_size: int | None = None) -> list[tuple[int, ...]]:
    """All lag sets inside 1..window with at most ``max_size`` lags (default: window), the empty set first.

    >>> candidate_parent_sets(2)
    [(), (1,), (2,), (1, 2)]
    """
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    max_size = window if max_size is None else max_size
    if not 0 <= max_size <= window:
        raise ValueError(f"max_size must be in 0..window={window}; got {max_size}")
    return [subset for size in range(max_size + 1) for subset in combinations(range(1, window + 1), size)]


@dataclass
class ModelAveraging:
    """Bayesian model averaging over parent sets.

    Attributes:
        probs: ``[batch, pos, d]`` averaged predictive.
        posterior: ``[batch, pos, n_sets]``; ``posterior[b, t, k]`` = P(parents = candidates[k] | x_0..x_t).
        candidates: the lag sets, in column order.
    """

    probs: Probs
    posterior: Float[Tensor, "batch pos n_sets"]
    candidates: list[tuple[int, ...]]


def model_averaging(
    tokens: Tokens,
    candidates: Sequence[Sequence[int]],
    alpha: float = 0.1,
    *,
    prior: KernelPrior | None = None,
    d_vocab: int | None = None,
) -> ModelAveraging:
    """Bayes predictor when the parents are unknown: average over candidate lag sets (PAPER.md §6).

    Every candidate explains the same tokens, those at positions >= W = the largest candidate lag. Its
    evidence is the Dirichlet-multinomial marginal likelihood, accumulated by the chain rule
    log P_S(x_W..x_t) = sum_l log P_S(x_l | x_<l); with a uniform prior over sets, the weights at row t are
    softmax_S(log P_S(x_W..x_t)) and the prediction is sum_S w_S P_S(x_{t+1} | x_0..x_t).
    """
    d_vocab = check_tokens(tokens, d_vocab)
    tokens = tokens.long()  # any integer dtype is accepted; gather needs int64
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Iterable):
        raise ValueError(f"candidates must be a non-empty list of lag sets such as [(1,), (1, 2)]; got {candidates!r}")
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates must be a non-empty list of lag sets such as [(1,), (1, 2)]; got none")
    sets = [validate_lags(c, "candidates") for c in candidates]
    first = max((max(s, default=0) for s in sets), default=0)
    per_set = torch.stack(
        [bayes_predictive(tokens, s, alpha, prior=prior, d_vocab=d_vocab, first_target=first) for s in sets],
        dim=2,
    ).double()
    targets = tokens[:, 1:]
    scored = per_set[:, :-1].gather(3, einops.repeat(targets, "batch pos -> batch pos k 1", k=len(sets)))[..., 0]
    rows = torch.arange(tokens.shape[1] - 1, device=tokens.device)
    log_lik = torch.where((rows + 1 >= first)[None, :, None], scored.log(), torch.zeros_like(scored))
    evidence = F.pad(log_lik.cumsum(dim=1), (0, 0, 1, 0))
    posterior = torch.softmax(evidence, dim=-1)
    probs = einops.einsum(posterior, per_set, "batch pos k, batch pos k e -> batch pos e")
    return ModelAveraging(probs.float(), posterior.float(), sets)


def model_averaging_predictive(
    tokens: Tokens,
    window: int,
    alpha: float = 0.1,
    *,
    max_size: int | None = None,
    d_vocab: int | None = None,
) -> Probs:
    """``model_averaging`` over every lag set inside 1..window with at most ``max_size`` lags."""
    return model_averaging(tokens, candidate_parent_sets(window, max_size), alpha, d_vocab=d_vocab).probs


SCORE_KINDS = ("auto", "probs", "log_probs")
# A row is a distribution when its total (probabilities) or its logsumexp (log-probabilities) is this close to 1
# or 0: float32 sums over a vocabulary of thousands err by ~1e-5, anything unnormalised (logits) by far more.
ROW_TOLERANCE = 1e-3


def log_probabilities(
    scores: Float[Tensor, "*rows d_vocab"], kind: str = "auto", name: str = "probs"
) -> Float[Tensor, "*rows d_vocab"]:
    """``scores`` as log-probabilities, from probabilities or log-probabilities, refusing anything else.

    ``kind="auto"`` decides by the values: non-negative rows summing to 1 are probabilities, non-positive rows
    with logsumexp 0 are log-probabilities (no row with more than one entry can be both). Both hold to within
    ``ROW_TOLERANCE``, which also admits log-probabilities that float rounding put just above 0 (their NLL is then
    a rounding error below 0). Logits, NaN, or a ``kind`` the values contradict raise ``ValueError`` naming
    ``name`` before anything is scored.

    >>> log_probabilities(torch.tensor([[0.5, 0.5]])).exp().tolist()
    [[0.5, 0.5]]
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"kind must be one of {SCORE_KINDS}; got {kind!r}")
    values = scores.detach()
    if torch.isnan(values).any():
        raise ValueError(f"{name} contains NaN")
    as_probs = kind != "log_probs" and _are_probabilities(values)
    as_log = not as_probs and kind != "probs" and _are_log_probabilities(values)
    if kind == "auto" and not (as_probs or as_log):
        raise ValueError(
            f"{name} must be probabilities (non-negative rows summing to 1) or log-probabilities (rows with "
            f"logsumexp 0); got rows summing to {float(values.sum(-1).min()):.4g}..{float(values.sum(-1).max()):.4g}"
            " (logits? apply torch.log_softmax(logits, dim=-1))"
        )
    if kind == "probs" and not as_probs:
        raise ValueError(f"{name} with kind='probs' must be non-negative rows summing to 1")
    if kind == "log_probs" and not as_log:
        raise ValueError(
            f"{name} with kind='log_probs' must be non-positive rows (to within {ROW_TOLERANCE}) with logsumexp 0"
        )
    return scores.log() if as_probs else scores


def _are_probabilities(values: Tensor) -> bool:
    return bool((values >= 0).all()) and bool(((values.sum(-1) - 1).abs() <= ROW_TOLERANCE).all())


def _are_log_probabilities(values: Tensor) -> bool:
    # float rounding can put a log-probability near 1 slightly above 0: the same tolerance as the rows' totals
    return bool((values <= ROW_TOLERANCE).all()) and bool((values.logsumexp(-1).abs() <= ROW_TOLERANCE).all())


def next_token_nll(probs: Probs, tokens: Tokens, *, kind: str = "auto") -> Float[Tensor, "batch pos_minus_one"]:
    """-log p_t(x_{t+1}) for rows t = 0..T-2 (row t scored against tokens[:, t+1]); +inf where p = 0.

    ``probs`` may be probabilities (the predictors here) or log-probabilities (``IHTransformer``'s output):
    ``kind="auto"`` tells them apart and refuses logits (see ``log_probabilities``).
    """
    _check_pair(probs, tokens)
    log_probs = log_probabilities(probs[:, :-1], kind)
    return -log_probs.gather(2, tokens[:, 1:, None].long().to(probs.device))[..., 0]


def last_position_nll(probs: Probs, tokens: Tokens, *, kind: str = "auto") -> Float[Tensor, " batch"]:
    """The paper's objective: -log p(x_T | x_0..x_{T-1}) = row T-2 against the final token.

    Probabilities or log-probabilities, as ``next_token_nll``.
    """
    return next_token_nll(probs, tokens, kind=kind)[:, -1]


def kl_divergence(
    p: Float[Tensor, "*rows d_vocab"], q: Float[Tensor, "*rows d_vocab"], *, kind: str = "auto"
) -> Float[Tensor, "*rows"]:
    """KL(p || q) = sum_e p(e) log(p(e) / q(e)) over the last axis, with 0 log 0 = 0.

    ``p`` and ``q`` are each probabilities or log-probabilities (``kind``, as ``log_probabilities``).
    """
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape; got {tuple(p.shape)} and {tuple(q.shape)}")
    log_p, log_q = log_probabilities(p, kind, "p"), log_probabilities(q, kind, "q")
    return torch.where(log_p > -torch.inf, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p)).sum(-1)


def accuracy(probs: Probs, tokens: Tokens) -> Float[Tensor, "batch pos_minus_one"]:
    """1.0 where argmax_e p_t(e) = x_{t+1}, for rows t = 0..T-2."""
    _check_pair(probs, tokens)
    return (probs[:, :-1].argmax(-1) == tokens[:, 1:]).float()


def _check_pair(probs: Tensor, tokens: Tensor) -> None:
    check_tokens(tokens, probs.shape[-1])
    if probs.ndim != 3 or probs.shape[:2] != tokens.shape:
        raise ValueError(
            f"probs must have shape [batch, pos, d_vocab] matching tokens {tuple(tokens.shape)}; "
            f"got {tuple(probs.shape)}"
        )
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens must have at least 2 positions to score a prediction; got {tokens.shape[1]}")
