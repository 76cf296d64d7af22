"""ih_circuits.reporting: what it loads, what a report contains for a checkpoint and for a trained run."""

import re

import pytest
import torch

import ih_circuits as ih
from ih_circuits import reporting
from ih_circuits.reporting import html_page, load_run, report
from ih_circuits.seeds import derive_seed
from ih_circuits.training import Stage, TrainConfig, train
from ih_circuits.views import SHOWCASE_CANDIDATES, SHOWCASE_LENGTH, showcase_sequence


def small_task():
    return ih.NGramTask(vocab_size=3, parents=(1, 2), seq_len=24, window=3)


def small_config():
    return ih.IHConfig(d_vocab=3, n_ctx=24, n_heads=3, window=3, max_degree=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = TrainConfig(stages=(Stage(("all",), steps=6),), batch_size=128, eval_size=128, record_every=3)
    run = train(ih.IHTransformer(small_config()), small_task(), config, quiet=True)
    return run, run.save(tmp_path_factory.mktemp("runs") / "run")


def test_load_run_takes_a_run_a_saved_run_or_a_checkpoint_with_its_task(trained, tmp_path):
    run, directory = trained
    assert load_run(run) is run
    loaded = load_run(directory)
    assert loaded.task == run.task and loaded.step == run.step
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.parameters(), run.model.parameters(), strict=True))
    run.model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="is a model checkpoint without a task; pass task="):
        load_run(tmp_path / "ckpt")
    from_checkpoint = load_run(tmp_path / "ckpt", small_task())
    assert from_checkpoint.task == small_task() and len(from_checkpoint.history) == 0
    with pytest.raises(ValueError, match="is neither a saved TrainingRun"):
        load_run(tmp_path)


def test_a_checkpoint_report_has_verdicts_and_probes_but_no_training_figures(tmp_path):
    ih.ideal_model(small_config(), lags=(1, 2)).save_pretrained(tmp_path / "ckpt")
    path = report(tmp_path / "ckpt", tmp_path / "report.html", small_task(), n_sequences=64)
    page = path.read_text()
    assert "<th>true parents</th><td>(1, 2)</td>" in page
    assert "<th>parents found (query-side behavioural)</th><td>(1, 2)</td>" in page
    assert "<h3>Parent probes</h3>" in page and "<h3>Decomposition test</h3>" in page
    assert "<h3>Selector shares</h3>" not in page
    assert "<h2>How to read this report</h2>" in page and "those keys are marked *" in page
    assert page.count("ih-attention-layer") >= 2
    assert "<td>copier</td>\n      <td>passed</td>\n      <td>KL to the model" in page
    assert not re.search(r"<td>\s*(nan|NaN|None)?\s*</td>", page)  # no cell is NaN, None or blank


def test_a_run_report_adds_the_training_figures(trained, tmp_path):
    _, directory = trained
    page = report(directory, tmp_path / "report.html", n_sequences=64).read_text()
    for title in ("Selector shares", "Final shares", "Copier position weights", "Classifier scale a"):
        assert f"<h3>{title}</h3>" in page
    assert "Steps taken: 6" in page
    assert re.search(r"<td>controls</td>\s*<td>passed</td>\s*<td>[^<]*\(needs &lt;= 0.25\)", page)
    assert not re.search(r"<td>\s*(nan|NaN|None)?\s*</td>", page)


def test_an_ordinary_transformer_run_has_its_report(tmp_path):
    """A run of kind "transformer" (as a sweep saves it) reports its model's class and fields, its losses, and
    says it has no selector, with no blank or None cell."""
    from ih_circuits.baselines import transformer_parts

    model, task, config = transformer_parts(seq_len=41, steps=4, d_model=16, heads=2, batch_size=8, eval_size=16)
    train(model, task, config, quiet=True).save(tmp_path / "run")
    page = report(tmp_path / "run", tmp_path / "report.html", n_sequences=32).read_text()
    assert "<th>model</th><td>TransformerBridge</td>" in page and "<th>n_heads</th><td>2</td>" in page
    assert "<th>white-box selector lags</th><td>none: the model has no selector</td>" in page
    assert "<h3>Loss and excess loss over Bayes</h3>" in page and "<h3>Selector shares</h3>" not in page
    assert not re.search(r"<td>\s*(nan|NaN|None)?\s*</td>", page)


