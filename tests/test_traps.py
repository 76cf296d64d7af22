"""Traps a newcomer falls into: each gives the right answer or a clear error, never a silent NaN."""

import pytest
import torch

import ih_circuits as ih
from ih_circuits.predictors import log_probabilities


@pytest.fixture(scope="module")
def setup():
    cfg = ih.IHConfig(d_vocab=3, n_ctx=24, n_heads=3, window=3, max_degree=2)
    task = ih.NGramTask(vocab_size=3, parents=(1, 2), seq_len=24, window=3)
    return ih.ideal_model(cfg, lags=(1, 2)), task, task.sample(32, seed=0).tokens


def test_the_model_output_is_scored_as_log_probabilities(setup):
    model, _, tokens = setup
    log_probs = model(tokens)
    nll = ih.last_position_nll(log_probs, tokens)
    assert torch.isfinite(nll).all()
    # Scoring the same distribution given as probabilities gives the same numbers (float32 log/exp round trip).
    assert torch.allclose(nll, ih.last_position_nll(log_probs.exp(), tokens), atol=1e-5)
    assert torch.allclose(ih.next_token_nll(log_probs, tokens, kind="log_probs"), ih.next_token_nll(log_probs, tokens))


def test_logits_and_contradicted_kinds_are_refused(setup):
    model, _, tokens = setup
    logits = model(tokens) + 3.0  # unnormalised: rows sum to neither 1 nor logsumexp 0
    with pytest.raises(ValueError, match=r"logits\? apply torch.log_softmax"):
        ih.last_position_nll(logits, tokens)
    with pytest.raises(ValueError, match="kind='probs' must be non-negative rows summing to 1"):
        ih.next_token_nll(model(tokens), tokens, kind="probs")
    with pytest.raises(ValueError, match="kind must be one of"):
        log_probabilities(model(tokens), kind="logits")
    with pytest.raises(ValueError, match="probs contains NaN"):
        ih.next_token_nll(torch.full((1, 3, 3), float("nan")), tokens[:1, :3])


def test_kl_accepts_either_form_and_matches_the_definition():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]], dtype=torch.float64)
    expected = torch.tensor([0.5 * 2 * torch.log(torch.tensor(2.0, dtype=torch.float64)), 0.0], dtype=torch.float64)
    assert torch.allclose(ih.kl_divergence(p, q), expected)
    assert torch.allclose(ih.kl_divergence(p.log(), q.log()), expected)


def test_decomposition_lags_outside_the_probed_window_are_refused_before_any_work(setup, monkeypatch):
    model, task, _ = setup

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model ran before the lags were checked")

    monkeypatch.setattr("ih_circuits.probes.session.clean_run", must_not_run)
    with pytest.raises(ValueError, match=r"lags must be a non-empty set of lags inside 1..5 \(the window \+ 2 = 5\)"):
        ih.probes.decomposition_test(model, task, lags=(7,))
    with pytest.raises(ValueError, match="lags must be a non-empty set"):
        ih.probes.decomposition_test(model, task, lags=())
    with pytest.raises(ValueError, match=r"inside 1..5"):
        ih.probes.scan_heads(model, task, lags=(6,))
    with pytest.raises(ValueError, match=r"inside 1..5"):
        ih.probes.classifier_probe(model, task, (1, 9))


def test_recovered_is_explained_when_the_model_does_not_beat_the_unigram(setup):
    _, task, _ = setup
    # a < 0 attends away from the matching keys: worse than the unigram, which attends to all of them equally.
    avoiding = ih.ideal_model(ih.IHConfig(d_vocab=3, n_ctx=24, n_heads=3, window=3, max_degree=2), (1, 2), a=-5.0)
    report = ih.probes.decomposition_test(avoiding, task, lags=(1, 2), n_sequences=64)
    assert report.losses["model"] >= report.losses["unigram"]
    frame = report.to_dataframe()
    undefined = frame[frame["recovered"].isna() & frame["check"].ne("controls")]
    assert len(undefined) > 0
    assert undefined["note"].str.contains("recovered is undefined: the model's loss").all()
    # The words say it too: in checks(), the printed report and so the HTML report.
    replaced = report.checks().set_index("check").loc[["copier", "selector", "classifier", "all"], "evidence"]
    assert replaced.str.contains("recovered is undefined: the model's loss").all()
    assert "recovered is undefined" in repr(report)


