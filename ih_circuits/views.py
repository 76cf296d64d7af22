"""Pictures of everything the package computes: circuitsvis attention views and matplotlib figures.

Attention views embed circuitsvis's JavaScript bundle (its ``local_src``), so they render offline, in
Jupyter and in saved files; they never ask the network (circuitsvis's own ``_repr_html_`` probes the
internet to choose a CDN). Element ids are deterministic. matplotlib and circuitsvis are imported inside
the functions, so ``import ih_circuits`` stays quick. Figures are returned as matplotlib ``Figure``s;
``figure_data_uri`` turns one into an embeddable PNG or SVG.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor, nn

from ih_circuits.chain import history_codes, validate_lags
from ih_circuits.checkpoint import atomic_write_text
from ih_circuits.checks import check_int
from ih_circuits.history import copier_weights, selector_shares
from ih_circuits.probes import DecompositionReport, ParentReport, ProbeConfig, ProbeSession
from ih_circuits.seeds import derive_seed
from ih_circuits.task import NGramTask

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_ID = re.compile(r"circuits-vis-[0-9a-f-]+")


@dataclass
class HTMLView:
    """Self-contained HTML (JavaScript inlined) that Jupyter displays and ``save`` writes to a file."""

    html: str

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        """The view's headings and size, not the inlined bundle (megabytes of JavaScript)."""
        headings = [html.unescape(h) for h in re.findall(r"<h[1-6]>(.*?)</h[1-6]>", self.html.split("<script", 1)[0])]
        size = len(self.html.encode()) / 1e6
        return f"HTMLView({'; '.join(headings) or 'no heading'}; {size:.1f} MB, shown by Jupyter)"

    def save(self, path: str | Path) -> Path:
        """Write a standalone HTML page (atomically)."""
        return atomic_write_text(
            path, f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{self.html}</body></html>"
        )


def circuitsvis_bundle() -> str:
    """circuitsvis's browser bundle (defines the global ``CircuitsVis``), safe to inline in a <script>."""
    import circuitsvis

    bundle = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return bundle.read_text(encoding="utf-8").replace("</script>", "")


def render_calls(views: list[tuple[str, str, dict[str, Any]]]) -> str:
    """Containers and render calls for (element id, circuitsvis component, props); needs the bundle loaded.

    ``<`` in the props is written as ``\\u003c`` so that no token text can close the <script> early.
    """
    from circuitsvis.utils.convert_props import convert_props

    parts = []
    for element_id, component, props in views:
        props_js = convert_props(props).replace("<", "\\u003c")
        parts.append(
            f'<div id="{element_id}" class="cv-view" style="margin: 15px 0;"></div>\n'
            f'<script type="module">CircuitsVis.render("{element_id}", CircuitsVis.{component}, '
            f"{props_js});</script>"
        )
    return "\n".join(parts)


@dataclass
class AttentionData:
    """What an attention view shows: patterns, token labels and head names."""

    component: str
    props: dict[str, Any]
    title: str


