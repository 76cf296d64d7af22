"""``ProbeConfig``: every threshold and size the probes use, in one place, printed with every report.

The bars, and why they sit where they do:

- ``floor`` (0.01 nats): a lag's query-side KL below it is too small to call a dependence (by Pinsker, the two
  predictions differ by less than sqrt(0.01 / 2) = 7% of probability mass);
- ``threshold`` (0.2): a used lag moves the prediction by at least this fraction of the strongest lag;
- ``n_stderr`` (3): every effect must exceed this many standard errors over sequences (not sampling noise);
- ``role_lift`` (0.5): a head is a copier (induction head) when at least half of the attention that uniform
  attention would not give goes to one offset (to the keys whose history matches): lift = (mass - chance) /
  (1 - chance);
- ``shared_lift`` (0.2): a head whose own lift is below ``role_lift`` but at least this shares a copier's job
  when the heads with the same dominant offset together reach ``role_lift``;
- ``causal_share`` (0.1): a copier candidate carries its lag when patching it moves at least this share of what
  its lag moves (query side) or of the induction heads' attention on the matching keys (key side);
- ``pattern_floor`` (0.1): an induction head matches on a lag when corrupting the lag on the query side moves at
  least this much of the head's query-row attention (total variation);
- ``kl_threshold`` (0.05 nats), ``recovered_threshold`` (0.9), ``control_ratio`` (0.25): the decomposition's
  bars (see ``decomposition.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ih_circuits.checks import check_int, check_real, is_real

A_GRID = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 20.0, math.inf)


@dataclass(frozen=True)
class ProbeConfig:
    """Every threshold and size of a probe session (see the module docstring for the bars).

    Attributes:
        n_sequences: sequences drawn from a data source, one batch shared by every probe (a token tensor is
            used as given).
        seed: fixes the sequences and every resampled token.
        max_lag: lags tested for parents, 1..max_lag; default the task's window + 2, else 8 (capped to fit).
        max_offset: attention offsets scanned for head roles; default the whole context (seq_len - 1).
        query_layer: the layer whose input holds the query's history; default found (the earliest layer with an
            induction head, else 1).
        floor, threshold, n_stderr: the parents' bars.
        role_lift, shared_lift: the head roles' bars.
        causal_share: the share of a lag's effect a head must carry when patched.
        pattern_floor: per-head parents' bar (total variation of the head's query-row attention).
        kl_threshold, recovered_threshold, control_ratio: the decomposition's bars.
        top_k: heads ranked first by attribution patching that are confirmed by exact patching (per side).
        exhaustive: confirm every head by exact patching (costs about one forward per head; the report says).
        total_effect: also run every corrupted sequence to the end (the plain resampling effect); doubles the cost
            of ``parents()``.
        a_grid: the scales a tried for the plain GIH predictor (the size of the smoothing).
    """

    n_sequences: int = 256
    seed: int = 0
    max_lag: int | None = None
    max_offset: int | None = None
    query_layer: int | None = None
    floor: float = 0.01
    threshold: float = 0.2
    n_stderr: float = 3.0
    role_lift: float = 0.5
    shared_lift: float = 0.2
    causal_share: float = 0.1
    pattern_floor: float = 0.1
    kl_threshold: float = 0.05
    recovered_threshold: float = 0.9
    control_ratio: float = 0.25
    top_k: int = 4
    exhaustive: bool = False
    total_effect: bool = False
    a_grid: tuple[float, ...] = A_GRID

    def __post_init__(self) -> None:
        check_int(self.n_sequences, "n_sequences", 8)
        check_int(self.seed, "seed", 0)
        for name in ("max_lag", "max_offset"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, 1)
        if self.query_layer is not None:
            check_int(self.query_layer, "query_layer", 0)
        check_real(self.floor, "floor", 0)
        check_real(self.threshold, "threshold", 0, 1, low_open=True)
        check_real(self.n_stderr, "n_stderr", 0)
        check_real(self.role_lift, "role_lift", 0, 1, low_open=True)
        check_real(self.shared_lift, "shared_lift", 0, self.role_lift, low_open=True)
        check_real(self.causal_share, "causal_share", 0, 1, low_open=True)
        check_real(self.pattern_floor, "pattern_floor", 0, 1, low_open=True)
        check_real(self.kl_threshold, "kl_threshold", 0)
        check_real(self.recovered_threshold, "recovered_threshold", 0)
        check_real(self.control_ratio, "control_ratio", 0)
        check_int(self.top_k, "top_k", 1)
        for name in ("exhaustive", "total_effect"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if (
            not isinstance(self.a_grid, tuple)
            or not self.a_grid
            or any(not is_real(a) or not a > 0 for a in self.a_grid)
        ):
            raise ValueError(f"a_grid must be a non-empty tuple of scales > 0; got {self.a_grid!r}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        """One line: every field that differs from the default, or "defaults"."""
        defaults = ProbeConfig()
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        ]
        return "ProbeConfig(" + (", ".join(changed) if changed else "defaults") + ")"
