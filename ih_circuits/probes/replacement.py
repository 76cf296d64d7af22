"""The decomposition by replacement for any TransformerLens model: swap the heads' attention for the ideal parts.

Through each head's output, as if its pattern were replaced (``replacement_hooks``; every row of the heads named):

- **copier**: each copier head's pattern becomes the exact copier of the needed offsets it serves, row t
  attending to keys t - o only, in the proportions of its own attention there (one-hot for a head with one
  offset; rows t < o keep their own attention: there is no key t - o);
- **classifier**: each induction head's pattern becomes the ideal GIH attention on the found lags L,
  softmax over the visible keys j <= t of a [hist_L(j) = hist_L(t + 1)] (uniform when no key matches), with a
  fitted per head from its own attention at the query row: a head with mass m on the N matching keys out of V
  visible keys has e^a = m (V - N) / (N (1 - m)) (the GIH's mass e^a N / (e^a N + V - N) solved for a); the
  median over sequences, capped at ``A_MAX`` (``IHTransformer``'s classifier uses the same pattern at its own a);
- **all**: both at once.

Each replacement restarts from the first layer it touches; the prediction at the query row is compared with the
model's (``decomposition._Scorer``). What the heads' OV circuits and the unembedding add beyond a plain average of
next tokens is measured apart: the KL between the model and the best plain GIH predictor on L over ``a_grid``
(the size of the smoothing).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Float64, Int
from torch import Tensor

from ih_circuits.probes.causal import Head
from ih_circuits.probes.heads import history_matches

A_MAX = 30.0


def copier_pattern(n_pos: int, weights: dict[int, float], device: torch.device) -> Float[Tensor, "query_pos key_pos"]:
    """The exact copier of the offsets in ``weights``: row t attends to key t - o with weight w_o / sum(w) (one-hot
    for one offset); NaN rows (t < max offset) mean "keep the model's"."""
    total = sum(weights.values())
    pattern = torch.zeros(n_pos, n_pos, device=device)
    for offset, weight in weights.items():
        rows = torch.arange(offset, n_pos, device=device)
        pattern[rows, rows - offset] += weight / total
    pattern[: max(weights)] = float("nan")
    return pattern


def all_matches(
    tokens: Int[Tensor, "batch pos"], lags: tuple[int, ...], value_offset: int = 0
) -> Bool[Tensor, "batch query_pos key_pos"]:
    """match[b, t, j]: key j's token has the same complete history over ``lags`` as the token row t predicts."""
    rows = torch.arange(tokens.shape[1], device=tokens.device)
    return history_matches(tokens, lags, rows, value_offset)


def gih_pattern(
    match: Bool[Tensor, "batch query_pos key_pos"], a: float, value_offset: int = 0
) -> Float64[Tensor, "batch query_pos key_pos"]:
    """softmax over the visible keys of a [match] (uniform over them when none matches), a finite; key j is
    visible from row t when the token it offers, j + ``value_offset``, is: j <= t - value_offset. A row with no
    visible key (row 0 of ``IHTransformer``'s classifier) is all zeros."""
    n_pos = match.shape[-1]
    visible = torch.ones(n_pos, n_pos, dtype=torch.bool, device=match.device).tril(-value_offset)
    seen = visible.any(-1)[:, None]
    scores = torch.where(match, a, 0.0).double().masked_fill(~visible, float("-inf"))
    return torch.softmax(torch.where(seen, scores, 0.0), dim=-1) * seen


def fitted_scale(
    row_pattern: Float[Tensor, "batch key_pos"], match: Bool[Tensor, "batch key_pos"], visible: int
) -> float:
    """The a at which the GIH puts the head's own mass on the matching keys (module docstring), median over
    sequences with a match; ``A_MAX`` when the head puts (almost) everything there."""
    has = match.any(-1)
    if not bool(has.any()):
        return A_MAX
    mass = (row_pattern * match).sum(-1)[has].double().clamp(1e-9, 1 - 1e-9)
    n = match.sum(-1)[has].double()
    rest = (visible - n).clamp_min(1)
    a = torch.log(mass * rest / (n * (1 - mass)))
    return float(a.median().clamp(0.0, A_MAX))


def replacement_hooks(replacements: dict[Head, Tensor]) -> list[tuple[str, object]]:
    """Hooks giving head (l, h) the attention ``replacements[(l, h)]`` (``[query, key]`` or ``[batch, query, key]``;
    NaN rows keep the model's).

    The head's output is rewritten, not its pattern: ``blocks.{l}.attn.hook_v`` keeps the values of this run and
    ``hook_z`` becomes z[b, t, h] = sum_j A[b, t, j] v[b, j, h] on the replaced rows, which is what attention
    computes from a pattern A. Written this way because some TransformerLens versions fire ``hook_pattern`` after
    the wrapped module has used the pattern (TL 3.x's ``TransformerBridge`` discards an edit there without a word).
    Grouped-query values (fewer value heads than heads) are shared as the model shares them."""
    by_layer: dict[int, dict[int, Tensor]] = {}
    for (layer, head), pattern in replacements.items():
        by_layer.setdefault(layer, {})[head] = pattern
    hooks: list[tuple[str, object]] = []
    for layer, heads in sorted(by_layer.items()):
        values: dict[str, Tensor] = {}

        def keep(v: Tensor, hook: object, values: dict[str, Tensor] = values) -> None:
            values["v"] = v

        def rewrite(z: Tensor, hook: object, heads: dict[int, Tensor] = heads, values: dict[str, Tensor] = values):
            v = values.pop("v")
            group = z.shape[2] // v.shape[2]
            z = z.clone()
            for head, ideal in heads.items():
                ideal = ideal.to(z.dtype).expand(z.shape[0], z.shape[1], v.shape[1])
                written = torch.einsum("bqk,bkd->bqd", ideal.nan_to_num(), v[:, :, head // group])
                z[:, :, head] = torch.where(ideal[..., :1].isnan(), z[:, :, head], written)
            return z

        hooks += [(f"blocks.{layer}.attn.hook_v", keep), (f"blocks.{layer}.attn.hook_z", rewrite)]
    return hooks
