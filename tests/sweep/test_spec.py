"""Sweep specs: expansion to runs, TOML = dict, and errors that name the key before anything runs."""

import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from ih_circuits.sweep import SweepSpec

ISSUE_SPEC = """
preset = "cwa"
seeds = [0, 1]
steps = 100

[grid]
alpha = [0.05, 0.3, 1.0]
parents = [[1, 2], [1, 3], [2, 3], [1]]
"""


def test_grid_times_seeds_in_order():
    spec = SweepSpec.from_dict(
        {"preset": "cwa", "seeds": [0, 1], "steps": 50, "grid": {"alpha": [0.05, 1.0], "parents": [[1, 2], [1]]}}
    )
    runs = spec.runs()
    assert [r.run_id for r in runs] == [
        f"alpha={a}_parents={p}_seed={s}" for a in (0.05, 1.0) for p in ("1,2", "1") for s in (0, 1)
    ]
    assert runs[2].overrides() == {"steps": 50, "alpha": 0.05, "parents": (1,)}
    assert SweepSpec.from_dict(spec.to_dict()) == spec


def test_toml_spec_is_the_dict_spec(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(ISSUE_SPEC)
    spec = SweepSpec.from_toml(path)
    assert len(spec.runs()) == 24
    assert spec == SweepSpec.from_dict(
        {
            "preset": "cwa",
            "seeds": [0, 1],
            "steps": 100,
            "grid": {"alpha": [0.05, 0.3, 1.0], "parents": [[1, 2], [1, 3], [2, 3], [1]]},
        }
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"seeds": [0]}, "needs preset"),
        ({"preset": "nope"}, "preset must be one of"),
        ({"preset": "cwa", "seeds": []}, "seeds must be a non-empty list"),
        ({"preset": "cwa", "seeds": [0, 0]}, "distinct"),
        ({"preset": "cwa", "grid": {"alpha": 0.1}}, "grid.alpha must be a non-empty list"),
        ({"preset": "cwa", "grid": {"colour": [1]}}, "run colour=1_seed=0: unknown overrides ['colour']"),
        ({"preset": "cwa", "grid": {"parents": [[1, 2], [0]]}}, "run parents=0_seed=0"),
        ({"preset": "cwa", "steps": 10, "grid": {"steps": [5, 10]}}, "both in grid and fixed"),
        ({"preset": "cwa", "probe": {"n_sequences": 2}}, "probe.n_sequences must be an integer >= 16"),
        ({"preset": "cwa", "grid": {"alpha": [0.1, 0.1]}}, "grid values repeat: runs ['alpha=0.1_seed=0']"),
        ({"preset": "cwa", "fixed": {"alpha": float("nan")}}, "fixed.alpha must be finite"),
        ({"preset": "cwa", "color": 1}, "unknown spec keys ['color']"),
        ({"preset": "cwa", "fixed": {"prior": {"kind": "sparse_support"}}}, "prior is not a sweep override"),
    ],
)
def test_bad_specs_are_refused_naming_the_key(data, message):
    with pytest.raises(ValueError) as error:
        SweepSpec.from_dict(data)
    assert message in str(error.value)


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text('preset = "cwa"\n[grid\n')
    with pytest.raises(ValueError, match="spec.toml is not valid TOML"):
        SweepSpec.from_toml(path)
    path.write_text('preset = "cwa"\nseeds = [-1]\n')
    with pytest.raises(ValueError, match=r"spec.toml: seeds must be"):
        SweepSpec.from_toml(path)


def test_examples_sweep_toml_is_the_issue_grid_and_the_readme_block():
    import re
    from pathlib import Path

    root = Path(__file__).parents[2]
    example = SweepSpec.from_toml(root / "examples" / "sweep.toml")
    assert example == SweepSpec.from_dict(tomllib.loads(ISSUE_SPEC))
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Sweeps: theory against practice") :]
    block = re.search(r"```toml\n(.*?)```", section, flags=re.DOTALL).group(1)
    assert SweepSpec.from_dict(tomllib.loads(block)) == example
    assert len(example.runs()) == 24


def test_a_grid_larger_than_max_runs_is_refused_before_it_is_expanded(monkeypatch):
    """10^4 x 10^4 cells x 2 seeds: counted, not expanded (expanding would take minutes and gigabytes)."""
    from ih_circuits.sweep import spec as spec_module

    huge = {"preset": "cwa", "seeds": [0, 1], "grid": {"alpha": list(range(1, 10**4 + 1)), "lr": [0.1] * 10**4}}
    monkeypatch.setattr(spec_module, "preset_parts", lambda *a, **k: pytest.fail("a cell was built"))
    with pytest.raises(
        ValueError, match=r"200000000 runs \(preset cwa, 100000000 grid cells x 2 seeds\), above max_runs=10000"
    ):
        SweepSpec.from_dict(huge)
    raise_it = r"above max_runs=3; .* raise max_runs \(run_sweep\(max_runs=\.\.\.\), --max-runs"
    with pytest.raises(ValueError, match=raise_it):
        SweepSpec.from_dict({"preset": "cwa", "seeds": [0, 1], "grid": {"alpha": [0.1, 0.2]}}, max_runs=3)
    with pytest.raises(ValueError, match="max_runs"):
        SweepSpec.from_dict({"preset": "cwa"}, max_runs=0)
    assert spec_module.DEFAULT_MAX_RUNS == 10_000


