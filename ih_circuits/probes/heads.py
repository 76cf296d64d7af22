"""Head roles for any depth: copier (fixed-offset) heads and (generalized) induction heads.

Two numbers describe an attention head on data:

- its **offset profile**: mass[o] = mean attention from position t to position t - o (offset 0 = itself,
  1 = the previous token), over rows t >= max_offset; the dominant offset and its mass (the *copier
  score*). At the query row, a head with offset o reads lag o + 1 of the prediction.
- its **generalized induction score** for a lag set L: the attention mass a row t puts on keys whose value
  token (position u = key + ``value_offset``) has the same history over L as the token the row predicts,
  (x_{u-s})_{s in L} = (x_{t+1-s})_{s in L}, averaged over rows that have at least one such key. With
  L = (1,) it is the usual induction score (attend to the token after an earlier copy of the current one).
  A head attending uniformly would score the fraction of visible keys that match (``baseline``), so the
  role uses the *lift* (score - baseline) / (1 - baseline).

Roles: ``induction`` when the lift is >= 0.5 (at least half of the attention not explained by chance goes
to matching keys), else ``copier`` when the copier score is >= 0.5 at an offset >= 1 (most attention on one
fixed earlier position), else ``other``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from ih_circuits.adapters import TransformerLensAdapter, adapt


def history_table(tokens: Int[Tensor, "batch pos"], lags: tuple[int, ...]) -> Int[Tensor, "batch target lag"]:
    """hist[b, u, i] = x_{u - lags[i]} for targets u = 0..T (T: the token after the sequence); -1 if missing."""
    padded = torch.nn.functional.pad(tokens, (max(lags), 1), value=-1)
    n_target = tokens.shape[1] + 1
    return torch.stack([padded[:, max(lags) - s : max(lags) - s + n_target] for s in lags], dim=-1)


def history_matches(
    tokens: Int[Tensor, "batch pos"], lags: tuple[int, ...], rows: Int[Tensor, " row"], value_offset: int = 0
) -> Bool[Tensor, "batch row key_pos"]:
    """match[b, r, j]: key j offers token u = j + value_offset, with u <= row and complete history over ``lags``
    equal to that of the token row ``rows[r]`` predicts (position rows[r] + 1)."""
    hist = history_table(tokens, lags)
    complete = (hist >= 0).all(-1)
    n_pos = tokens.shape[1]
    keys = torch.arange(n_pos, device=tokens.device)
    targets = keys + value_offset
    valid_key = targets <= n_pos - 1
    key_hist = hist[:, targets.clamp_max(n_pos - 1)]  # [batch, key, lag]
    query_hist = hist[:, rows + 1]  # [batch, row, lag]
    same = (query_hist[:, :, None] == key_hist[:, None]).all(-1)
    visible = targets[None, :] <= rows[:, None]
    return (
        same & complete[:, rows + 1, None] & (complete[:, targets.clamp_max(n_pos - 1)] & valid_key)[:, None] & visible
    )


def offset_mass(
    pattern: Float[Tensor, "batch head query_pos key_pos"], max_offset: int
) -> Float[Tensor, "head offset"]:
    """Mean attention from row t to key t - o, for o = 0..max_offset, over rows t >= max_offset."""
    columns = [
        torch.diagonal(pattern, offset=-o, dim1=-2, dim2=-1)[..., max_offset - o :] for o in range(max_offset + 1)
    ]
    return torch.stack([c.mean((0, -1)) for c in columns], dim=-1)


def induction_scores(
    pattern: Float[Tensor, "batch head query_pos key_pos"],
    match: Bool[Tensor, "batch row key_pos"],
    rows: Int[Tensor, " row"],
    value_offset: int = 0,
) -> tuple[Float[Tensor, " head"], float, int]:
    """Per head the mean mass on matching keys over rows with a match; the uniform-attention baseline; #rows.

    Row t sees keys 0..t (ordinary causal attention), or 0..t-1 when keys offer the next token
    (``value_offset`` 1, ``IHTransformer``): t + 1 - value_offset keys, the baseline's denominator.
    """
    attention = pattern[:, :, rows]  # [batch, head, row, key]
    has_match = match.any(-1)  # [batch, row]
    if not bool(has_match.any()):
        return torch.full((pattern.shape[1],), float("nan")), float("nan"), 0
    mass = (attention * match[:, None]).sum(-1)  # [batch, head, row]
    score = mass.permute(1, 0, 2)[:, has_match].mean(-1)
    n_visible = (rows + 1 - value_offset).clamp_min(1).float()
    baseline = (match.float().sum(-1) / n_visible)[has_match].mean()
    return score, float(baseline), int(has_match.sum())


def induction_rows(n_pos: int, lags: tuple[int, ...]) -> Tensor:
    """Rows t whose predicted token has a complete history: t + 1 - max(lags) >= 0, up to the query row T-2."""
    return torch.arange(max(lags) - 1, n_pos - 1)


# ---------------------------------------------------------------------------------------------- copier


@dataclass
class CopierReport:
    """Attention of each head of the copier layer over lags (at row t, lag s is key t + 1 - s: offset s - 1).

    Attributes:
        mass: ``[head, lag]``; column s-1 is the mean attention on lag s.
        dominant_lags: per head, the lag with the most mass.
        concentration: per head, the share of its mass on the dominant lag.
        source: ``"weights"`` (read from the positional copier) or ``"patterns"`` (measured on data).
        layer: the layer probed.
    """

    mass: Float[Tensor, "head lag"]
    dominant_lags: list[int]
    concentration: list[float]
    source: str
    layer: int = 0

    @property
    def offsets(self) -> list[int]:
        """Dominant attention offset of each head (lag - 1: 0 = itself, 1 = the previous token)."""
        return [s - 1 for s in self.dominant_lags]

    def to_dataframe(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.mass.numpy(), columns=[f"lag {s + 1}" for s in range(self.mass.shape[1])])
        frame.insert(0, "head", range(len(frame)))
        frame["dominant_lag"] = self.dominant_lags
        frame["offset"] = self.offsets
        frame["concentration"] = self.concentration
        return frame

    def __repr__(self) -> str:
        heads = ", ".join(
            f"h{h}->lag {s} (offset {s - 1}, {c:.2f})"
            for h, (s, c) in enumerate(zip(self.dominant_lags, self.concentration, strict=True))
        )
        return f"CopierReport(layer {self.layer}: {heads}; from {self.source})"


def copier_report(
    adapter: TransformerLensAdapter,
    pattern: Float[Tensor, "batch head query_pos key_pos"],
    max_lag: int,
    layer: int,
    from_patterns: bool = False,
) -> CopierReport:
    """Which lag each head of ``layer`` reads at the query row: ``IHTransformer``'s positional copier from its
    weights (softmax(w_h) over its lags), any other layer from ``pattern``, the mean attention from row t to key
    t + 1 - s over rows where every lag exists (``from_patterns=True`` measures the positional copier that way
    too). A previous-token head (offset 1) reads lag 2."""
    parts = adapter.parts
    if parts is not None and layer == 0 and parts.config.copier == "positional" and not from_patterns:
        config = parts.config
        weights = parts.copier_weights().cpu()
        mass = torch.zeros(weights.shape[0], max(max_lag, config.max_lag))
        mass.scatter_add_(1, torch.tensor(config.lag_table) - 1, weights.float())
        source = "weights"
    else:
        mass = offset_mass(pattern, max_lag - 1).cpu()
        source = "patterns"
    total = mass.sum(-1).clamp_min(1e-12)
    dominant = mass.argmax(-1)
    concentration = (mass.gather(1, dominant[:, None])[:, 0] / total).tolist()
    return CopierReport(mass, (dominant + 1).tolist(), concentration, source, layer)


def selector_probe(model: nn.Module, data: object = None) -> dict[tuple[int, ...], float]:
    """White-box answer for ``IHTransformer``: selector shares summed by the lag set their heads copy.

    A head subset S maps to the set of dominant lags of its heads; the shares of subsets that map to the
    same lag set add up. The result is sorted by share, largest first. ``data`` is accepted so that every probe
    takes ``(model, data)``; the shares are read from the weights and do not depend on it.
    """
    parts = adapt(model).parts
    if parts is None:
        raise ValueError(
            "selector_probe reads the selector coefficients, which only IHTransformer has; "
            "use behavioural_probe, representational_probe or scan_heads for other models"
        )
    head_lags = parts.head_lags()
    by_lags: dict[tuple[int, ...], float] = {}
    for subset, share in parts.selector_shares().items():
        lags = tuple(sorted({head_lags[h] for h in subset}))
        by_lags[lags] = by_lags.get(lags, 0.0) + share
    return dict(sorted(by_lags.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------------------------------ classifier


@dataclass
class ClassifierReport:
    """Does the query row attend where the generalized induction head would?

    Attributes:
        lags: the history lags used for matching.
        layer: the layer probed (default the last).
        score: per head of that layer, mean attention mass of the query on matching keys.
        ideal: the ideal GIH's mass at the model's a (``IHTransformer``), 1.0 otherwise (a = inf).
        best_head: the head with the highest score.
        n_sequences: sequences with at least one matching key (the others are skipped).
    """

    lags: tuple[int, ...]
    layer: int
    score: list[float]
    ideal: float
    best_head: int
    n_sequences: int

    @property
    def induction_score(self) -> float:
        """The generalized induction score of the best head."""
        return self.score[self.best_head]

    def __repr__(self) -> str:
        return (
            f"ClassifierReport(lags={self.lags}, layer {self.layer}: induction score {self.induction_score:.3f} "
            f"(head {self.best_head}), ideal GIH {self.ideal:.3f}, {self.n_sequences} sequences)"
        )


def classifier_report(
    adapter: TransformerLensAdapter,
    tokens: Int[Tensor, "batch pos"],
    pattern: Float[Tensor, "batch head query_pos key_pos"],
    lags: tuple[int, ...],
    layer: int,
) -> ClassifierReport:
    """Attention mass of the query row (T-2) of every head of ``layer`` on keys whose history over ``lags``
    matches the query's; for ``IHTransformer`` the ideal is the GIH's mass e^a N / (e^a N + T' - N)."""
    query = tokens.shape[1] - 2
    rows = torch.tensor([query], device=tokens.device)
    match = history_matches(tokens, lags, rows, adapter.value_offset)
    score, _, n_rows = induction_scores(pattern, match, rows, adapter.value_offset)
    if n_rows == 0:
        raise ValueError(f"no sequence has a key matching the query's history over lags {lags}; use more sequences")
    ideal = _ideal_mass(adapter, match[:, 0], query) if adapter.parts is not None else 1.0
    best = int(score.argmax())
    return ClassifierReport(lags, layer, score.tolist(), ideal, best, n_rows)


def _ideal_mass(adapter: TransformerLensAdapter, match: Bool[Tensor, "batch key_pos"], query: int) -> float:
    """Mass the GIH at the model's scale a puts on the N matching keys out of T' = query visible keys."""
    n = match[match.any(-1)].sum(-1).double()
    weight = torch.exp(torch.tensor(min(adapter.parts.classifier_scale(), 700.0), dtype=torch.float64))
    return float((weight * n / (weight * n + query - n)).mean())
