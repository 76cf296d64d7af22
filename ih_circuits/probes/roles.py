"""Head roles, defined once for ``scan_heads``, the decomposition and the views.

From attention, relative to chance (uniform attention over the t + 1 visible keys of row t):

- **offset profile**: over every offset o = 0..T-1 (the whole context), the attention rows t >= o put on key
  t - o. The *dominant offset* is the one that explains the most attention summed over the rows (so a head that
  attends to position 0 from every row spreads over all offsets instead of scoring 1 at the last offset, which
  only the last row has); its *copier score* is the mean attention on it over the rows where it exists, and its
  *copier lift* (score - chance) / (1 - chance), with chance the mean of 1 / (t + 1) over those rows. A head
  that copies several lags at once is listed under every offset that takes a share of its attention (over all
  rows) lifted >= ``shared_lift`` above chance (``offsets``): the decomposition looks for the copiers of each
  offset it needs there.
- **induction lift** for a lag set L: the mass on keys whose history over L matches the token the row predicts,
  lifted over the fraction of visible keys that match (``heads.induction_scores``).

Roles (``assign_roles``): ``induction`` when the induction lift is >= ``role_lift``; else ``copier`` when the
dominant offset is >= 1 and the copier lift is >= ``role_lift``, or when the head's lift is >= ``shared_lift``
and the heads with the same dominant offset and such a lift together reach ``role_lift`` (heads that share the
job, listed in ``shared_with``); else ``other``. Induction heads sit in layers >= 1 (layer 0 has not gathered
any history to match). Causes overrule attention: a copier candidate that exact patching tested, alone and with
the heads sharing its job, and that carries less than ``causal_share`` of its lag's effect is ``other`` (it attends
to an offset but what it writes is not used); a head too diffuse to be a candidate whose patch at its dominant
offset carries at least ``causal_share`` is a ``copier`` by patching.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ih_circuits.probes.config import ProbeConfig


def offset_profile(
    pattern: Float[Tensor, "batch head query_pos key_pos"],
) -> tuple[Float[Tensor, "head offset"], Float[Tensor, "head offset"], Float[Tensor, " offset"]]:
    """Per head and offset o: attention summed over rows t >= o (mean over the batch), the mean over those rows,
    and the chance level mean_t 1 / (t + 1) (row t of causal attention sees t + 1 keys)."""
    n_pos = pattern.shape[-1]
    summed, mean, chance = [], [], []
    visible = torch.arange(1, n_pos + 1, device=pattern.device).float()
    for offset in range(n_pos):
        column = torch.diagonal(pattern, offset=-offset, dim1=-2, dim2=-1).mean(0)  # [head, rows t >= offset]
        summed.append(column.sum(-1))
        mean.append(column.mean(-1))
        chance.append((1 / visible[offset:]).mean())
    return torch.stack(summed, -1), torch.stack(mean, -1), torch.stack(chance)


def offset_table(
    patterns: dict[int, Float[Tensor, "batch head query_pos key_pos"]], max_offset: int, min_lift: float
) -> pd.DataFrame:
    """One row per (layer, head): dominant offset in 0..max_offset, copier score and lift (module docstring), and
    ``offsets``: every offset o >= 1 that takes a share of the head's attention over all rows lifted >= ``min_lift``
    above uniform attention's share, mapped to the head's mean attention there (a head may copy several lags at
    once, e.g. half its attention on offset 1 and a third on offset 2)."""
    records = []
    for layer, pattern in patterns.items():
        summed, mean, chance = offset_profile(pattern)
        summed, mean, chance = summed[:, : max_offset + 1].cpu(), mean[:, : max_offset + 1].cpu(), chance.cpu()
        n_pos = pattern.shape[-1]
        lifts = (mean - chance[: max_offset + 1]) / (1 - chance[: max_offset + 1]).clamp_min(1e-12)
        # Shares of all the head's attention (every row), so that an offset only the last rows have (where a
        # head attending to position 0 lands) cannot qualify on a handful of rows.
        rows = n_pos - torch.arange(max_offset + 1)
        share_chance = chance[: max_offset + 1] * rows / n_pos
        share_lifts = (summed / n_pos - share_chance) / (1 - share_chance).clamp_min(1e-12)
        for head in range(pattern.shape[1]):
            offset = int(summed[head].argmax())
            served = (share_lifts[head, 1:] >= min_lift).nonzero()[:, 0] + 1
            records.append(
                {
                    "layer": layer,
                    "head": head,
                    "offset": offset,
                    "reads_lag": offset + 1,
                    "copier_score": float(mean[head, offset]),
                    "copier_lift": float(lifts[head, offset]),
                    "offsets": {int(o): round(float(mean[head, o]), 4) for o in served},
                }
            )
    return pd.DataFrame(records)


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def assign_roles(
    frame: pd.DataFrame, config: ProbeConfig, causal: dict[tuple[int, int], tuple[float, tuple[int, ...]]] | None = None
) -> pd.DataFrame:
    """Add ``role``, ``shared_with`` and ``evidence`` to a table with ``offset``, ``offsets``, ``copier_lift`` and
    ``induction_lift`` columns (module docstring). ``causal`` maps a patched head to the largest share of its lag's
    effect that patching it (alone or with the heads sharing its job) moved, and the offsets that patch tested
    (key side: every lag of the parents; query side for lag s: s - 1). A copier candidate by attention is kept
    only if its share is >= ``causal_share``; a head whose attention is too diffuse for a candidate becomes a
    copier by patching when its dominant offset is one the patch tested and its share clears the bar (its
    ``offsets`` then lists that offset)."""
    frame = frame.copy()
    induction = (frame["induction_lift"].fillna(-1.0) >= config.role_lift) & (frame["layer"] >= 1)
    candidate = ~induction & (frame["offset"] >= 1) & (frame["copier_lift"] >= config.shared_lift)
    group_lift = frame[candidate].groupby("offset")["copier_lift"].sum()
    causal = causal or {}
    roles, evidence, served = [], [], []
    for i, row in enumerate(frame.itertuples()):
        key = (int(row.layer), int(row.head))
        share, tested = causal.get(key, (None, ()))
        offsets = row.offsets
        if induction.iloc[i]:
            role, why = "induction", "attention"
        elif candidate.iloc[i] and (row.copier_lift >= config.role_lift or group_lift[row.offset] >= config.role_lift):
            role, why = "copier", "attention"
            if share is not None:
                carried = share >= config.causal_share
                role, why = ("copier", "attention and patching") if carried else ("other", "patching: carries nothing")
        elif share is not None and share >= config.causal_share and row.offset >= 1 and row.offset in tested:
            role, why = "copier", "patching"
            offsets = {**offsets, int(row.offset): round(float(row.copier_score), 4)}
        else:
            role, why = "other", "attention"
        roles.append(role)
        evidence.append(why)
        served.append(offsets)
    frame["offsets"] = served
    copiers = [
        (int(r.layer), int(r.head), int(r.offset))
        for r, role in zip(frame.itertuples(), roles, strict=True)
        if role == "copier"
    ]
    shared = [
        " + ".join(head_name(lyr, hd) for lyr, hd, o in copiers if o == r.offset and (lyr, hd) != (r.layer, r.head))
        if role == "copier"
        else ""
        for r, role in zip(frame.itertuples(), roles, strict=True)
    ]
    frame["role"] = roles
    frame["shared_with"] = shared
    frame["evidence"] = evidence
    return frame
