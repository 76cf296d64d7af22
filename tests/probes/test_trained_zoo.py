"""The trained zoo: ordinary TransformerLens models trained here, their mechanism checked by ablation.

Each model is a ``TransformerBridge`` (attention-only, 2 layers, rotary, LayerNorm), so the recipes run on
TransformerLens 3.x and 4.x alike (``make test-e2e`` and ``make test-tl3``); the two versions initialise
differently, so the heads differ between them, and every assertion is about what the probes report against
what mean ablation (``tests/probes/ablation.py``, not the probes' code) measures on the same model:

- the parents found are the data's parents;
- the heads named copiers, and those named induction heads, are the mechanism: ablating each group costs the
  model most of its in-context gain;
- no head with most of its attention on one offset is reported at another offset;
- heads that share the previous-token job (the repeated-token recipe at seed 5 on both versions) are both named,
  and ablation confirms that each carries part of the job.

Recipes: repeated tokens as in ``test_trained_models.py`` (d_model 32, 2 heads, Adam lr 1e-2, batch 64, 320 steps,
~8 s; seeds 1 and 5 share the job on 3.x, 4 and 5 on 4.x). n-gram recipes from a sweep on this machine (seeds 0
and 1): (1, 2) needs a smaller init than the default to leave the unigram plateau reliably (excess over Bayes
0.051 / 0.066 after 500 steps, ~22 s); (1, 3) needs a wider model and 750 steps (excess 0.035 / 0.051, ~90 s).
"""

from __future__ import annotations

import pytest
import torch

from ih_circuits import NGramTask, RepeatedTokens
from ih_circuits.baselines import ordinary_transformer, train_on_source
from ih_circuits.probes import ProbeSession
from tests.probes.ablation import ablated_loss

REPEATED = RepeatedTokens(vocab_size=32, seq_len=40, min_period=4, max_period=12)
RECIPES = {
    "repeated tokens, seed 5": (REPEATED, dict(d_model=32, n_heads=2), dict(steps=320, batch_size=64, lr=1e-2), 5),
    "n-gram (1, 2)": (
        NGramTask(vocab_size=3, parents=(1, 2), seq_len=41, alpha=0.1),
        dict(d_model=32, n_heads=2, initializer_range=0.05),
        dict(steps=500, batch_size=128, lr=3e-3),
        0,
    ),
    "n-gram (1, 3)": (
        NGramTask(vocab_size=3, parents=(1, 3), seq_len=41, alpha=0.1),
        dict(d_model=64, n_heads=8),
        dict(steps=750, batch_size=128, lr=3e-3),
        0,
    ),
}
# Ablation bars, in nats of every-position loss (measured on 3.x and 4.x, 512 sequences; the standard error of a
# difference of two such losses is about 0.005): the copier group costs 3.6-4.4 (repeated) and 0.42-0.57
# (n-grams), the induction group 3.4-3.5 and 0.42-0.55. Half the smallest measured value.
GROUP_COST = {"repeated tokens, seed 5": 1.5, "n-gram (1, 2)": 0.2, "n-gram (1, 3)": 0.2}


@pytest.fixture(scope="module", params=sorted(RECIPES))
def trained(request):
    data, shape, training, seed = RECIPES[request.param]
    model = ordinary_transformer(data, seed=seed, n_layers=2, kind="bridge", **shape)
    train_on_source(model, data, seed=seed, **training)
    session = ProbeSession(model, data, n_sequences=256)
    tokens = data.sample(512, seed=123)
    tokens = tokens if torch.is_tensor(tokens) else tokens.tokens
    return request.param, model, data, session, tokens


def named(session: ProbeSession, role: str) -> list[tuple[int, int]]:
    heads = session.heads()
    return [(int(r.layer), int(r.head)) for r in heads.itertuples() if r.role == role]


@pytest.mark.e2e
def test_trained_models_report_their_parents(trained):
    name, _, data, session, _ = trained
    report = session.parents()
    truth = getattr(data, "parents", (1,))
    assert report.lags == truth and report.matches_truth, (name, report.summary())
    if isinstance(data, NGramTask):
        assert report.matches_theory, (name, report.summary())