def test_a_log_probability_rounded_above_zero_is_accepted():
    """A hooked forward's float32 log-probability of a near-certain token measured 3.6e-7 > 0: still a
    log-probability (the row tolerance, 1e-3, is far above float32 rounding and far below any logit offset)."""
    rounded = torch.tensor([[3.6e-7, -20.0, -20.0]])
    assert torch.equal(log_probabilities(rounded, kind="log_probs"), rounded)
    assert torch.equal(log_probabilities(rounded), rounded)
    with pytest.raises(ValueError, match="kind='log_probs' must be non-positive rows"):
        log_probabilities(torch.tensor([[0.01, -20.0, -20.0]]), kind="log_probs")


def test_every_decomposition_check_says_passed_or_failed_with_its_threshold(setup):
    model, task, _ = setup
    passing = ih.probes.decomposition_test(model, task, lags=(1, 2), n_sequences=64)
    checks = passing.checks()
    assert list(checks["check"]) == ["copier", "selector", "classifier", "all", "controls"]
    assert set(checks["result"]) == {"passed"} and not checks.isna().any().any()
    assert checks["evidence"].str.contains(r"\(needs (?:<=|>=) [0-9.]+\)").all()
    assert "KL to the model" in checks["evidence"][0] and "(needs >= 0.9)" in checks["evidence"][0]
    assert "  copier         passed: KL to the model" in repr(passing)
    # A too-strict threshold fails every replacement: the words say so, with the number and the threshold.
    strict = ih.probes.decomposition_test(model, task, lags=(1, 2), n_sequences=64, recovered_threshold=1.5)
    failed = strict.checks().set_index("check")
    assert failed.loc["copier", "result"] == "failed" and "(needs >= 1.5)" in failed.loc["copier", "evidence"]
    assert "  copier         failed: keeps " in repr(strict)
    # A structural failure without a row of its own (clean copiers selected on the wrong lags) is listed too.
    wrong = ih.probes.decomposition_test(
        ih.ideal_model(ih.IHConfig(d_vocab=3, n_ctx=24, n_heads=3, window=3, max_degree=2), lags=(1, 3)),
        task,
        n_sequences=64,
    ).checks()
    # Its replacement checks pass while the structure fails: the two carry different names, so no check reads
    # both passed and failed.
    assert ("selector", "passed") in set(zip(wrong["check"], wrong["result"], strict=True))
    assert ("selector (structure)", "failed") in set(zip(wrong["check"], wrong["result"], strict=True))
    assert wrong["check"].is_unique
    assert wrong["evidence"].str.contains("the data's parents are (1, 2)", regex=False).any()


def test_the_controls_say_why_when_they_cannot_compare(without_runtime_typecheck):
    """No lag outside the tested ones: nothing to compare, said so. A tested lag that moves nothing: failed.
    (A stand-in carries the query effects, so the runtime type check, which wants a ParentReport, is off.)"""
    from types import SimpleNamespace

    from ih_circuits.probes.decomposition import _controls

    rows, structural = [], []
    _controls(SimpleNamespace(query_effects={1: 0.8, 2: 0.5}), (1, 2), 0.25, rows, structural)
    assert rows[-1]["passed"] and "no probed lag lies outside (1, 2)" in rows[-1]["verdict"] and not structural
    _controls(SimpleNamespace(query_effects={1: 0.8, 2: 0.0, 3: 0.01}), (1, 2), 0.25, rows, structural)
    assert not rows[-1]["passed"] and rows[-1]["control_ratio"] == float("inf")
    assert rows[-1]["verdict"].startswith("failed: a lag of (1, 2) does not move the prediction at all")
    _controls(SimpleNamespace(query_effects={1: 0.8, 2: 0.4, 3: 0.2}), (1, 2), 0.25, rows, structural)
    assert rows[-1]["verdict"] == (
        "failed: the lags outside (1, 2) move the prediction at most 0.50x the weakest of them (needs <= 0.25)"
    )


