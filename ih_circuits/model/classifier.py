"""Layer 2, the classifier (PAPER.md §2.3): one softmax head that reads what followed similar histories.

The query at position t attends to the keys j < t with logit a * K(t, j); key j offers the one-hot of
token j+1 (the token that followed history j). The attention-weighted sum is already a probability vector
over the vocabulary. Row 0 has no keys and predicts the uniform distribution. With eps = ``prob_floor``
the output is p_out = (1 - eps) p + eps / d, so a token absent from the context costs at most
log(d / eps) nats instead of an infinite loss, and log-probabilities stay finite for any a.

TransformerLens sizes every layer by one ``cfg.n_heads``, so with hooks attached this layer shows H head
slots: head 0 is the classifier, heads 1..H-1 are inert (the heads of an ordinary layer with zero query,
key and value weights: uniform causal attention, zero values, zero output). The output sums the heads'
``hook_z``, so an edit to any slot flows through. Without hooks only head 0 is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ih_circuits.model.config import IHConfig


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
        eps = self.cfg.prob_floor
        return ((1.0 - eps) * z.sum(2) + eps / self.cfg.d_vocab).log()
