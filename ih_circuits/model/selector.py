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

from ih_circuits.memory import check_memory, items_per_chunk
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

    def coefficients(self) -> Float[Tensor, " subset"]:
        """c_S / ||c||, whose squares are the shares (computed from c / max|c| like ``shares``)."""
        tiny = torch.finfo(self.c.dtype).tiny
        scaled = self.c / self.c.detach().abs().max().clamp_min(tiny)
        return scaled / scaled.norm().clamp_min(tiny)

    def feature_map(self, features: Float[Tensor, "batch pos head d_vocab"]) -> Float[Tensor, "batch pos feature"]:
        """phi(i) = concat_S (c_S / ||c||) (Kronecker product of v_h(i), h in S), so that <phi(i), phi(j)> = K(i, j).

        The width is sum_S d^|S| (37 for d = 3, H = 3, D = 2). Refused with ``MemoryBudgetError`` before it is
        built if the features (and their gradient) would exceed ``memory.memory_limit()``.
        """
        batch, n_pos, _, d_vocab = features.shape
        width = sum(d_vocab ** len(subset) for subset in self.subsets)
        check_memory(
            3 * batch * n_pos * width * features.element_size(),
            f"the selector's feature map of width {width} over {batch} x {n_pos} positions",
            "the batch size, the sequence length, max_degree or n_heads",
        )
        coefficients = self.coefficients()
        parts = []
        for index, subset in enumerate(self.subsets):
            part = coefficients[index].expand(batch, n_pos, 1)
            for head in subset:
                part = einops.rearrange(part[..., :, None] * features[..., head, None, :], "b p x e -> b p (x e)")
            parts.append(part)
        return torch.cat(parts, dim=-1)

    def forward(
        self,
        queries: Float[Tensor, "batch query_pos head d_vocab"],
        keys: Float[Tensor, "batch key_pos head d_vocab"],
        dense: bool = True,
    ) -> Float[Tensor, "batch query_pos key_pos"]:
        """K(i, j) for query positions i and key positions j, from the copier's per-head features."""
        return self.combine(torch.einsum("bqhe,bkhe->bhqk", queries, keys), dense)

    def combine(
        self, head_similarity: Float[Tensor, "batch head query_pos key_pos"], dense: bool = True
    ) -> Float[Tensor, "batch query_pos key_pos"]:
        """K = sum_S shares_S prod_{h in S} G_h from the per-head similarities G_h.

        ``dense`` builds the whole ``[batch, subset, query_pos, key_pos]`` stack for ``hook_subset_similarity``
        (refused before it is built if it would exceed ``memory.memory_limit()``). Otherwise, when the products
        of all subsets would take more than ``memory.CHUNK_BYTES``, subsets are multiplied and summed in chunks
        and recomputed in the backward pass instead of kept (``ChunkedSubsetSum``): the memory stays near one
        chunk however many subsets there are (H = 12 heads at degree 12 has 4096).
        """
        shares = self.shares()
        head_similarity = self.hook_head_similarity(head_similarity)
        per_subset = head_similarity[:, 0].numel() * head_similarity.element_size() * (self.cfg.max_degree + 2)
        if dense:
            check_memory(
                len(self.subsets) * per_subset,
                f"the selector's {len(self.subsets)} subset products over {tuple(head_similarity[:, 0].shape)}",
                "max_degree or n_heads (fewer subsets), the batch size or the sequence length",
            )
            subset_major = _products(head_similarity, self.subsets)
            subset_similarity = self.hook_subset_similarity(einops.rearrange(subset_major, "s b q k -> b s q k"))
            # Subset-major, so that the share-weighted sum is one matrix-vector product.
            subset_major = einops.rearrange(subset_similarity, "b s q k -> s b q k")
            return self.hook_kernel(torch.tensordot(shares, subset_major, dims=1))
        chunk = items_per_chunk(len(self.subsets), per_subset)
        if chunk >= len(self.subsets):
            return self.hook_kernel(_weighted_products(head_similarity, shares, self.subsets))
        return self.hook_kernel(ChunkedSubsetSum.apply(head_similarity, shares, self.subsets, chunk))


class ChunkedSubsetSum(torch.autograd.Function):
    """K = sum_S w_S prod_{h in S} G_h over chunks of subsets, keeping only G and w for the backward pass.

    dK/dw_S = prod_{h in S} G_h and dK/dG_h = sum_{S containing h} w_S prod_{g in S, g != h} G_g are
    recomputed chunk by chunk, so no [subset, ...] stack larger than one chunk ever exists.
    """

    @staticmethod
    def forward(ctx, head_similarity: Tensor, shares: Tensor, subsets: list[tuple[int, ...]], chunk: int) -> Tensor:
        ctx.save_for_backward(head_similarity, shares)
        ctx.subsets, ctx.chunk = subsets, chunk
        return _chunked_sum(head_similarity, shares, subsets, chunk)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        head_similarity, shares = ctx.saved_tensors
        subsets, chunk = ctx.subsets, ctx.chunk
        flat_grad = grad.flatten()
        # Written into one preallocated tensor: small results kept between large temporaries fragment the heap.
        grad_shares = torch.empty_like(shares)
        for start in range(0, len(subsets), chunk):
            products = _products(head_similarity, subsets[start : start + chunk])
            grad_shares[start : start + chunk] = products.flatten(1) @ flat_grad
        grad_similarity = torch.zeros_like(head_similarity)
        for head in range(head_similarity.shape[1]):
            containing = [i for i, subset in enumerate(subsets) if head in subset]
            if containing:
                others = [tuple(g for g in subsets[i] if g != head) for i in containing]
                weights = shares[torch.tensor(containing, device=shares.device)]
                grad_similarity[:, head] = grad * _chunked_sum(head_similarity, weights, others, chunk)
        return grad_similarity, grad_shares, None, None


def _chunked_sum(
    head_similarity: Float[Tensor, "batch head query_pos key_pos"],
    weights: Float[Tensor, " subset"],
    subsets: list[tuple[int, ...]],
    chunk: int,
) -> Float[Tensor, "batch query_pos key_pos"]:
    total = torch.zeros_like(head_similarity[:, 0])
    for start in range(0, len(subsets), chunk):
        total += _weighted_products(head_similarity, weights[start : start + chunk], subsets[start : start + chunk])
    return total


def _products(
    head_similarity: Float[Tensor, "batch head query_pos key_pos"], subsets: list[tuple[int, ...]]
) -> Float[Tensor, "subset batch query_pos key_pos"]:
    """prod_{h in S} G_h for each subset S, stacked subset-major."""
    products = []
    for subset in subsets:
        product = torch.ones_like(head_similarity[:, 0])
        for head in subset:
            product = product * head_similarity[:, head]
        products.append(product)
    return torch.stack(products, dim=0)


def _weighted_products(
    head_similarity: Float[Tensor, "batch head query_pos key_pos"],
    shares: Float[Tensor, " subset"],
    subsets: list[tuple[int, ...]],
) -> Float[Tensor, "batch query_pos key_pos"]:
    """sum_S shares_S prod_{h in S} G_h over the given subsets."""
    return torch.tensordot(shares, _products(head_similarity, subsets), dims=1)
