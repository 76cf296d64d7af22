"""The zoo: hand-built circuits at depth (2, 4 and 6 layers; copier and induction layers apart; two heads sharing
an offset; distractor heads; MLPs) whose wiring is the truth. Every probe runs with its default arguments (only
the data is given), and ``scan_heads``, the decomposition and the views must agree on every head's role."""

import pytest

from ih_circuits import NGramTask, RepeatedTokens, views
from ih_circuits.probes import ProbeSession, decomposition_test, find_parents, scan_heads
from tests.probes.circuits import DISTRACTOR_OFFSET, copier_heads, extra_heads, induction_circuit

ZOO = {
    "depth 2": dict(n_layers=2),
    "depth 4, copiers in layer 1, induction in layer 3": dict(n_layers=4, copier_layer=1, induction_layer=3),
    "depth 6, shared offset, distractors, MLPs": dict(
        n_layers=6, copier_layer=1, induction_layer=4, shared=True, distractors=True, mlp=True
    ),
}


def data_for(lags):
    if lags == (1,):
        return RepeatedTokens(vocab_size=8, seq_len=32, min_period=3, max_period=10)
    return NGramTask(vocab_size=4, parents=lags, seq_len=64, alpha=0.1)


def expected_roles(lags, wiring):
    """(layer, head) -> (role, offset) for every head the circuit wires; every other head is "other"."""
    layer = wiring.get("copier_layer", 0)
    roles = {(layer, head): ("copier", offset) for head, offset in copier_heads(lags).items()}
    for head, (offset, writes) in extra_heads(
        lags, shared=wiring.get("shared", False), distractors=wiring.get("distractors", False)
    ).items():
        # The silent distractor attends to a needed offset but writes nothing: patching makes it "other".
        roles[(layer, head)] = ("other", offset) if writes == "silent" else ("copier", offset)
    roles[(wiring.get("induction_layer", wiring["n_layers"] - 1), 0)] = ("induction", None)
    return roles


CASES = [(lags, name) for lags in [(1,), (1, 2), (1, 3)] for name in ZOO]
FAST = {((1,), "depth 2"), ((1, 2), "depth 4, copiers in layer 1, induction in layer 3")}
PARAMS = [pytest.param(lags, name, marks=() if (lags, name) in FAST else pytest.mark.e2e) for lags, name in CASES]


@pytest.mark.parametrize(("lags", "name"), PARAMS, ids=[f"{lags}-{name}" for lags, name in CASES])
def test_the_zoo_reports_its_wiring_with_default_arguments(lags, name):
    wiring = ZOO[name]
    data = data_for(lags)
    model = induction_circuit(lags, d_vocab=data.vocab_size, n_ctx=data.seq_len, **wiring)
    report = find_parents(model, data)
    assert report.lags == lags, report.summary()
    assert f"earliest layer with an induction head (L{wiring.get('induction_layer', wiring['n_layers'] - 1)}H0" in (
        report.summary()
    )
    frame = scan_heads(model, data)
    got = {(int(r.layer), int(r.head)): r for r in frame.itertuples()}
    for key, (role, offset) in expected_roles(lags, wiring).items():
        assert got[key].role == role, (key, got[key])
        if offset is not None:
            # No head with most of its attention on one offset is reported at another (offsets up to 4 here).
            assert got[key].offset == offset and got[key].copier_score > 0.95
    assert sum(frame["role"] == "induction") == 1
    if wiring.get("distractors"):
        assert got[(wiring["copier_layer"], max(extra_heads(lags, shared=True, distractors=True)))].offset == (
            DISTRACTOR_OFFSET
        )
    verdict = decomposition_test(model, data)
    assert verdict.method == "replacement"
    structural = {check for check, _ in verdict.failing} & {"parents", "induction head", "copier heads", "controls"}
    assert not structural, verdict.reason
    replaced = {row["check"]: row for row in verdict.rows}
    # Exact circuits: the copier replacement changes nothing (measured KL < 1e-6), the ideal GIH at the fitted a
    # stays within the bar (measured 0.012-0.017 nats).
    assert replaced["copier"]["kl"] < 1e-3 and replaced["classifier"]["passed"] and replaced["all"]["passed"]
    # The circuit's unembedding applies softmax(gain x frequencies), not a plain average: the smoothing row says so
    # (measured 0.059-0.099 nats).
    assert "smoothing" in replaced