def test_every_cell_is_built_once_whatever_the_seeds(monkeypatch):
    """The check builds each cell's parts once (the seed changes only the initial weights): 2 cells, not 20 runs."""
    from ih_circuits.sweep import spec as spec_module

    built = []
    real = spec_module.preset_parts
    monkeypatch.setattr(spec_module, "preset_parts", lambda *a, **k: built.append(k) or real(*a, **k))
    spec = SweepSpec.from_dict({"preset": "cwa", "seeds": list(range(10)), "grid": {"alpha": [0.1, 1.0]}})
    assert spec.n_runs == len(spec.runs()) == 20 and len(built) == 2


def test_seeds_beyond_64_bits_are_refused():
    with pytest.raises(ValueError, match=r"seeds must be a non-empty list of distinct integers in \[0, 2\*\*63 - 1\]"):
        SweepSpec.from_dict({"preset": "cwa", "seeds": [2**64]})


def test_the_theory_table_asks_for_the_optimal_selector():
    spec = SweepSpec.from_dict({"preset": "cwa", "theory": {"optimal": True}})
    assert spec.optimal and spec.runs()[0].optimal and spec.to_dict()["theory"] == {"optimal": True}
    assert SweepSpec.from_dict(spec.to_dict()) == spec
    assert not SweepSpec.from_dict({"preset": "cwa"}).runs()[0].optimal
    with pytest.raises(ValueError, match="theory.optimal must be true or false; got 'yes'"):
        SweepSpec.from_dict({"preset": "cwa", "theory": {"optimal": "yes"}})
    with pytest.raises(ValueError, match=r"theory must be a table with keys from \['optimal'\]"):
        SweepSpec.from_dict({"preset": "cwa", "theory": {"kernels": 5}})


GROUPS = {
    "seeds": [0, 1],
    "steps": 20,
    "group": [
        {"name": "paper", "preset": "cwa", "grid": {"parents": [[1, 2], [1, 3]]}},
        {"name": "tf", "kind": "transformer", "seeds": [3], "fixed": {"heads": 2}, "grid": {"d_model": [16, 32]}},
    ],
}


def test_groups_expand_in_order_with_their_names_in_the_run_ids():
    """Each group's cells times its seeds (a top-level seeds or steps is every group's default), its name first."""
    spec = SweepSpec.from_dict(GROUPS)
    assert [r.run_id for r in spec.runs()] == [
        "paper_parents=1,2_seed=0",
        "paper_parents=1,2_seed=1",
        "paper_parents=1,3_seed=0",
        "paper_parents=1,3_seed=1",
        "tf_d_model=16_seed=3",
        "tf_d_model=32_seed=3",
    ]
    assert spec.n_runs == 6 and [r.preset for r in spec.runs()] == ["cwa"] * 4 + ["transformer"] * 2
    assert spec.runs()[5].overrides() == {"heads": 2, "steps": 20, "d_model": 32}
    assert spec.description() == (
        "paper: preset cwa, 2 grid cells x 2 seeds; tf: ordinary transformers, 2 grid cells x 1 seed"
    )
    assert SweepSpec.from_dict(spec.to_dict()) == spec
    model, task, config = spec.runs()[5].parts()
    assert type(model).__name__ in ("TransformerBridge", "HookedTransformer")
    assert (model.cfg.d_model, model.cfg.n_heads, config.total_steps, config.seed) == (32, 2, 20, 3)


def test_a_transformer_spec_of_one_group_keeps_the_plain_form():
    spec = SweepSpec.from_dict({"kind": "transformer", "grid": {"parents": [[1, 2], [2, 3]]}})
    assert [r.run_id for r in spec.runs()] == ["parents=1,2_seed=0", "parents=2,3_seed=0"]
    assert spec.to_dict()["kind"] == "transformer" and "preset" not in spec.to_dict()
    assert SweepSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"preset": "cwa"}, "['preset'] belong inside each [[group]]"),
        ({"group": []}, "group must be a non-empty array of tables"),
        ({"group": [{"preset": "cwa"}]}, "group[0]: name must be letters, digits and '-'"),
        ({"group": [{"name": "a b", "preset": "cwa"}]}, "group[0]: name must be letters"),
        ({"group": [{"name": "a", "preset": "cwa"}, {"name": "a", "preset": "cwa"}]}, "group names must differ"),
        ({"group": [{"name": "a", "preset": "cwa", "colour": 1}]}, "group[0]: unknown keys ['colour']"),
        ({"group": [{"name": "a", "kind": "transformer", "preset": "cwa"}]}, "group[0]: give preset"),
        ({"group": [{"name": "a", "kind": "lstm"}]}, "group[0]: kind must be one of ('paper', 'transformer')"),
        (
            {"group": [{"name": "a", "kind": "transformer", "grid": {"window": [2]}, "fixed": {"max_degree": 1}}]},
            "run a_window=2_seed=0: unknown overrides ['max_degree'] for kind 'transformer'; allowed:",
        ),
        (
            {"group": [{"name": "a", "kind": "transformer", "fixed": {"heads": 0}}]},
            "run a_seed=0: heads must be an integer in [1, 64]; got 0",
        ),
        (
            {"group": [{"name": "a", "kind": "transformer", "fixed": {"d_model": 30, "heads": 4}}]},
            "d_model must be divisible by n_heads",
        ),
        (
            {"group": [{"name": "a", "kind": "transformer", "fixed": {"model_class": "lstm"}}]},
            "model_class must be 'bridge' or 'hooked'",
        ),
    ],
)
def test_bad_groups_are_refused_naming_the_group_and_key(change, message):
    with pytest.raises(ValueError) as error:
        SweepSpec.from_dict({**GROUPS, **change})
    assert message in str(error.value)
