"""IHConfig (ih_circuits/model/config.py): validation names the argument, the JSON round trip is exact, the lag
table and the subset list follow their definitions (written here as loops), and inconsistent inputs are refused.

Everything here is exact: configs hold Python ints, floats and strings, so equality is the right comparison."""

import dataclasses
import json
import math
import re

import pytest
import torch

from ih_circuits import IHConfig
from tests.model.helpers import tiny_config

FIELDS = [field.name for field in dataclasses.fields(IHConfig)]


def reference_lag_table(n_heads: int, window: int, layout: str) -> list[list[int]]:
    """PAPER.md §2 / §8: a common window of lags 1..M ("shared"), or lags h+1..h+M for 0-based head h
    ("staggered", the authors' code)."""
    table = []
    for head in range(n_heads):
        first = 1 if layout == "shared" else head + 1
        table.append([first + m for m in range(window)])
    return table


def reference_subsets(n_heads: int, max_degree: int) -> list[tuple[int, ...]]:
    """Every head subset with at most max_degree heads, from bit masks, sorted by size and then lexicographically."""
    subsets = []
    for mask in range(2**n_heads):
        subset = tuple(head for head in range(n_heads) if mask >> head & 1)
        if len(subset) <= max_degree:
            subsets.append(subset)
    return sorted(subsets, key=lambda subset: (len(subset), subset))


def test_defaults_are_the_papers_setting():
    """PAPER.md §3 and §7: d = 3, T = 100 context tokens + 1 target, H = 3, M = 3, D = 2, w_plus = 3,
    w_minus = 0.1, c_S = a = 0.01, the simplified (positional) copier with a common window."""
    cfg = IHConfig()
    expected = {"d_vocab": 3, "n_ctx": 101, "n_heads": 3, "window": 3, "max_degree": 2, "copier": "positional"}
    expected |= {"layout": "shared", "w_plus": 3.0, "w_minus": 0.1, "c_init": 0.01, "a_init": 0.01}
    assert {name: getattr(cfg, name) for name in expected} == expected


BAD_VALUES = [
    ("d_vocab", 1),
    ("d_vocab", True),
    ("n_ctx", 1),
    ("n_heads", 0),
    ("window", 0),
    ("window", -3),
    ("seed", -1),
    ("max_degree", -1),
    ("max_degree", 4),  # more heads than n_heads = 3
    ("max_degree", True),
    ("copier", "mlp"),
    ("copier", "Positional"),
    ("layout", "diagonal"),
    ("w_plus", math.nan),
    ("w_plus", math.inf),
    ("w_minus", -math.inf),
    ("c_init", math.nan),
    ("a_init", math.inf),
    ("a_init", 1.5e4),
    ("a_init", -1e30),
    ("prob_floor", -0.1),
    ("prob_floor", 1.0),
    ("prob_floor", math.nan),
    ("dtype", "float16"),
    ("dtype", "bfloat16"),
    ("device", ""),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=lambda x: repr(x))
def test_each_invalid_value_is_refused_with_a_message_that_starts_with_its_argument(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must "):
        tiny_config(**{field: value})


@pytest.mark.usefixtures("without_runtime_typecheck")
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("d_vocab", 3.0),
        ("a_init", False),
        ("n_heads", "3"),
        ("window", None),
        ("w_plus", "3"),
        ("device", 0),
        ("dtype", torch.float64),
    ],
    ids=lambda x: repr(x),
)
def test_values_of_the_wrong_type_are_refused_by_the_library_itself(field, value):
    """Without the test suite's runtime type checks, a user passing a wrong type still gets our ValueError."""
    with pytest.raises(ValueError, match=rf"^{field} must "):
        tiny_config(**{field: value})


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_max_degree_must_fit_the_number_of_heads(n_heads):
    """max_degree and n_heads must agree: D = H is allowed (every subset), D = H + 1 is refused, also through
    replace, which validates again."""
    assert tiny_config(n_heads=n_heads, max_degree=n_heads).max_degree == n_heads
    with pytest.raises(ValueError, match=rf"^max_degree must .*n_heads={n_heads}"):
        tiny_config(n_heads=n_heads, max_degree=n_heads + 1)
    cfg = tiny_config(n_heads=4, max_degree=4)
    if n_heads < 4:
        with pytest.raises(ValueError, match=rf"^max_degree must .*n_heads={n_heads}"):
            cfg.replace(n_heads=n_heads)


AWKWARD = [
    tiny_config(),
    tiny_config(copier="full", layout="staggered", dtype="float64", seed=2**40, n_ctx=10_001),
    tiny_config(w_plus=1 / 3, w_minus=-0.1, c_init=5e-324, a_init=1e4, prob_floor=math.nextafter(1.0, 0.0)),
    tiny_config(w_plus=-0.0, w_minus=2.0**-1074, c_init=0.1 + 0.2, a_init=-7.0, prob_floor=0.0, max_degree=0),
    tiny_config(n_heads=1, window=1, max_degree=1, d_vocab=2, device="cuda:1"),
]