@pytest.mark.parametrize("lags", [(1, 2)], ids=str)
def test_scan_heads_the_decomposition_and_the_views_agree_on_every_role(lags):
    wiring = ZOO["depth 6, shared offset, distractors, MLPs"]
    data = data_for(lags)
    model = induction_circuit(lags, d_vocab=data.vocab_size, n_ctx=data.seq_len, **wiring)
    session = ProbeSession(model, data)
    frame = session.heads()
    roles = {f"L{int(r.layer)}H{int(r.head)}": r.role for r in frame.itertuples()}
    # The views name every head by the session's role.
    for layer in range(model.cfg.n_layers):
        names = views.attention_data(model, session.tokens[:1], layer, lags=lags, roles=frame).props[
            "attentionHeadNames"
        ]
        for label in names:
            head, role = label.split()[:2]
            assert roles[head] == role, label
    assert "L1H3 other (offset 1)" in views.session_view(session, 1).html
    # The decomposition replaces exactly the copier and induction heads the table names.
    verdict = session.decomposition()
    replaced = {row["check"]: row.get("heads", "") for row in verdict.rows}
    copiers = {name for name, role in roles.items() if role == "copier" and name.startswith("L1")}
    needed = {
        name for name in copiers if int(frame.set_index(["layer", "head"]).loc[(1, int(name[3:])), "offset"]) in (1, 2)
    }
    assert set(replaced["copier"].split(" + ")) == needed
    assert replaced["classifier"] == "L4H0" == next(name for name, role in roles.items() if role == "induction")
    # Two heads share the offset-1 job (each writes half); the silent distractor carries nothing.
    assert any(job.startswith("L1H0 + L1H2: offset 1") for job in frame.attrs["jobs"]), frame.attrs["jobs"]
    assert roles["L1H3"] == "other" and "carries nothing" in frame.set_index(["layer", "head"]).loc[(1, 3), "evidence"]


def test_the_session_meter_counts_the_blocks_that_ran():
    """The session's cost is what the model ran, checked against an independent count (each block's ``hook_out``
    HookPoint): the 4-layer circuit reads its history at layer 3's input, so each corrupted run stops after 3 of 4
    blocks; the TransformerLens 4.x bridge runs every block of a restart (and discards those below layer 3)."""
    wiring = ZOO["depth 4, copiers in layer 1, induction in layer 3"]
    data = data_for((1, 2))
    model = induction_circuit((1, 2), d_vocab=data.vocab_size, n_ctx=data.seq_len, **wiring)
    rows = []
    for block in model.blocks:
        block.hook_out.add_hook(lambda activation, hook: rows.append(activation.shape[0]))
    try:
        session = ProbeSession(model, data, n_sequences=32)
        session.parents()
        session.decomposition()
    finally:
        model.reset_hooks()
    counted = sum(rows) / (32 * model.cfg.n_layers)
    parts = session.meter.parts
    assert parts["clean run"] == pytest.approx(1.0)
    n_lags = len(session.behaviour.lags)  # 4: the window (2) + 2
    assert parts["parents: corrupted runs to the query layer"] == pytest.approx(n_lags * 3 / 4)
    assert session.forwards == pytest.approx(counted + parts["heads: attribution backward"])
    assert session.cost.startswith(f"{session.forwards:.2f} forwards of the batch (clean run 1.00")


def test_ih_transformer_sessions_count_whole_runs():
    """``IHTransformer`` runs through fused routes, not block modules: the meter counts its whole runs."""
    from ih_circuits import IHConfig, IHTransformer

    model = IHTransformer(IHConfig(d_vocab=3, n_ctx=21, n_heads=3, window=3, max_degree=2))
    session = ProbeSession(model, NGramTask(3, (1, 2), 21), n_sequences=16)
    session.parents()
    # The clean run, then per lag (4: the window 2, + 2) a corrupted and a query-side run of the batch, and one run
    # that reads the copier output for the linear read-out.
    assert session.meter.parts == pytest.approx(
        {
            "clean run": 1.0,
            "parents: corrupted runs": 4.0,
            "parents: query-side runs": 4.0,
            "parents: history read-out": 1.0,
        }
    )
