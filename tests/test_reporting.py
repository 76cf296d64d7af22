"""ih_circuits.reporting: what it loads, what a report contains for a checkpoint and for a trained run."""

import pytest
import torch

import ih_circuits as ih
from ih_circuits import reporting
from ih_circuits.reporting import SHOWCASE_CANDIDATES, html_page, load_run, report, showcase_sequence
from ih_circuits.seeds import derive_seed
from ih_circuits.training import Stage, TrainConfig, train


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
    assert "<h2>How to read this report</h2>" in page and "the keys marked *" in page
    assert page.count("ih-attention-layer") >= 2


def test_a_run_report_adds_the_training_figures(trained, tmp_path):
    _, directory = trained
    page = report(directory, tmp_path / "report.html", n_sequences=64).read_text()
    for title in ("Selector shares", "Final shares", "Copier position weights", "Classifier scale a"):
        assert f"<h3>{title}</h3>" in page
    assert "Steps taken: 6" in page


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


def test_the_example_sequence_has_matching_keys_and_the_most_varied_histories():
    task = ih.NGramTask(vocab_size=3, parents=(1, 2), seq_len=41)
    chosen = showcase_sequence(task, seed=0)[0].tolist()
    candidates = task.sample(SHOWCASE_CANDIDATES, seed=derive_seed(0, "report")).tokens.tolist()

    def histories(tokens):  # parent history of each position with a complete one, by a loop
        return [(tokens[p - 1], tokens[p - 2]) for p in range(2, len(tokens))]

    def matches(tokens):
        *earlier, query = histories(tokens)
        return sum(h == query for h in earlier)

    eligible = [c for c in candidates if matches(c) >= 2]
    assert eligible and chosen in eligible
    assert len(set(histories(chosen)[:-1])) == max(len(set(histories(c)[:-1])) for c in eligible)
    assert len(set(chosen)) == 3  # not the near-constant sequence that left the classifier view blank
