"""Layer 1, the copier (PAPER.md §2.1): H heads that each copy the token at a learned relative lag.

Position t is the query slot for token t+1, so lag s reads the token at position t+1-s (lag 1 = the
current token). Head h has one logit per lag, w_h[m] for its lags s_{h,m}; its weights softmax(w_h) are
the same at every position, and a lag reaching before the start reads a zero vector (no renormalisation),
so an exact copier never copies a wrong lag near the start. The output is the weighted sum of the copied
one-hot tokens, L2-normalised per head (a zero sum stays zero):

    v_h(t) = u / ||u||,  u = sum_m softmax(w_h)[m] onehot(x_{t+1-s_{h,m}}).

The full variant adds a token-dependent logit x_t^T W_QK,h x_{t+1-s} (the query token is the current
token x_t: the paper's query slot has no token of its own, and x_t is the newest token a causal position
holds), a value map W_V,h, and a LayerNorm scaled by 1/sqrt(d) instead of the L2 normalisation.

Fast path: without hooks the [batch, head, query_pos, key_pos] pattern is never built; the copier is a
sum over the M lag-shifted one-hot tokens. With hooks attached, the dense scores, pattern and values are
built and each passes through its hook before it is used, so an edit at any of them is honoured: the
pattern is the softmax of the (possibly edited) ``hook_attn_scores`` over the key columns plus one
"before the start" slot per lag that reaches before position 0 (those slots read a zero vector, so their
weight is dropped and the row sums to less than 1).
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ih_circuits.model.config import IHConfig


def lag_windows(embed: Float[Tensor, "batch pos d_vocab"], max_lag: int) -> Float[Tensor, "batch pos max_lag d_vocab"]:
    """``out[b, t, s-1]`` = the embedded token at position t+1-s, a zero vector before the start."""
    padded = F.pad(embed, (0, 0, max_lag - 1, 0))
    windows = padded.unfold(1, max_lag, 1).flip(-1)
    return einops.rearrange(windows, "batch pos e lag -> batch pos lag e")


def window_codes(tokens: Int[Tensor, "batch pos"], max_lag: int, d_vocab: int) -> Int[Tensor, "batch pos"]:
    """The code of each position's lag window: sum_m x_{t-m} (d+1)^m over m = 0..max_lag-1, where a token
    before the start counts as the extra symbol d. Codes run over 0..(d+1)^max_lag - 1."""
    padded = F.pad(tokens.long(), (max_lag - 1, 0), value=d_vocab)
    n_pos = tokens.shape[1]
    codes = torch.zeros_like(padded[:, :n_pos])
    for m in range(max_lag - 1, -1, -1):  # Horner's rule, x_{t-m} for the oldest lag first
        codes.mul_(d_vocab + 1).add_(padded[:, max_lag - 1 - m : max_lag - 1 - m + n_pos])
    return codes


def all_windows(
    max_lag: int, d_vocab: int, dtype: torch.dtype, device: torch.device | str
) -> Float[Tensor, "code 1 max_lag d_vocab"]:
    """The lag window of every ``window_codes`` code as embedded tokens (the symbol d embeds as a zero vector),
    shaped as a batch of one-position windows for ``Copier.window_features``."""
    codes = torch.arange((d_vocab + 1) ** max_lag, device=device)
    digits = codes[:, None] // (d_vocab + 1) ** torch.arange(max_lag, device=device) % (d_vocab + 1)
    embedded = F.one_hot(digits, d_vocab + 1)[..., :d_vocab].to(dtype)
    return einops.rearrange(embedded, "code lag e -> code 1 lag e")


class Copier(nn.Module):
    """Multi-head relative-position attention over lags; ``blocks.0.attn``."""

    def __init__(self, cfg: IHConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype, device = cfg.torch_dtype, cfg.device
        w = torch.full((cfg.n_heads, cfg.window), cfg.w_minus, dtype=dtype, device=device)
        for head in range(cfg.n_heads):
            own = 0 if cfg.layout == "staggered" else head
            if own < cfg.window:
                w[head, own] = cfg.w_plus
        self.w_pos = nn.Parameter(w)
        self.register_buffer(
            "lag_index", torch.tensor(cfg.lag_table, dtype=torch.long, device=device) - 1, persistent=False
        )
        if cfg.copier == "full":
            generator = torch.Generator().manual_seed(cfg.seed)
            qk = 0.02 * torch.randn(cfg.n_heads, cfg.d_vocab, cfg.d_vocab, generator=generator, dtype=dtype)
            self.W_QK = nn.Parameter(qk.to(device))
            eye = torch.eye(cfg.d_vocab, dtype=dtype, device=device)
            self.W_V = nn.Parameter(einops.repeat(eye, "i j -> head i j", head=cfg.n_heads).clone())
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_v = HookPoint()  # [batch, pos, head, d_vocab]
        self.hook_z = HookPoint()  # [batch, pos, head, d_vocab]
        self.hook_result = HookPoint()  # [batch, pos, head, d_vocab]

    def weights(self) -> Float[Tensor, "head lag"]:
        """softmax(w_h) over each head's window."""
        return torch.softmax(self.w_pos, dim=-1)

    def _lag_scores(self, windows: Float[Tensor, "batch pos max_lag d_vocab"]) -> Float[Tensor, "#batch #pos head lag"]:
        """Logit of head h for its m-th lag at position t (broadcast over batch and pos when positional)."""
        scores = self.w_pos[None, None]
        if self.cfg.copier == "full":
            keys = windows[:, :, self.lag_index]  # [batch, pos, head, lag, d_vocab]
            query = windows[:, :, 0]  # lag 1: the current token
            token_part = torch.einsum("bte,hef,bthmf->bthm", query, self.W_QK, keys)
            scores = scores + token_part
        return scores

    def forward(
        self, embed: Float[Tensor, "batch pos d_vocab"], dense: bool
    ) -> Float[Tensor, "batch pos head d_vocab"]:
        windows = lag_windows(embed, self.cfg.max_lag)
        z = self._dense(embed, self._lag_scores(windows)) if dense else self._mix(windows)
        z = self.hook_z(z)
        return self.hook_result(self._normalize(z))

    def window_features(
        self, windows: Float[Tensor, "batch pos max_lag d_vocab"]
    ) -> Float[Tensor, "batch pos head d_vocab"]:
        """v_h from the lag windows alone (no hooks): every copier's output at a position is a function of the
        tokens at lags 1..max_lag (a zero vector before the start), which ``window_table`` exploits."""
        return self._normalize(self._mix(windows))

    def _mix(self, windows: Float[Tensor, "batch pos max_lag d_vocab"]) -> Float[Tensor, "batch pos head d_vocab"]:
        """The un-normalised sum over lags, without building the [batch, head, query_pos, key_pos] pattern."""
        scores = self._lag_scores(windows)
        if self.cfg.copier == "positional":
            # The pattern does not depend on the sequence: one [head, lag] weight table for every position.
            per_lag = torch.zeros(self.cfg.n_heads, self.cfg.max_lag, dtype=scores.dtype, device=windows.device)
            per_lag = per_lag.scatter_add(1, self.lag_index, torch.softmax(scores[0, 0], dim=-1))
            return torch.einsum("btse,hs->bthe", windows, per_lag).contiguous()
        values = torch.einsum("bthme,hef->bthmf", windows[:, :, self.lag_index], self.W_V)
        return torch.einsum("bthm,bthme->bthe", torch.softmax(scores, dim=-1), values)

    def _dense(
        self, embed: Float[Tensor, "batch pos d_vocab"], scores: Float[Tensor, "#batch #pos head lag"]
    ) -> Float[Tensor, "batch pos head d_vocab"]:
        """Build the [batch, head, query, key] scores, run every hook, and contract the pattern with the values.

        Column t+1-s of row t holds the logit of lag s; a lag reaching before the start has no column, so its
        logit joins the softmax through a spare "before the start" slot that is dropped afterwards.
        """
        cfg = self.cfg
        batch, n_pos, _ = embed.shape
        positions = torch.arange(n_pos, device=embed.device)
        keys = positions[:, None, None] - self.lag_index[None]  # key = t + 1 - s, [pos, head, lag]
        present = keys >= 0
        # Present lags scatter into their key column; absent ones into a spare last column, dropped at once.
        index = einops.repeat(torch.where(present, keys, n_pos), "pos head lag -> batch head pos lag", batch=batch)
        by_lag = einops.rearrange(scores.expand(batch, n_pos, -1, -1), "batch pos head lag -> batch head pos lag")
        shape = (batch, cfg.n_heads, n_pos, n_pos + 1)
        blank = torch.full(shape, float("-inf"), dtype=scores.dtype, device=embed.device)
        dense_scores = self.hook_attn_scores(blank.scatter(-1, index, by_lag)[..., :n_pos])
        before_start = by_lag.masked_fill(einops.rearrange(present, "pos head lag -> head pos lag"), float("-inf"))
        pattern = torch.softmax(torch.cat([dense_scores, before_start], dim=-1), dim=-1)[..., :n_pos]
        pattern = self.hook_pattern(pattern)
        if cfg.copier == "full":
            values = torch.einsum("bke,hef->bkhf", embed, self.W_V)
        else:
            # A copy per head, not a broadcast view: an in-place edit of one head's values must stay in that head.
            values = einops.repeat(embed, "batch key e -> batch key head e", head=cfg.n_heads).clone()
        return torch.einsum("bhqk,bkhe->bqhe", pattern, self.hook_v(values))

    def token_codes(self, tokens: Int[Tensor, "batch pos"], row: int) -> Int[Tensor, "batch pos"]:
        """Integer codes that determine G_h(row, j) for the positional copier (no gradient needed).

        With P[h, s] the weight of head h on lag s, <u_h(i), u_h(j)> = sum_{s,u} P[h,s] P[h,u] [x_{i+1-s} =
        x_{j+1-u}] (absent tokens match nothing) and v = u / ||u||. So G_h(row, j) depends on the tokens only
        through the S^2 match bits of (row, j) ("cross code") and, for each of row and j, the S(S-1)/2
        self-match bits and how many lags are present ("norm code"). The result indexes the flattened
        ``similarity_table()``: (norm code of row, cross code, norm code of j).
        """
        n_lags, d_vocab, n_pos = self.cfg.max_lag, self.cfg.d_vocab, tokens.shape[1]
        padded = F.pad(tokens, (n_lags - 1, 0), value=d_vocab)  # d_vocab marks "before the start"

        def at_lag(m: int) -> Tensor:
            return padded[:, n_lags - 1 - m : n_lags - 1 - m + n_pos]  # token at t + 1 - (m + 1)

        values = torch.arange(d_vocab + 1, device=tokens.device)
        # match[b, v]: bits over the query's lags s of [x_{row+1-s} = v]; an absent token (v = d) matches nothing.
        match = torch.zeros(tokens.shape[0], d_vocab + 1, dtype=torch.long, device=tokens.device)
        for m in range(n_lags):
            query_token = at_lag(m)[:, row, None]
            match = match * 2 + ((query_token == values) & (query_token < d_vocab))
        cross = torch.zeros_like(tokens)
        for m in range(n_lags):
            cross.mul_(2**n_lags).add_(match.gather(1, at_lag(m)))
        positions = torch.arange(n_pos, device=tokens.device)
        own = torch.zeros_like(tokens)
        for first, second in _lag_pairs(n_lags):
            own.mul_(2).add_((at_lag(first) == at_lag(second)) & (positions >= second))
        norm = own.mul_(n_lags).add_(positions.clamp_max(n_lags - 1))
        n_cross, n_norm = 2 ** (n_lags * n_lags), 2 ** len(_lag_pairs(n_lags)) * n_lags
        return cross.add_(norm[:, row, None] * n_cross).mul_(n_norm).add_(norm)

    def similarity_table(self) -> Float[Tensor, "query_code cross_code key_code head"]:
        """G_h for every (norm code of the query, cross code, norm code of the key), from the weights P.

        A cosine of two non-negative vectors lies in [0, 1], so every code that tokens can produce gives a
        value there. Codes no tokens produce (a cross code that matches a lag the norm codes call absent)
        combine a tiny norm with a large inner product; clipped to [0, 1], they stay finite, and so does the
        gradient through them, however sharp the copier (a lag-logit gap of 25 made them overflow).
        """
        cfg = self.cfg
        n_lags = cfg.max_lag
        per_lag = torch.zeros(cfg.n_heads, n_lags, dtype=self.w_pos.dtype, device=self.w_pos.device)
        per_lag = per_lag.scatter_add(1, self.lag_index, self.weights())
        device, dtype = per_lag.device, per_lag.dtype
        pair_products = einops.rearrange(per_lag[:, :, None] * per_lag[:, None, :], "h s u -> (s u) h")
        inner = _bits(n_lags * n_lags, device).to(dtype) @ pair_products  # [cross, head]
        lags = torch.arange(n_lags, device=device)
        present = (lags[None, :] <= lags[:, None]).to(dtype)  # [n_present, lag]
        squared = (present @ per_lag.square().T)[None]  # [1, n_present, head]
        pairs = _lag_pairs(n_lags)
        if pairs:
            off_diagonal = torch.stack([per_lag[:, s] * per_lag[:, u] for s, u in pairs], dim=0)
            squared = squared + 2 * (_bits(len(pairs), device).to(dtype) @ off_diagonal)[:, None, :]
        squared = squared.reshape(-1, cfg.n_heads)  # [norm code, head]
        inverse_norm = squared.clamp_min(1e-24).rsqrt() * (squared > 0)
        table = inverse_norm[:, None, None, :] * inner[None, :, None, :] * inverse_norm[None, None, :, :]
        return table.clamp(0.0, 1.0)

    @property
    def supports_token_codes(self) -> bool:
        """Whether ``token_codes`` applies: the positional copier with at most 3 distinct lags."""
        return self.cfg.copier == "positional" and self.cfg.max_lag <= 3

    def _normalize(self, z: Float[Tensor, "batch pos head d_vocab"]) -> Float[Tensor, "batch pos head d_vocab"]:
        if self.cfg.copier == "full":
            centred = z - z.mean(-1, keepdim=True)
            scale = (centred.square().mean(-1, keepdim=True) + 1e-5).rsqrt()
            return centred * scale / self.cfg.d_vocab**0.5
        inverse_norm = z.square().sum(-1, keepdim=True).clamp_min(1e-24).rsqrt()
        return z * inverse_norm


def _lag_pairs(n_lags: int) -> list[tuple[int, int]]:
    return [(s, u) for s in range(n_lags) for u in range(s + 1, n_lags)]


def _bits(n_bits: int, device: torch.device) -> Int[Tensor, "code bit"]:
    """Binary digits of 0..2^n-1, most significant first."""
    codes = torch.arange(2**n_bits, device=device)
    return (codes[:, None] >> torch.arange(n_bits - 1, -1, -1, device=device)) & 1


class Lookup(torch.autograd.Function):
    """``table[codes]`` whose backward sums the gradient per code with ``bincount`` (a small table is hit
    by every position, where index_put's accumulation is slow)."""

    @staticmethod
    def forward(ctx, table: Tensor, codes: Tensor) -> Tensor:
        ctx.save_for_backward(codes)
        ctx.n_codes = table.shape[0]
        return table[codes.long()]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (codes,) = ctx.saved_tensors
        flat_codes, flat_grad = codes.flatten().long(), grad.reshape(-1, grad.shape[-1])
        columns = [
            torch.bincount(flat_codes, weights=flat_grad[:, h], minlength=ctx.n_codes) for h in range(grad.shape[-1])
        ]
        return torch.stack(columns, dim=1).to(grad.dtype), None
