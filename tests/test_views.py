"""Views and the HTML report: figures, inlined circuitsvis, no network, deterministic ids."""

import re

import pytest
from matplotlib.figure import Figure

import ih_circuits as ih
from ih_circuits import probes, views
from tests.figures import assert_texts_inside_and_apart

CDN = re.compile(r"<script[^>]+src=|unpkg\.com|cdn\.jsdelivr|https?://[^\"' ]+\.js")


@pytest.fixture(scope="module")
def run():
    return ih.train_preset("cwa", seed=0, steps=30, batch_size=512, eval_size=256, record_every=5, quiet=True)


def test_attention_views_inline_the_bundle_and_mark_lags(run):
    tokens = run.task.sample(1, seed=0).tokens
    copier = views.attention_view(run.model, tokens, layer=0, task=run.task)
    classifier = views.attention_view(run.model, tokens, layer=1, task=run.task)
    for view in (copier, classifier):
        html = view._repr_html_()
        # The bundle (circuitsvis dist/cdn/iife.js) is 1.30 MB; without it a view measures 14-21 kB.
        assert "CircuitsVis.render" in html and len(html) > 1_000_000  # the whole bundle is inline
        assert not CDN.search(html)
    assert '"head 0 (lag 1)"' in copier.html and '"head 1 (lag 2)"' in copier.html
    assert 'id="ih-attention-layer1"' in classifier.html and '*"' in classifier.html
    assert views.attention_view(run.model, tokens, layer=1, task=run.task).html == classifier.html
    # Printed (a console, a notebook's text/plain), a view is its headings and size, not megabytes of JavaScript.
    assert (
        repr(classifier).startswith("HTMLView(Layer 1 (classifier): each row attends") and len(repr(classifier)) < 400
    )
    assert re.search(r"; \d+\.\d MB, shown by Jupyter\)$", repr(classifier))


def test_attention_view_rejects_a_bad_layer_or_bad_lags(run):
    tokens = run.task.sample(1, seed=0).tokens
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 1\]; got 2"):
        views.attention_data(run.model, tokens, layer=2)
    # Lag 0 is the token itself, not a lag: refused with the argument's name rather than misread.
    with pytest.raises(ValueError, match=r"every lag in lags=\(0,\) must be an integer"):
        views.attention_data(run.model, tokens, layer=1, lags=(0,))
    with pytest.raises(ValueError, match="lags must not repeat a lag"):
        views.attention_data(run.model, tokens, layer=1, lags=(1, 1))


def test_a_title_is_escaped_in_a_standalone_view(run, monkeypatch):
    data = views.attention_data(run.model, run.task.sample(1, seed=0).tokens, 1, run.task)
    monkeypatch.setattr(
        views, "attention_data", lambda *args, **kwargs: views.AttentionData(data.component, data.props, "<b>x</b>")
    )
    view = views.attention_view(run.model, run.task.sample(1, seed=0).tokens, 1, run.task)
    assert view.html.startswith("<h4>&lt;b&gt;x&lt;/b&gt;</h4>") and repr(view).startswith("HTMLView(<b>x</b>;")


def test_attention_views_of_any_layer_of_another_model_have_neutral_titles():
    """A 3-layer hand-wired induction circuit: every layer renders, heads are named by their offset, the keys
    the last row attends to are starred, and no title tells the paper's story."""
    from tests.probes.circuits import induction_circuit

    model = induction_circuit((1,), d_vocab=8, n_ctx=32, n_layers=3)
    tokens = ih.RepeatedTokens(8, 32, 3, 10).sample(1, seed=0)
    titles = []
    for layer in range(3):
        data = views.attention_data(model, tokens, layer, lags=(1,))
        titles.append(data.title)
        assert data.props["attention"].shape == (model.cfg.n_heads, 32, 32)
        assert "copier" not in data.title and "classifier" not in data.title
    assert views.attention_data(model, tokens, 0).props["attentionHeadNames"][0] == "L0H0 (offset 1)"
    # The last row predicts the token after the sequence; its lag-1 history is the last token, and the keys the
    # induction head reads from the last row are those right after an earlier copy of it: each is starred.
    induction = views.attention_data(model, tokens, 2, lags=(1,)).props
    last = int(tokens[0, -1])
    expected = {j for j in range(1, 32) if int(tokens[0, j - 1]) == last}
    assert {j for j, label in enumerate(induction["tokens"]) if label.endswith("*")} == expected and expected
    assert float(induction["attention"][0, -1, sorted(expected)].sum()) > 0.99  # wired exactly: all of it
    assert all(title.startswith(f"Layer {layer} attention of TransformerBridge") for layer, title in enumerate(titles))


def test_every_figure_renders_with_its_texts_inside_and_apart(run):
    parents = probes.find_parents(run.model, run.task, n_sequences=64)
    verdict = probes.decomposition_test(run.model, run.task, n_sequences=32)
    figures = [
        views.plot_copier_weights(run.history),
        views.plot_selector_shares(run.history),
        views.plot_final_shares(run.history),
        views.plot_scale(run.history),
        views.plot_losses(run.history),
        views.plot_parent_effects(parents),
        views.plot_decomposition(verdict),
    ]
    for figure in figures:
        assert isinstance(figure, Figure)
        # Rendered as in the report: before the constrained layout, axis labels fell off the bottom and the
        # loss legend sat on the excess-loss axis label.
        assert_texts_inside_and_apart(figure)
        assert views.figure_data_uri(figure).startswith("data:image/png;base64,iVBOR")
    assert views.figure_data_uri(figures[0], "svg").startswith("data:image/svg+xml;base64,")


def test_report_is_self_contained(run, tmp_path):
    run.save(tmp_path / "run")
    path = ih.report(tmp_path / "run", tmp_path / "report.html", n_sequences=64)
    html = path.read_text()
    assert not CDN.search(html)
    assert html.count("<img ") == 7 and html.count("data:image/png;base64,") == 7
    assert html.count("CircuitsVis.render(") == 2 and html.count("var CircuitsVis") == 1
    for text in ("true parents", "parents found", "decomposition verdict", "Selector shares"):
        assert text in html
    with pytest.raises(ValueError, match="neither a saved TrainingRun"):
        ih.report(tmp_path / "missing", tmp_path / "x.html")


def test_render_calls_cannot_be_closed_by_token_text():
    html = views.render_calls([("x", "AttentionHeads", {"tokens": ["</script><b>"], "attention": [[[1.0]]]})])
    assert html.count("</script>") == 1 and "\\u003c/script>\\u003cb>" in html


def test_copier_heatmap_labels_follow_the_layout(run):
    shared = views.plot_copier_weights(run.history, run.model.config.lag_table)
    assert [t.get_text() for t in shared.axes[0].get_xticklabels()] == ["lag 1", "lag 2", "lag 3"]
    staggered = views.plot_copier_weights(run.history, [[1, 2, 3], [2, 3, 4], [3, 4, 5]])
    assert [t.get_text() for t in staggered.axes[0].get_xticklabels()][0] == "slot 1"
    assert [t.get_text() for t in staggered.axes[0].get_yticklabels()][1] == "head 1 (lags 2-4)"