@pytest.mark.usefixtures("without_runtime_typecheck")
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda model, task, tokens: task.sample(4, seed=2**64), r"seed must be an integer in \[0, 2\*\*63 - 1\]"),
        (lambda model, task, tokens: task.sample(4, generator="x"), "generator must be a torch.Generator"),
        (lambda model, task, tokens: ih.IHConfig(3, 24, 3, device="meta"), "device='meta' holds no values"),
        (lambda model, task, tokens: ih.IHConfig(3, 24, 3, device="tpu"), "device must be a device such as"),
        (lambda model, task, tokens: ih.views.attention_view(model, tokens, 0, last=0), "last must be an integer >= 1"),
        (lambda model, task, tokens: ih.views.attention_view(model, tokens, 0), "tokens must be one sequence"),
        (lambda model, task, tokens: task.sample(4, seed=0, device="meta"), "device='meta' holds no values"),
        (lambda model, task, tokens: task.sample(4, seed=0, device="nonsense"), "device must be a device such as"),
        (
            lambda model, task, tokens: ih.IHConfig(3, 24, 3, seed=2**64),
            r"seed must be an integer in \[0, 2\*\*63 - 1\]",
        ),
        (lambda model, task, tokens: ih.TrainConfig(seed=2**64), r"seed must be an integer in \[0, 2\*\*63 - 1\]"),
        (lambda model, task, tokens: ih.Stage(("all",), lr=1e300), r"lr must be a finite number in \(0.0, 3.40"),
        (
            lambda model, task, tokens: ih.oracle_predictive(tokens, torch.ones(32, 4, 3) / 3, (1, 2)),
            r"kernels must have shape \[batch, d\^\|parents\|, d\] = \[32, 9, 3\] .*; got \[32, 4, 3\]",
        ),
        (lambda model, task, tokens: ih.NGramTask(3, (1,), 10, alpha="0.1"), r"alpha must be a finite .*; got '0.1'"),
        (
            lambda model, task, tokens: ih.oracle_predictive(tokens, [[[1.0]]], (1,)),
            r"kernels must be a torch.Tensor \[batch, d\^\|parents\|, d\]; got list",
        ),
        (
            lambda model, task, tokens: ih.model_averaging(tokens, candidates="12"),
            r"candidates must be a non-empty list of lag sets such as \[\(1,\), \(1, 2\)\]; got '12'",
        ),
        (
            lambda model, task, tokens: ih.bayes_predictive(tokens, (1,), 1.0, d_vocab=0),
            "d_vocab must be an integer >= 2",
        ),
    ],
    ids=[
        "seed 2**64",
        "generator str",
        "device meta",
        "device tpu",
        "view last 0",
        "view of a batch",
        "sample on meta",
        "sample on nonsense",
        "model seed 2**64",
        "training seed 2**64",
        "lr 1e300",
        "oracle kernels of the wrong shape",
        "oracle kernels as a list",
        "alpha as text",
        "candidates as text",
        "d_vocab 0",
    ],
)
def test_raw_errors_of_the_edge_battery_are_clear(setup, call, message):
    model, task, tokens = setup
    with pytest.raises(ValueError, match=message):
        call(model, task, tokens)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_cpu_build_is_a_clear_error_not_an_assertion():
    cfg = ih.IHConfig(d_vocab=3, n_ctx=24, n_heads=3, device="cuda")  # a config is data: valid on any machine
    with pytest.raises(
        ValueError, match=r"cfg.device='cuda' is not available here.*from_pretrained\(directory, device='cpu'\)"
    ):
        ih.IHTransformer(cfg)


def test_the_selector_probe_takes_model_and_data_like_every_probe(setup):
    model, task, _ = setup
    assert ih.probes.selector_probe(model, task) == ih.probes.selector_probe(model)


def test_small_integer_tokens_and_negative_degrees(setup):
    from ih_circuits.predictors import model_averaging

    _, _, tokens = setup
    candidates = [(1,), (1, 2)]
    assert torch.equal(
        model_averaging(tokens.to(torch.int8), candidates).probs, model_averaging(tokens, candidates).probs
    )
    scores = ih.theory.selection_scores(3, (1,), 0.1, n_kernels=20, window=2)
    with pytest.raises(ValueError, match="max_degree must be an integer >= 0; got -1"):
        scores.best(-1)
