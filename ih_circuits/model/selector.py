"""The selector (PAPER.md §2.2): a normalised feature map over head subsets, evaluated as a kernel.

For every head subset S with |S| <= D (the empty set included) the feature of position i is
c_S * (Kronecker product of v_h(i), h in S). The normalised inner product of two positions is therefore

    K(i, j) = sum_S c_S^2 prod_{h in S} <v_h(i), v_h(j)>  /  sum_S c_S^2,

which we compute from the H per-head similarities G_h(i, j) = <v_h(i), v_h(j)> without ever building the
d^|S|-dimensional features. The shares c_S^2 / sum c^2 are what the theory tracks: at the generalized
induction head all the weight sits on one subset S*.
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ih_circuits.model.config import IHConfig


class Selector(nn.Module):
    """``blocks.0.mlp``: per-head similarities, per-subset products, and their c^2-weighted mean."""

    def __init__(self, cfg: IHConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.subsets = cfg.subsets
        self.c = nn.Parameter(torch.full((len(self.subsets),), cfg.c_init, dtype=cfg.torch_dtype, device=cfg.device))
        self.hook_head_similarity = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_subset_similarity = HookPoint()  # [batch, subset, query_pos, key_pos]
        self.hook_kernel = HookPoint()  # [batch, query_pos, key_pos]

    def shares(self) -> Float[Tensor, " subset"]:
        """c_S^2 / sum_S c_S^2 (all zero if every c is zero).

        Computed from c / max|c|, which leaves the shares and their gradient unchanged (they are
        scale-invariant) and keeps c^2 from overflowing for large coefficients.
        """
        tiny = torch.finfo(self.c.dtype).tiny
        squared = (self.c / self.c.detach().abs().max().clamp_min(tiny)).square()
        return squared / squared.sum().clamp_min(tiny)

    def forward(
        self, queries: Float[Tensor, "batch query_pos head d_vocab"], keys: Float[Tensor, "batch key_pos head d_vocab"]
    ) -> Float[Tensor, "batch query_pos key_pos"]:
        """K(i, j) for query positions i and key positions j, from the copier's per-head features."""
        return self.combine(torch.einsum("bqhe,bkhe->bhqk", queries, keys))

    def combine(
        self, head_similarity: Float[Tensor, "batch head query_pos key_pos"]
    ) -> Float[Tensor, "batch query_pos key_pos"]:
        """K = sum_S shares_S prod_{h in S} G_h from the per-head similarities G_h."""
        shares = self.shares()
        head_similarity = self.hook_head_similarity(head_similarity)
        products = []
        for subset in self.subsets:
            product = torch.ones_like(head_similarity[:, 0])
            for head in subset:
                product = product * head_similarity[:, head]
            products.append(product)
        # Stacked subset-major so that the share-weighted sum is one matrix-vector product.
        subset_major = torch.stack(products, dim=0)
        subset_similarity = self.hook_subset_similarity(einops.rearrange(subset_major, "s b q k -> b s q k"))
        subset_major = einops.rearrange(subset_similarity, "b s q k -> s b q k")
        return self.hook_kernel(torch.tensordot(shares, subset_major, dims=1))
