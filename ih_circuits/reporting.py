"""A self-contained HTML report of a training run: configuration, verdicts, figures and attention views.

One file, no network requests: figures are inline PNGs, and circuitsvis's bundle is inlined once for all
attention views. Open it in any browser, offline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ih_circuits.adapters import white_box
from ih_circuits.checkpoint import atomic_write_text, check_output_file
from ih_circuits.model import IHTransformer
from ih_circuits.ordinary import ordinary_config
from ih_circuits.probes import decomposition_test
from ih_circuits.task import NGramTask
from ih_circuits.training import TrainingRun
from ih_circuits.views import (
    attention_data,
    circuitsvis_bundle,
    figure_data_uri,
    plot_copier_weights,
    plot_decomposition,
    plot_final_shares,
    plot_losses,
    plot_parent_effects,
    plot_scale,
    plot_selector_shares,
    render_calls,
    showcase_sequence,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 24px auto; color: #222; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
.verdict-true { color: #186a3b; font-weight: bold; } .verdict-false { color: #a93226; font-weight: bold; }
img { max-width: 100%; } h2 { border-bottom: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; } .note { color: #555; }
"""


def load_run(run_or_checkpoint: TrainingRun | str | Path, task: NGramTask | None = None) -> TrainingRun:
    """A ``TrainingRun`` from itself, a ``TrainingRun.save`` directory, or a model checkpoint plus ``task``."""
    if isinstance(run_or_checkpoint, TrainingRun):
        return run_or_checkpoint
    directory = Path(run_or_checkpoint)
    if (directory / "run.json").is_file():
        return TrainingRun.load(directory)
    if (directory / "config.json").is_file():
        if task is None:
            raise ValueError(f"{directory} is a model checkpoint without a task; pass task=NGramTask(...)")
        from ih_circuits.training import TrainConfig

        return TrainingRun(model=IHTransformer.from_pretrained(directory), task=task, config=TrainConfig())
    raise ValueError(f"{directory} is neither a saved TrainingRun (run.json) nor a model checkpoint (config.json)")


READER_GUIDE = """<h2>How to read this report</h2>
<ul>
<li><b>Verdicts.</b> The data's true parents (lags, counted from 1: lag 1 is the current token), the theory's
prediction (the lag set with the largest I~ that the selector can pick), the lags the model's prediction depends on
(found by resampling the token at each lag) and the decomposition verdict: "holds" when copier, selector and
classifier each behave as the ideal generalized induction head, "GIH circuit with smoothing" when the parts are
right but the output is smoothed, "not a GIH circuit" otherwise, and "inconclusive" when the probe's sample could not
decide the lags (it says how many sequences would). Each failed check gives its number and threshold.</li>
<li><b>Attention.</b> Heads and layers count from 0. Layer 0 holds the copiers: each head should attend at one
offset (a head reading lag s attends s - 1 positions back). Layer 1 holds the classifier: each row should attend to
the earlier keys whose parent history matches that of the token the row predicts. For the last row (which predicts
the token after the sequence) those keys are marked *; the example sequence is chosen so that a few keys (at least
two) match, and a trained classifier splits its attention between them.</li>
<li><b>Figures.</b> Selector shares over training (the subset of heads copying the parents should win), copier
weights before and after training, the classifier scale a and the loss against Bayes; then the parent probes and
the decomposition checks.</li>
</ul>"""


def _table(rows: dict[str, object]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def figures_html(figures: list[tuple[str, Figure]]) -> str:
    """Each (title, figure) as a heading over an inline PNG."""
    return "".join(
        f"<h3>{html.escape(t)}</h3><img alt='{html.escape(t)}' src='{figure_data_uri(f)}'>" for t, f in figures
    )


def html_page(title: str, body: str) -> str:
    """A standalone page in the reports' style: UTF-8, inline CSS, nothing loaded from elsewhere."""
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def _model_fields(model: nn.Module) -> dict[str, object]:
    """The configuration table of the model: an ``IHConfig``, or an ordinary transformer's class and fields."""
    ours = white_box(model)
    if ours is not None:
        return ours.config.to_dict()
    return {"model": type(model).__name__, **ordinary_config(model)}


def report(
    run_or_checkpoint: TrainingRun | str | Path,
    path: str | Path,
    task: NGramTask | None = None,
    *,
    n_sequences: int = 256,
    seed: int = 0,
) -> Path:
    """Write the HTML report of a run (or a saved run directory, or a model checkpoint with ``task``).

    Contents: the task, model and training configuration; the verdicts (true parents, the theory's
    prediction, the parents found, whether the decomposition holds); the training figures (selector shares,
    copier weights before/after, a, losses) when a trajectory exists; the parent-probe and decomposition
    figures; interactive circuitsvis views of both layers on one sequence. A ``path`` that cannot be
    written is refused before any work; the file is written atomically.
    """
    check_output_file(path)
    run = load_run(run_or_checkpoint, task)
    model, task = run.model, run.task
    decomposition = decomposition_test(model, task, n_sequences=n_sequences, seed=seed)
    parents = decomposition.parents
    verdicts = {
        "true parents": task.parents,
        "theory's prediction (argmax I~)": parents.predicted,
        "parents found (query-side behavioural)": parents.lags,
        "white-box selector lags": (
            "none: the model has no selector" if parents.white_box_lags is None else parents.white_box_lags
        ),
        "decomposition verdict": decomposition.verdict,
    }
    figures = []
    history = run.history
    if len(history) > 1 and "a" in history:
        figures += [
            ("Selector shares", plot_selector_shares(history)),
            ("Final shares", plot_final_shares(history)),
            ("Copier position weights", plot_copier_weights(history, model.config.lag_table)),
            ("Classifier scale a", plot_scale(history)),
        ]
    if len(history) > 1:
        figures.append(("Loss and excess loss over Bayes", plot_losses(history)))
    figures += [
        ("Parent probes", plot_parent_effects(parents)),
        ("Decomposition test", plot_decomposition(decomposition)),
    ]
    sequence = showcase_sequence(task, seed)
    views = []
    for layer in (0, 1):
        data = attention_data(model, sequence, layer, task)
        views.append((f"ih-attention-layer{layer}", data.component, data.props, data.title))
    view_html = "".join(f"<h3>{html.escape(title)}</h3>" + render_calls([(i, c, p)]) for i, c, p, title in views)
    body = f"""
<h1>Generalized induction head report</h1>
{READER_GUIDE}
<h2>Verdicts</h2>
{_table(verdicts)}
<p class="verdict-{str(decomposition.holds).lower()}">Decomposition: {html.escape(decomposition.verdict)}</p>
{decomposition.checks().to_html(index=False, justify="left")}
<p>Query-row losses (nats): {html.escape(", ".join(f"{k} {v:.4f}" for k, v in decomposition.losses.items()))}</p>
<h2>Attention (interactive; * marks the keys the classifier's last row should attend to)</h2>
<script>{circuitsvis_bundle()}</script>
{view_html}
<h2>Figures</h2>
{figures_html(figures)}
<h2>Configuration</h2>
<h3>Task</h3>{_table(task.to_dict())}
<h3>Model</h3>{_table(_model_fields(model))}
<h3>Training</h3><pre>{html.escape(json.dumps(run.config.to_dict(), indent=1))}</pre>
<p>Steps taken: {run.step}{" (interrupted)" if run.interrupted else ""}</p>
"""
    return atomic_write_text(path, html_page("ih_circuits report", body))