def attention_data(
    model: nn.Module,
    tokens: torch.Tensor,
    layer: int,
    task: NGramTask | None = None,
    *,
    last: int = 32,
    lags: tuple[int, ...] | None = None,
    roles: pd.DataFrame | None = None,
) -> AttentionData:
    """Patterns of one layer (any layer, any TransformerLens model) on one sequence, cut to the last ``last``
    positions.

    Heads are named by their dominant offset on this sequence (0 = itself, 1 = the previous token), or, for
    ``IHTransformer``'s copier, by the lag they copy. The last row predicts the token after the sequence; the
    keys offering a token whose history over ``lags`` (default the task's parents) matches that next token's are
    marked with ``*``: they are where an induction head's last row attends (for ``IHTransformer`` key j holds
    token j+1, so the mark sits on j). Titles tell the paper's story only for ``IHTransformer``. ``roles`` (a
    ``ProbeSession.heads()`` table) names heads by their role from the session's batch instead
    (``L0H1 copier (offset 1)``, ``L1H0 induction``): the same roles ``scan_heads`` and the decomposition use.
    """
    from ih_circuits.adapters import adapt
    from ih_circuits.probes.heads import copier_report, history_matches
    from ih_circuits.probes.roles import offset_table

    adapter = adapt(model)
    adapter.check_layer(layer, "layer")
    if lags is not None:
        lags = validate_lags(lags, "lags")
    check_int(last, "last", 1)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError(
            f"tokens must be one sequence, [pos] or [1, pos]; got shape {tuple(tokens.shape)}: pick one, e.g. tokens[0]"
        )
    tokens = tokens.to(adapter.device)
    pattern = adapter.patterns(tokens, layer)[0]
    n_pos = tokens.shape[1]
    start = max(0, n_pos - last)
    labels = [f"{t}:{int(x)}" for t, x in enumerate(tokens[0].tolist())]
    ours = adapter.parts is not None
    if roles is not None:
        chosen = roles[roles["layer"] == layer]
        heads = [
            f"L{layer}H{int(r.head)} {r.role}" + ("" if r.role == "induction" else f" (offset {int(r.offset)})")
            for r in chosen.itertuples()
        ]
        title = f"Layer {layer} attention of {adapter.name} (heads named by their role)"
    elif ours and layer == 0:
        copier_lags = (
            copier_report(adapter, pattern[None], adapter.parts.config.max_lag, 0).dominant_lags
            if task is not None
            else None
        )
        heads = [f"head {h}" + (f" (lag {copier_lags[h]})" if copier_lags else "") for h in range(pattern.shape[0])]
        title = "Layer 0 (copier): each head attends to one lag"
    elif ours:
        heads = [f"head {h}" for h in range(pattern.shape[0])]
        title = "Layer 1 (classifier): each row attends to the keys whose parent history matches its next token's"
    else:
        offsets = offset_table({layer: pattern[None]}, n_pos - 1, ProbeConfig.shared_lift)["offset"].tolist()
        heads = [f"L{layer}H{h} (offset {o})" for h, o in enumerate(offsets)]
        title = f"Layer {layer} attention of {adapter.name} (heads named by their dominant offset)"
    lags = lags if lags is not None else (task.parents if task is not None else None)
    if lags:
        # The last row predicts the token after the sequence: history_matches knows its history (target T).
        rows = torch.tensor([n_pos - 1], device=tokens.device)
        match = history_matches(tokens, tuple(lags), rows, adapter.value_offset)[0, 0]
        for key in torch.nonzero(match).flatten().tolist():
            labels[key] += "*"
        title += f"; * marks the keys whose history over lags {tuple(lags)} matches that of the last row's next token"
    window = pattern[:, start:, start:]
    props = {"tokens": labels[start:], "attention": window.cpu(), "attentionHeadNames": heads, "maskUpperTri": True}
    return AttentionData("AttentionHeads", props, title)


def attention_view(
    model: nn.Module,
    tokens: torch.Tensor,
    layer: int = 0,
    task: NGramTask | None = None,
    *,
    last: int = 32,
    lags: tuple[int, ...] | None = None,
    roles: pd.DataFrame | None = None,
) -> HTMLView:
    """A circuitsvis attention view of one layer (see ``attention_data``), with its JavaScript inlined."""
    data = attention_data(model, tokens, layer, task, last=last, lags=lags, roles=roles)
    element = f"ih-attention-layer{layer}"
    page = f"<h4>{html.escape(data.title)}</h4><script>{circuitsvis_bundle()}</script>" + render_calls(
        [(element, data.component, data.props)]
    )
    return HTMLView(page)


def session_view(session: ProbeSession, layer: int, *, last: int = 32) -> HTMLView:
    """The attention view of ``layer`` on the session's first sequence, heads named by the session's roles and
    keys marked for its found parents (else lag 1)."""
    lags = session.behaviour.used_lags or (1,)
    roles = session.heads(lags)
    return attention_view(session.model, session.tokens[:1], layer, last=last, lags=lags, roles=roles)


SHOWCASE_CANDIDATES = 64
"""Sequences drawn to pick the example sequence from."""
SHOWCASE_LENGTH = 32
"""Tokens in the report's example (the attention views show them all), or the task's length if shorter."""


