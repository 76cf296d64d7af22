"""Layer 2, the classifier (PAPER.md §2.3): one softmax head that reads what followed similar histories.

The query at position t attends to the keys j < t with logit a * K(t, j); key j offers the one-hot of
token j+1 (the token that followed history j). The attention-weighted sum is already a probability vector
over the vocabulary. Row 0 has no keys and predicts the uniform distribution. With eps = ``prob_floor``
the output is p_out = (1 - eps) p + eps / d, so a token absent from the context costs at most
log(d / eps) nats instead of an infinite loss, and log-probabilities stay finite for any a.

TransformerLens sizes every layer by one ``cfg.n_heads``, so with hooks attached this layer shows H head
slots: head 0 is the classifier, heads 1..H-1 are inert (the heads of an ordinary layer with zero query,
key and value weights: uniform causal attention, zero values, zero output). The output sums the heads'
``hook_z``, so an edit to any slot flows through. Without hooks only head 0 is computed, by one of two
routes that never build the [batch, query_pos, key_pos] scores (``IHTransformer`` picks one):

- ``attend``: K(t, j) = <phi(t), phi(j)> for the selector's feature map phi, so the head is causal softmax
  attention with queries a phi, keys phi and values the next tokens' one-hots, computed by the fused
  ``scaled_dot_product_attention`` kernel with a strict-past mask.
- ``from_window_row`` (one query row) and ``from_window_blocks`` (every row): K(t, j) depends only on the
  lag windows' codes c_t, c_j, so it is read from a [code, code] table. For every row, keys with the same
  (code, next token) share a score: p(e | t) = sum_c exp(a K[c_t, c]) N_t(c, e) / sum_c exp(a K[c_t, c]) N_t(c),
  with N_t(c, e) the number of keys j < t with code c followed by token e. Linear in T.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ih_circuits.model.config import IHConfig
from ih_circuits.model.copier import Lookup


class Classifier(nn.Module):
    """``blocks.1.attn``: the classifier head (head 0) with scale a, and H-1 inert head slots."""

    def __init__(self, cfg: IHConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.a = nn.Parameter(torch.tensor(cfg.a_init, dtype=cfg.torch_dtype, device=cfg.device))
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_v = HookPoint()  # [batch, pos, head, d_vocab]
        self.hook_z = HookPoint()  # [batch, pos, head, d_vocab]

    def attend(
        self, features: Float[Tensor, "batch pos feature"], embed: Float[Tensor, "batch pos d_vocab"]
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Log-probabilities at every row from the selector's feature map, by fused attention (head 0 only)."""
        d_vocab, n_pos = self.cfg.d_vocab, features.shape[1]
        # The fused CPU kernel needs one width for queries, keys and values: pad the narrower side with zeros.
        width = max(features.shape[-1], d_vocab)
        features = F.pad(features, (0, width - features.shape[-1]))
        following = F.pad(embed[:, 1:], (0, width - d_vocab, 0, 1))  # key j offers token j+1
        positions = torch.arange(n_pos, device=features.device)
        # Strict past; row 0 has no keys, so it is let see key 0 and then replaced by the uniform distribution.
        visible = (positions[None, :] < positions[:, None]) | (positions[None, :] == 0)
        z = F.scaled_dot_product_attention(
            (self.a * features)[:, None], features[:, None], following[:, None], attn_mask=visible, scale=1.0
        )[:, 0, :, :d_vocab]
        return self._floored_log(torch.where(positions[None, :, None] == 0, 1.0 / d_vocab, z))

    def from_window_row(
        self,
        kernel_table: Float[Tensor, "code code"],
        codes: Int[Tensor, "batch pos"],
        tokens: Int[Tensor, "batch pos"],
        row: int,
    ) -> Float[Tensor, "batch 1 d_vocab"]:
        """Log-probabilities at one query row, reading a K[c_row, c_j] for each key j < row from the table.

        p(e) = sum_{j<row} exp(s_j) [x_{j+1} = e] / sum_{j<row} exp(s_j) with s_j = a K[c_row, c_j] shifted by
        its largest value, so any a gives finite, exact weights. Cost O(batch x row).
        """
        d_vocab, batch, n_codes = self.cfg.d_vocab, codes.shape[0], kernel_table.shape[0]
        if row < 1:
            uniform = torch.full((batch, 1, d_vocab), 1.0 / d_vocab, dtype=kernel_table.dtype, device=codes.device)
            return self._floored_log(uniform)
        pair_codes = codes[:, row, None] * n_codes + codes[:, :row]
        scores = self.a * Lookup.apply(kernel_table.reshape(-1, 1), pair_codes)[..., 0]
        weights = (scores - scores.detach().amax(-1, keepdim=True)).exp()
        numerator = weights.new_zeros(batch, d_vocab).scatter_add(1, tokens[:, 1 : row + 1], weights)
        return self._floored_log(numerator / numerator.sum(-1, keepdim=True))[:, None]

    def from_window_blocks(
        self,
        kernel_table: Float[Tensor, "code code"],
        codes: Int[Tensor, "batch pos"],
        embed: Float[Tensor, "batch pos d_vocab"],
        block: int,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Log-probabilities at every row from K tabulated over window codes, in blocks of ``block`` positions.

        With E[q, c] = exp(a K[q, c] - max_c' a K[q, c']) and y_j the one-hot of token j+1, the numerator of row t
        in block k is sum_{j<t} E[c_t, c_j] y_j = E[c_t] @ N_k + sum_{kB<=j<t} E[c_t, c_j] y_j, where N_k[c, e]
        counts the keys before the block: a [code, d] matrix per block, and a [block, block] one inside it.
        Cost O(batch T (codes d + block)). Each row's weights are at least exp(-spread) with spread the largest
        a (max K - min K) of a table row; the caller keeps that spread small enough not to underflow.
        """
        batch, n_pos, d_vocab = embed.shape
        n_codes = kernel_table.shape[0]
        scores = self.a * kernel_table
        weights = (scores - scores.detach().amax(-1, keepdim=True)).exp()  # E[q, c] in (0, 1]
        n_blocks = -(-n_pos // block)
        pad = n_blocks * block - n_pos  # padded keys come after every real query: never visible
        following = F.pad(embed[:, 1:], (0, 0, 0, 1 + pad))
        codes = F.pad(codes, (0, pad))
        key_slots = (torch.arange(n_blocks * block, device=codes.device) // block) * n_codes + codes
        per_block = torch.zeros(batch, n_blocks * n_codes, d_vocab, dtype=embed.dtype, device=embed.device)
        per_block = per_block.scatter_add_(1, key_slots[..., None].expand(-1, -1, d_vocab), following)
        per_block = einops.rearrange(per_block, "b (k c) e -> b k c e", c=n_codes)
        before_block = per_block.cumsum(1) - per_block
        query_rows = einops.rearrange(F.embedding(codes, weights), "b (k q) c -> b k q c", q=block)
        numerator = query_rows @ before_block  # [batch, block index, query in block, d]
        block_codes = einops.rearrange(codes, "b (k q) -> b k q", q=block)
        pair_codes = block_codes[..., :, None] * n_codes + block_codes[..., None, :]
        pairs = Lookup.apply(weights.reshape(-1, 1), pair_codes)[..., 0]
        earlier = torch.ones(block, block, dtype=torch.bool, device=codes.device).tril(-1)
        keys_in_block = einops.rearrange(following, "b (k q) e -> b k q e", q=block)
        numerator = numerator + torch.where(earlier, pairs, 0.0) @ keys_in_block
        numerator = einops.rearrange(numerator, "b k q e -> b (k q) e")[:, :n_pos]
        has_keys = (torch.arange(n_pos, device=codes.device) >= 1)[None, :, None]
        total = numerator.sum(-1, keepdim=True)
        probs = torch.where(has_keys, numerator / torch.where(has_keys, total, 1.0), 1.0 / d_vocab)
        return self._floored_log(probs)

    def _floored_log(self, probs: Float[Tensor, "*rows d_vocab"]) -> Float[Tensor, "*rows d_vocab"]:
        """log((1 - eps) p + eps / d)."""
        eps = self.cfg.prob_floor
        return ((1.0 - eps) * probs + eps / self.cfg.d_vocab).log()

    def forward(
        self,
        kernel: Float[Tensor, "batch query_pos key_pos"],
        embed: Float[Tensor, "batch key_pos d_vocab"],
        rows: Int[Tensor, " query_pos"],
        dense: bool,
    ) -> Float[Tensor, "batch query_pos d_vocab"]:
        """Log-probabilities of the next token at the query positions ``rows`` (all H head slots if ``dense``)."""
        n_slots = self.cfg.n_heads if dense else 1
        keys = torch.arange(embed.shape[1], device=embed.device)
        visible = keys[None, :] < rows[:, None]  # [query_pos, key_pos]
        # Head 0 scores a K(t, j); the inert slots score 0 (zero padding along the head axis).
        scores = F.pad((self.a * kernel)[:, None], (0, 0, 0, 0, 0, n_slots - 1)).masked_fill(~visible, float("-inf"))
        scores = self.hook_attn_scores(scores)
        has_keys = visible.any(-1)[None, None, :, None]
        pattern = torch.where(has_keys, torch.softmax(torch.where(has_keys, scores, 0.0), dim=-1), 0.0)
        pattern = self.hook_pattern(pattern)
        following = F.pad(embed[:, 1:], (0, 0, 0, 1))  # key j offers token j+1; the last key offers nothing
        values = F.pad(following[:, :, None], (0, 0, 0, n_slots - 1))  # [batch, key_pos, head, d_vocab]
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, self.hook_v(values))
        first_row = ~has_keys[:, 0, :, :, None] & (torch.arange(n_slots, device=z.device) == 0)[:, None]
        z = self.hook_z(torch.where(first_row, 1.0 / self.cfg.d_vocab, z))
        return self._floored_log(z.sum(2))