def test_a_failing_model_s_report_says_failed_and_why(tmp_path):
    """Clean copiers selected on lags (1, 3) for parents (1, 2): the selector check fails, in words."""
    ih.ideal_model(small_config(), lags=(1, 3)).save_pretrained(tmp_path / "ckpt")
    page = report(tmp_path / "ckpt", tmp_path / "report.html", small_task(), n_sequences=64).read_text()
    assert "Decomposition: not a GIH circuit" in page
    expected = (
        r"<td>selector \(structure\)</td>\s*<td>failed</td>\s*"
        r"<td>the model uses lags \(1, 3\); the data's parents are \(1, 2\)"
    )
    assert re.search(expected, page.replace("&#x27;", "'"))
    assert not re.search(r"<td>\s*(nan|NaN|None)?\s*</td>", page)


def test_a_bad_target_is_refused_before_any_work(trained, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the probes ran before the target was checked")

    monkeypatch.setattr(reporting, "decomposition_test", must_not_run)
    with pytest.raises(ValueError, match="is a directory"):
        report(trained[1], tmp_path)


def test_html_page_escapes_its_title_and_loads_nothing():
    page = html_page("<b>x</b>", "<p>body</p>")
    assert "<title>&lt;b&gt;x&lt;/b&gt;</title>" in page and "<p>body</p>" in page
    assert "http" not in page and "<link" not in page


@pytest.mark.parametrize("seq_len", [24, 41])
def test_the_example_sequence_has_the_fewest_matching_keys_then_the_most_varied_histories(seq_len):
    task = ih.NGramTask(vocab_size=3, parents=(1, 2), seq_len=seq_len)
    chosen = showcase_sequence(task, seed=0)[0].tolist()
    drawn = task.sample(SHOWCASE_CANDIDATES, seed=derive_seed(0, "report")).tokens.tolist()
    candidates = [c[:SHOWCASE_LENGTH] for c in drawn]

    def histories(tokens):  # parent history of positions 2..len (len: the token after the sequence), by a loop
        return [(tokens[p - 1], tokens[p - 2]) for p in range(2, len(tokens) + 1)]

    def matches(tokens):
        *earlier, after = histories(tokens)
        return sum(h == after for h in earlier)

    eligible = [c for c in candidates if matches(c) >= 2]
    fewest = min(matches(c) for c in eligible)
    best = [c for c in eligible if matches(c) == fewest]
    assert len(chosen) == min(SHOWCASE_LENGTH, seq_len) and chosen in best
    assert len(set(histories(chosen)[:-1])) == max(len(set(histories(c)[:-1])) for c in best)
    assert len(set(chosen)) == 3  # not the near-constant sequence that left the classifier view blank


def test_the_last_row_of_the_classifier_view_attends_to_the_marked_keys():
    """On the ideal GIH at a = 5 (the demo's trained a is 5.6) the last row of the report's classifier view puts
    most of its attention on the keys marked *: with k marks and n others it is k e^5 / (k e^5 + n) >= 0.8 for
    k >= 2, n <= 31, while a view spread over a near-constant sequence gave each key under 0.05."""
    task = ih.NGramTask(vocab_size=3, parents=(1, 2), seq_len=100)
    model = ih.ideal_model(ih.IHConfig(d_vocab=3, n_ctx=100, n_heads=3, window=3, max_degree=2), lags=(1, 2), a=5.0)
    data = ih.views.attention_data(model, showcase_sequence(task, seed=0), 1, task)
    marked = [j for j, label in enumerate(data.props["tokens"]) if label.endswith("*")]
    last_row = data.props["attention"][0, -1]
    assert len(marked) >= 2
    assert float(last_row[marked].sum()) >= 0.8
    assert float(last_row[marked].min()) >= 0.8 / len(marked) - 0.05  # split about evenly between them
