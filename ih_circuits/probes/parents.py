"""``find_parents``: the lags a model's prediction conditions on, with the evidence, the truth and the theory.

The answer is behavioural and query-side (``behavioural.py``): the lags whose resampling, seen only by the
query row's own history, moves the prediction. The report adds the plain (total) resampling effects, a
linear read-out of the query's history, the copier heads, the selector (``IHTransformer``), the true
parents when the data knows them and the selection theory's prediction when the data is an ``NGramTask``
small enough to enumerate (I~ sums over d^(window+1) histories per kernel; above ``THEORY_BUDGET_BYTES``
the theory is skipped and the report says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ih_circuits.adapters import TransformerLensAdapter
from ih_circuits.probes.behavioural import BehaviouralReport, RepresentationalReport
from ih_circuits.probes.data import ProbeData
from ih_circuits.probes.heads import CopierReport
from ih_circuits.theory import PREDICTION_KERNELS, Prediction, task_prediction

THEORY_BUDGET_BYTES = 512 * 2**20


def theory_prediction(adapter: TransformerLensAdapter, data: ProbeData) -> tuple[Prediction | None, str]:
    """The theory's prediction (``theory.task_prediction``: argmax I~ within the model's budget, with the sets
    tied with it) and a note; (None, why) when skipped.

    Budget and window: ``IHTransformer``'s max_degree and lag window; otherwise the task's number of parents
    and its window. Memory: float64 laws of d^(window+1) windows and d^(2 order) transitions per kernel.
    """
    task = data.task
    if task is None:
        return None, "skipped: the data is not an NGramTask, so there is no prior to compute I~ from"
    if adapter.parts is not None:
        budget, window = adapter.parts.config.max_degree, max(adapter.parts.config.max_lag, task.order)
    else:
        budget, window = len(task.parents), task.window
    d = task.vocab_size
    needed = 8 * PREDICTION_KERNELS * 3 * (d ** (window + 1) + d ** (2 * task.order))
    if needed > THEORY_BUDGET_BYTES:
        return None, (
            f"skipped: exact I~ at vocab {d}, window {window} enumerates {d}^{window + 1} histories per kernel "
            f"(~{needed / 2**30:.3g} GiB for {PREDICTION_KERNELS} kernels, above {THEORY_BUDGET_BYTES / 2**30:.1f} GiB)"
        )
    prediction = task_prediction(task, budget, window)
    note = f"argmax I~ over lag sets of size <= {budget} inside 1..{window}"
    if not prediction.decisive:
        tied = ", ".join(str(lags) for lags in prediction.lags[1:])
        note += f"; tied within 3 standard errors with {tied}"
    return prediction, note


@dataclass
class ParentReport:
    """The parents a model uses, with the evidence.

    Attributes:
        lags: the lags the prediction conditions on (query-side behavioural probe), sorted; () if none.
        true_parents: the data's parents, or None when the data does not know them.
        predicted: the theory's prediction, or None when it was skipped (see ``theory_note``).
        theory_note: how the prediction was made, or why it was skipped.
        tied: the lag sets the theory cannot tell from ``predicted`` (within 3 standard errors; () if none).
        behavioural, representational, copier: the probe reports.
        selector: white-box lag-set shares (``IHTransformer`` only, else None).
        config: the session's ``ProbeConfig`` in one line.
        cost: forwards of the batch the session had spent when the report was made.
    """

    lags: tuple[int, ...]
    true_parents: tuple[int, ...] | None
    predicted: tuple[int, ...] | None
    theory_note: str
    behavioural: BehaviouralReport
    representational: RepresentationalReport
    copier: CopierReport
    selector: dict[tuple[int, ...], float] | None = None
    config: str = ""
    cost: str = ""
    tied: tuple[tuple[int, ...], ...] = ()

    @property
    def uses_context(self) -> bool:
        """Whether the prediction depends on any lag by more than the behavioural floor."""
        return bool(self.lags)

    @property
    def conclusive(self) -> bool:
        """Every lag tested was decided, used or excluded (``behavioural.py``); when not, ``summary()`` says how
        many sequences would decide the rest, and the comparisons with the truth and the theory are None."""
        return self.behavioural.conclusive

    @property
    def matches_truth(self) -> bool | None:
        """Whether the lags found are the data's parents (None: no truth known, or the report is inconclusive)."""
        if self.true_parents is None or not self.conclusive:
            return None
        return self.lags == self.true_parents

    @property
    def matches_theory(self) -> bool | None:
        """Whether the lags found are the theory's prediction, or a set tied with it (None: no prediction, or
        inconclusive)."""
        if self.predicted is None or not self.conclusive:
            return None
        return self.lags in (self.predicted, *self.tied)

    @property
    def white_box_lags(self) -> tuple[int, ...] | None:
        """The lag set with the largest selector share (``IHTransformer`` only)."""
        return None if self.selector is None else next(iter(self.selector))

    @property
    def query_effects(self) -> dict[int, float]:
        """Query-side effect of each lag tested, nats."""
        return dict(zip(self.behavioural.lags, self.behavioural.query_effect, strict=True))

    @property
    def represented(self) -> bool:
        """Every used lag is linearly decodable from the query's gathered history."""
        return set(self.lags) <= set(self.representational.represented)

    def to_dataframe(self) -> pd.DataFrame:
        frame = self.behavioural.to_dataframe().merge(self.representational.to_dataframe(), on="lag")
        if self.true_parents is not None:
            frame["true_parent"] = frame["lag"].isin(self.true_parents)
        if self.predicted is not None:
            frame["predicted"] = frame["lag"].isin(self.predicted)
        return frame

    def summary(self) -> str:
        """One line per finding, in words."""
        behaviour = self.behavioural
        if not self.lags:
            lines = [f"lags=(): {behaviour.no_context_reason()}"]
        else:
            effects = ", ".join(f"lag {s} {self.query_effects[s]:.3f}" for s in self.lags)
            lines = [f"lags={self.lags} (query-side effect, nats: {effects})"]
            if not self.conclusive:
                lines.append(behaviour.inconclusive_reason())
        undecided = "undecided (inconclusive)"
        if self.true_parents is not None:
            said = undecided if self.matches_truth is None else "match" if self.matches_truth else "differ"
            lines.append(f"true parents {self.true_parents}: {said}")
        if self.predicted is None:
            lines.append(f"theory {self.theory_note}")
        else:
            said = undecided if self.matches_theory is None else "match" if self.matches_theory else "differ"
            lines.append(f"theory {self.predicted} ({self.theory_note}): {said}")
        if self.selector is not None:
            lines.append(f"white-box selector {self.white_box_lags} ({self.selector[self.white_box_lags]:.3f})")
        lines.append(f"linearly represented at {self.representational.site}: {self.representational.represented}")
        lines.append(f"history read at {behaviour.history_site}: {behaviour.site_reason}")
        lines.append(f"{self.config}; cost {self.cost}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "ParentReport(" + "; ".join(self.summary().splitlines()) + ")"

    def _repr_html_(self) -> str:
        items = "".join(f"<li>{line}</li>" for line in self.summary().splitlines())
        return f"<ul>{items}</ul>" + self.to_dataframe().to_html(index=False, float_format="%.4f")