def showcase_sequence(task: NGramTask, seed: int = 0) -> Int[Tensor, "1 pos"]:
    """An example sequence for attention views (the report's): one where the last row's history recurs a few times.

    The first ``SHOWCASE_LENGTH`` tokens of ``SHOWCASE_CANDIDATES`` draws are candidates. The last row of a view
    predicts the token after the sequence; the earlier positions sharing that token's parent history are the
    keys a GIH attends to (marked * in the views). Of the candidates with at least two such keys, the one with the
    fewest wins, then the one with the most distinct parent histories (then the first): the classifier's attention
    splits over a few marked keys, about 1/k each for k keys once its scale a has grown, and shows as clearly
    coloured cells instead of spreading thin over a near-constant sequence. Without such a candidate, the one with
    the most matching keys.
    """
    drawn = task.sample(SHOWCASE_CANDIDATES, seed=derive_seed(seed, "report")).tokens
    tokens = drawn[:, : min(SHOWCASE_LENGTH, drawn.shape[1])]
    codes = history_codes(tokens, task.parents, task.vocab_size)
    n_pos = tokens.shape[1]
    earlier = codes[:, :n_pos]
    matches = ((earlier == codes[:, n_pos : n_pos + 1]) & (earlier >= 0)).sum(-1)
    ordered = earlier.sort(-1).values
    first_of_value = torch.ones_like(ordered, dtype=torch.bool)
    first_of_value[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    distinct = (first_of_value & (ordered >= 0)).sum(-1)
    eligible = matches >= 2
    if bool(eligible.any()):
        score = torch.where(eligible, -matches * (n_pos + 1) + distinct, -((n_pos + 1) ** 2))
    else:
        score = matches
    return tokens[int(score.argmax())][None]


def figure_data_uri(figure: Figure, format: str = "png") -> str:
    """``data:`` URI of a matplotlib figure (PNG at 110 dpi, or SVG)."""
    if format not in ("png", "svg"):
        raise ValueError(f"format must be 'png' or 'svg'; got {format!r}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format=format, dpi=110, bbox_inches="tight")
    mime = "image/png" if format == "png" else "image/svg+xml"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _figure(width: float = 6.0, height: float = 3.2, ncols: int = 1, nrows: int = 1, layout: str = "constrained"):
    """A new figure that is closed at once: returned to the caller, never left open in pyplot's state.

    Its axes come as one flat array, row by row; ``layout`` is matplotlib's (``"constrained"``, the default, keeps
    every label inside the figure and apart from the others).
    """
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, layout=layout)
    plt.close(figure)
    return figure, axes.flatten()


def _heads_label(subset: tuple[int, ...]) -> str:
    """``heads {0,1}`` (0-based heads, README glossary); ``heads {}`` for the empty subset."""
    return "heads {" + ",".join(map(str, subset)) + "}"


def plot_copier_weights(history: pd.DataFrame, lag_table: list[list[int]] | None = None) -> Figure:
    """Copier position weights softmax(w_h) as head x lag heatmaps, at the first and last recorded step.

    With a staggered ``lag_table`` (``model.config.lag_table``) heads see different lags: columns are then
    window slots and each head's row label lists its lags.
    """
    staggered = lag_table is not None and any(row != lag_table[0] for row in lag_table)
    trajectory = copier_weights(history)
    figure, axes = _figure(7.5, 2.8, ncols=2)
    for axis, (label, record) in zip(axes, [("before", 0), ("after", -1)], strict=True):
        weights = trajectory.weights[record]
        image = axis.imshow(weights, vmin=0, vmax=1, cmap="Blues")
        axis.set_title(f"{label} (step {int(trajectory.steps[record])})")
        columns = [f"slot {m + 1}" if staggered else f"lag {m + 1}" for m in range(weights.shape[1])]
        rows = [
            f"head {h}" + (f" (lags {lag_table[h][0]}-{lag_table[h][-1]})" if staggered else "")
            for h in range(weights.shape[0])
        ]
        axis.set_xticks(range(weights.shape[1]), columns)
        axis.set_yticks(range(weights.shape[0]), rows)
        for (h, m), value in np.ndenumerate(weights):
            axis.text(m, h, f"{value:.2f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=list(axes), shrink=0.8)
    return figure


def plot_selector_shares(history: pd.DataFrame, top: int = 5) -> Figure:
    """Selector shares c_S^2 / sum c^2 over training, the subsets that ever led (the paper's main figure)."""
    trajectory = selector_shares(history)
    leaders = sorted(range(len(trajectory.subsets)), key=lambda k: -trajectory.shares[:, k].max())[:top]
    figure, (axis,) = _figure()
    for k in leaders:
        axis.plot(trajectory.steps, trajectory.shares[:, k], label=_heads_label(trajectory.subsets[k]))
    axis.set_xlabel("step")
    axis.set_ylabel("share")
    axis.set_ylim(-0.02, 1.02)
    axis.legend(fontsize=8)
    axis.set_title("Selector shares over training")
    return figure


def plot_final_shares(history: pd.DataFrame) -> Figure:
    """Selector shares at the last recorded step, one bar per subset."""
    trajectory = selector_shares(history)
    figure, (axis,) = _figure(6.0, 2.8)
    labels = ["{" + ",".join(map(str, subset)) + "}" for subset in trajectory.subsets]
    axis.bar(labels, trajectory.shares[-1], color="tab:blue")
    axis.set_xlabel("subset of heads (0-based)")
    axis.set_ylabel("final share")
    axis.set_ylim(0, 1.05)
    axis.tick_params(axis="x", labelrotation=45)
    return figure


def plot_scale(history: pd.DataFrame) -> Figure:
    """The classifier scale a over training."""
    figure, (axis,) = _figure(6.0, 2.8)
    axis.plot(history["step"], history["a"], color="tab:purple")
    axis.set_xlabel("step")
    axis.set_ylabel("a")
    axis.set_title("Classifier scale")
    return figure


def plot_losses(history: pd.DataFrame) -> Figure:
    """Evaluation loss with the Bayes floor, and the excess loss over Bayes (log scale)."""
    figure, axes = _figure(9.0, 3.0, ncols=2)
    axes[0].plot(history["step"], history["eval_loss"], label="model")
    axes[0].axhline(history["bayes_loss"].iloc[0], color="black", linestyle="--", label="Bayes")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss (nats)")
    axes[0].legend(fontsize=8)
    axes[1].semilogy(history["step"], history["excess_loss"].clip(lower=1e-6), color="tab:red")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("excess loss over Bayes")
    return figure


def plot_parent_effects(report: ParentReport) -> Figure:
    """Query-side effect of resampling each lag (±2 stderr; the total effect as a black tick where it was
    measured), with the linear-probe accuracy. Green bars are the true parents when the data knows them, else the
    used lags."""
    frame = report.to_dataframe()
    figure, axes = _figure(9.0, 3.0, ncols=2)
    marked = frame["true_parent"] if "true_parent" in frame else frame["used"]
    colors = ["tab:green" if p else "tab:gray" for p in marked]
    axes[0].bar(frame["lag"], frame["query_effect"], yerr=2 * frame["query_stderr"], color=colors)
    if "total_effect" in frame:
        axes[0].plot(frame["lag"], frame["total_effect"], "k_", markersize=20, label="total effect")
        axes[0].legend(fontsize=8)
    axes[0].set_xlabel("lag (green: " + ("true parent)" if "true_parent" in frame else "used)"))
    axes[0].set_ylabel("KL(clean || resampled), nats")
    axes[0].set_title(f"Behavioural: used lags {report.lags}")
    axes[1].bar(frame["lag"], frame["accuracy"], color=colors)
    axes[1].plot(frame["lag"], frame["chance"], "k_", markersize=20, label="chance")
    axes[1].set_ylim(0, 1.05)
    axes[1].set_xlabel("lag")
    axes[1].set_ylabel("probe accuracy")
    axes[1].set_title("Representational")
    axes[1].legend(fontsize=8)
    return figure


def plot_decomposition(report: DecompositionReport) -> Figure:
    """KL of each replacement to the model, against the verdict's threshold."""
    rows = [r for r in report.rows if "kl" in r]
    figure, (axis,) = _figure(6.0, 2.8)
    colors = ["tab:green" if r["passed"] else "tab:red" for r in rows]
    axis.bar([r["check"] for r in rows], [max(r["kl"], 1e-7) for r in rows], color=colors)
    axis.axhline(report.thresholds["kl"], color="black", linestyle="--", label="threshold")
    axis.set_yscale("log")
    axis.set_ylabel("KL(model || replaced)")
    axis.set_title(f"Decomposition: {report.verdict}")
    axis.legend(fontsize=8)
    return figure