@pytest.mark.parametrize("cfg", AWKWARD, ids=range(len(AWKWARD)))
def test_json_round_trip_is_exact_to_the_bit(cfg):
    """to_dict is plain JSON, and from_dict(json) gives back every field with the same type and the same float
    bits (repr of a float is exact in Python), sub-normal, negative-zero and near-1 values included."""
    text = json.dumps(cfg.to_dict(), allow_nan=False)
    back = IHConfig.from_dict(json.loads(text))
    assert back == cfg
    for name in FIELDS:
        ours, theirs = getattr(cfg, name), getattr(back, name)
        assert type(ours) is type(theirs), name
        assert repr(ours) == repr(theirs), name  # distinguishes -0.0 from 0.0, which == does not


@pytest.mark.parametrize("missing", FIELDS)
def test_from_dict_refuses_a_record_without_any_one_field(missing):
    """A saved config records every field; a missing one must not silently take its default."""
    data = tiny_config().to_dict()
    del data[missing]
    with pytest.raises(ValueError, match=re.escape(f"IHConfig is missing ['{missing}']")):
        IHConfig.from_dict(data)


@pytest.mark.usefixtures("without_runtime_typecheck")
def test_from_dict_refuses_a_record_that_is_not_an_object():
    with pytest.raises(ValueError, match="IHConfig must be a JSON object; got list"):
        IHConfig.from_dict(list(tiny_config().to_dict().items()))


def test_from_dict_refuses_unknown_fields_and_invalid_values():
    data = tiny_config().to_dict()
    with pytest.raises(ValueError, match=re.escape("unknown fields ['heads', 'lr']")):
        IHConfig.from_dict({**data, "lr": 0.5, "heads": 3})
    with pytest.raises(ValueError, match="^window must "):
        IHConfig.from_dict({**data, "window": 0})
    with pytest.raises(ValueError, match="^max_degree must "):  # fields that do not fit each other
        IHConfig.from_dict({**data, "n_heads": 1, "max_degree": 2})


def test_config_is_frozen_and_replace_keeps_the_other_fields():
    cfg = tiny_config(copier="full", seed=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.window = 5
    changed = cfg.replace(window=5)
    assert changed.window == 5 and cfg.window == 3
    assert {n: getattr(changed, n) for n in FIELDS if n != "window"} == {
        n: getattr(cfg, n) for n in FIELDS if n != "window"
    }


@pytest.mark.parametrize("layout", ["shared", "staggered"])
@pytest.mark.parametrize(("n_heads", "window"), [(1, 1), (3, 3), (2, 4), (4, 2)])
def test_lag_table_follows_the_layout(layout, n_heads, window):
    cfg = tiny_config(n_heads=n_heads, window=window, max_degree=1, layout=layout)
    expected = reference_lag_table(n_heads, window, layout)
    assert cfg.lag_table == expected
    assert cfg.max_lag == max(lag for row in expected for lag in row)
    assert cfg.max_lag == (window if layout == "shared" else n_heads - 1 + window)


def test_every_head_has_its_own_lag_in_the_staggered_window_but_not_always_in_the_shared_one():
    """The initial bias of PAPER.md §3 ties head h (1-based) to lag h: in the staggered layout it is the first
    slot of every head's window; in the shared one a head beyond the window has no lag of its own."""
    staggered = tiny_config(n_heads=4, window=2, layout="staggered").lag_table
    shared = tiny_config(n_heads=4, window=2, layout="shared").lag_table
    assert [row[0] for row in staggered] == [1, 2, 3, 4]
    assert [head + 1 in row for head, row in enumerate(shared)] == [True, True, False, False]


@pytest.mark.parametrize(("n_heads", "max_degree"), [(1, 0), (1, 1), (3, 2), (3, 3), (4, 2), (5, 5)])
def test_subsets_are_every_small_head_subset_by_size_then_lexicographically(n_heads, max_degree):
    subsets = tiny_config(n_heads=n_heads, max_degree=max_degree).subsets
    assert subsets == reference_subsets(n_heads, max_degree)
    assert len(subsets) == sum(math.comb(n_heads, size) for size in range(max_degree + 1))
    assert subsets[0] == ()  # the empty subset is always there (PAPER.md §2.2)


@pytest.mark.parametrize(("name", "dtype"), [("float32", torch.float32), ("float64", torch.float64)])
def test_dtype_names_map_to_torch_dtypes(name, dtype):
    assert tiny_config(dtype=name).torch_dtype is dtype


def test_transformer_lens_view_states_the_models_true_sizes():
    cfg = tiny_config(d_vocab=5, n_heads=4, n_ctx=17, max_degree=2, dtype="float64")
    tl = cfg.to_transformer_lens()
    assert (tl.d_model, tl.d_head, tl.n_heads, tl.n_layers) == (4 * 5, 5, 4, 2)
    assert (tl.d_vocab, tl.n_ctx, tl.dtype) == (5, 17, torch.float64)
    assert tl.d_mlp is None and tl.act_fn is None and tl.normalization_type is None
    assert tl.positional_embedding_type == "relative" and tl.default_prepend_bos is False
