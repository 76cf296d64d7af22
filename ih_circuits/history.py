"""The training trajectory table (``TrainingRun.history``): its columns, and typed accessors that read them back.

One row per recorded step: ``step, stage, loss, eval_loss, bayes_loss, excess_loss`` and, for ``IHTransformer``,
``a, leading_subset, leading_lags, predicted_lags``, one ``share[h,...]`` column per selector subset (0-based heads)
and ``w[h,m]`` copier weights. ``selector_shares`` and ``copier_weights`` return them as arrays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from jaxtyping import Float, Int
from torch import nn

from ih_circuits.adapters import white_box

HISTORY_COLUMNS = (
    "step",
    "stage",
    "loss",
    "eval_loss",
    "bayes_loss",
    "excess_loss",
    "a",
    "leading_subset",
    "leading_lags",
    "predicted_lags",
)


def subset_column(subset: tuple[int, ...]) -> str:
    """History column of a selector subset: ``share[0,1]`` (heads, 0-based); ``share[]`` is the empty set."""
    return "share[" + ",".join(map(str, subset)) + "]"


def weight_column(head: int, slot: int) -> str:
    """History column of head ``head``'s copier weight on its ``slot``-th lag: ``w[h,m]`` (both 0-based)."""
    return f"w[{head},{slot}]"


_SHARE = re.compile(r"share\[([0-9,]*)\]")
_WEIGHT = re.compile(r"w\[([0-9]+),([0-9]+)\]")


@dataclass(frozen=True)
class SelectorShares:
    """The selector's shares over training: ``shares[r, k]`` is subset ``subsets[k]``'s share at ``steps[r]``."""

    steps: Int[np.ndarray, " record"]
    subsets: tuple[tuple[int, ...], ...]
    shares: Float[np.ndarray, "record subset"]


@dataclass(frozen=True)
class CopierWeights:
    """The copier's position weights over training: ``weights[r, h, m]`` is softmax(w_h)[m] at ``steps[r]``."""

    steps: Int[np.ndarray, " record"]
    weights: Float[np.ndarray, "record head slot"]


def selector_shares(history: pd.DataFrame) -> SelectorShares:
    """The ``share[...]`` columns of an ``IHTransformer`` history as an array, subsets in column order."""
    matches = [(m, c) for c in history.columns if (m := _SHARE.fullmatch(c))]
    if not matches:
        raise ValueError("history has no share[...] columns: it is not the history of an IHTransformer run")
    subsets = tuple(tuple(int(h) for h in m.group(1).split(",") if h) for m, _ in matches)
    shares = history[[c for _, c in matches]].to_numpy(dtype=np.float64)
    return SelectorShares(history["step"].to_numpy(dtype=np.int64), subsets, shares)


def copier_weights(history: pd.DataFrame) -> CopierWeights:
    """The ``w[h,m]`` columns of an ``IHTransformer`` history as a ``[record, head, slot]`` array."""
    cells = {(int(m.group(1)), int(m.group(2))): c for c in history.columns if (m := _WEIGHT.fullmatch(c))}
    if not cells:
        raise ValueError("history has no w[h,m] columns: it is not the history of an IHTransformer run")
    heads, slots = max(h for h, _ in cells) + 1, max(m for _, m in cells) + 1
    columns = [cells[(h, m)] for h in range(heads) for m in range(slots)]
    weights = history[columns].to_numpy(dtype=np.float64).reshape(len(history), heads, slots)
    return CopierWeights(history["step"].to_numpy(dtype=np.int64), weights)


def history_columns(model: nn.Module) -> list[str]:
    """The columns a trajectory row of ``model`` has (``_Evaluator.row``): the loss columns, and for an
    ``IHTransformer`` its selector, classifier and copier columns."""
    if white_box(model) is None:
        return list(HISTORY_COLUMNS[: HISTORY_COLUMNS.index("excess_loss") + 1])
    cfg = model.config
    weights = [weight_column(h, m) for h in range(cfg.n_heads) for m in range(cfg.window)]
    return [*HISTORY_COLUMNS, *(subset_column(s) for s in cfg.subsets), *weights]


def read_history(path: Path, model: nn.Module) -> pd.DataFrame:
    """A saved ``history.csv``, refused unless its columns are exactly ``history_columns(model)``, its steps
    increasing non-negative integers and its measurements numbers."""
    try:
        history = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as error:
        raise ValueError(f"{path} is not a readable CSV table: {error}") from None
    expected = history_columns(model)
    if list(history.columns) != expected:
        missing = sorted(set(expected) - set(history.columns))
        unknown = sorted(set(history.columns) - set(expected))
        raise ValueError(f"{path}: columns do not match the model: missing {missing}, unexpected {unknown}")
    steps = history["step"]
    if not pd.api.types.is_integer_dtype(steps) or (steps < 0).any() or not steps.is_monotonic_increasing:
        raise ValueError(f"{path}: step must hold increasing non-negative integers; got {steps.tolist()[:5]}...")
    numbers = [c for c in expected if c not in ("step", "stage", "leading_subset", "leading_lags", "predicted_lags")]
    measured = [c for c in numbers if c != "loss"]  # the first row has no training loss yet
    if not all(pd.api.types.is_float_dtype(history[c]) for c in numbers) or history[measured].isna().any().any():
        raise ValueError(f"{path}: the columns {numbers} must hold numbers (loss may be empty in the first row)")
    return history