@pytest.mark.e2e
def test_the_named_copiers_and_induction_heads_are_the_mechanism_by_ablation(trained):
    name, model, _, session, tokens = trained
    clean = ablated_loss(model, tokens, [])
    copiers, induction = named(session, "copier"), named(session, "induction")
    assert copiers and {layer for layer, _ in copiers} == {0}, (name, copiers)
    assert induction and {layer for layer, _ in induction} == {1}, (name, induction)
    assert ablated_loss(model, tokens, copiers) - clean > GROUP_COST[name], name
    assert ablated_loss(model, tokens, induction) - clean > GROUP_COST[name], name
    # The layer-0 head whose ablation alone costs most is among the named copiers.
    single = {head: ablated_loss(model, tokens, [head]) - clean for head in copiers + named(session, "other")}
    costliest = max((head for head in single if head[0] == 0), key=single.get)
    assert costliest in copiers, (name, single)


@pytest.mark.e2e
def test_no_head_is_reported_at_an_offset_other_than_where_most_of_its_attention_is(trained):
    name, model, _, session, tokens = trained
    heads = session.heads()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[:128], names_filter=lambda hook: hook.endswith("hook_pattern"))
    n_pos = tokens.shape[1]
    for row in heads.itertuples():
        pattern = cache[f"blocks.{row.layer}.attn.hook_pattern"][:, row.head]
        share = torch.stack([pattern.diagonal(-o, -2, -1).sum(-1).mean() for o in range(n_pos)]) / n_pos
        if share.max() > 0.5:
            assert row.offset == int(share.argmax()), (name, row)


@pytest.mark.e2e
def test_two_heads_that_share_the_previous_token_job_are_both_named(trained):
    name, model, _, session, tokens = trained
    if name != "repeated tokens, seed 5":
        pytest.skip("the shared job is the repeated-token recipe's")
    heads = session.heads()
    copiers = heads[heads["role"] == "copier"]
    assert list(copiers["offset"]) == [1, 1] and all(copiers["shared_with"] != ""), copiers
    assert any(job.startswith("L0H0 + L0H1: offset 1") for job in heads.attrs["jobs"]), heads.attrs["jobs"]
    # Each half carries part of the job: leaving it out of the ablation restores > 0.5 nats (measured 1.4-4.0).
    both = ablated_loss(model, tokens, [(0, 0), (0, 1)])
    for head in [(0, 0), (0, 1)]:
        assert both - ablated_loss(model, tokens, [h for h in [(0, 0), (0, 1)] if h != head]) > 0.5, head


# The README's zoo table, decomposition column: which replacements pass (measured KL on 3.x and 4.x in brackets).
REPLACEMENTS = {
    "repeated tokens, seed 5": {"copier": False, "classifier": False},  # KL 2.0-2.3 and 0.20
    "n-gram (1, 2)": {"copier": True, "classifier": True},  # all together KL 0.053, just over 0.05
    "n-gram (1, 3)": {"copier": False},  # KL 0.20
}


@pytest.mark.e2e
def test_the_replacement_verdicts_of_the_readme_table(trained):
    name, _, _, session, _ = trained
    report = session.decomposition()
    assert report.method == "replacement" and report.verdict == "GIH circuit with smoothing", (name, report.reason)
    rows = {row["check"]: row for row in report.rows}
    for check, passed in REPLACEMENTS[name].items():
        assert rows[check]["passed"] is passed, (name, rows[check]["verdict"])
        if not passed:
            assert rows[check]["heads"] in report.reason, (name, report.reason)
    if name == "repeated tokens, seed 5":
        # Exact copiers undo the model's gain (kept -0.29 to -0.12); the ideal classifier keeps most of it (0.89-0.90).
        assert rows["copier"]["recovered"] < 0.3 and rows["classifier"]["recovered"] > 0.8, report.reason
