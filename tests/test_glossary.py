"""The README glossary's numbering rules, checked on real outputs: heads and layers from 0, lags from 1."""

import ih_circuits as ih
from ih_circuits.history import history_columns


def small_config(**fields):
    return ih.IHConfig(d_vocab=3, n_ctx=24, n_heads=3, window=3, max_degree=2, **fields)


def test_history_columns_number_heads_from_zero():
    columns = history_columns(ih.IHTransformer(small_config()))
    assert {"share[]", "share[0]", "share[0,1]", "share[1,2]", "w[0,0]", "w[2,2]"} <= set(columns)
    assert not any(c.startswith(("share[3", "w[3,")) for c in columns)


def test_lag_table_maps_weight_columns_to_lags_from_one():
    assert small_config().lag_table == [[1, 2, 3]] * 3
    assert small_config(layout="staggered").lag_table == [[1, 2, 3], [2, 3, 4], [3, 4, 5]]


def test_a_head_copying_lag_s_attends_at_offset_s_minus_one():
    cfg = small_config()
    task = ih.NGramTask(vocab_size=3, parents=(1, 3), seq_len=24, window=3)
    table = ih.probes.scan_heads(ih.ideal_model(cfg, lags=(1, 3)), task, n_sequences=64)
    copiers = table[table["layer"] == 0].set_index("head")
    assert copiers.loc[0, "offset"] == 0 and copiers.loc[0, "reads_lag"] == 1
    assert copiers.loc[1, "offset"] == 2 and copiers.loc[1, "reads_lag"] == 3
    assert set(table["layer"]) == {0, 1} and set(table["head"]) == {0, 1, 2}


def test_probes_report_lags_from_one():
    cfg = small_config()
    task = ih.NGramTask(vocab_size=3, parents=(1, 2), seq_len=24, window=3)
    report = ih.probes.find_parents(ih.ideal_model(cfg, lags=(1, 2)), task, n_sequences=128)
    assert report.lags == (1, 2) and report.true_parents == (1, 2)


def test_attention_view_titles_count_layers_from_zero():
    cfg = small_config()
    task = ih.NGramTask(vocab_size=3, parents=(1, 2), seq_len=24, window=3)
    model, tokens = ih.ideal_model(cfg, lags=(1, 2)), task.sample(1, seed=0).tokens
    assert ih.views.attention_data(model, tokens, 0, task).title.startswith("Layer 0 (copier)")
    assert ih.views.attention_data(model, tokens, 1, task).title.startswith("Layer 1 (classifier)")
