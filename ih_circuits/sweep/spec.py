"""A sweep's specification: groups of runs (a preset or an ordinary transformer, a grid, seeds), expanded to runs.

A spec is a Python dict or a TOML file with the same keys. One group::

    preset = "cwa"            # a name in ih_circuits.PRESETS; or kind = "transformer" (below)
    seeds = [0, 1]
    steps = 100               # optional: total training steps of every run (stages rescaled)

    [grid]                    # override name -> values; every combination is a cell
    alpha = [0.05, 0.3]
    parents = [[1, 2], [1, 3]]

    [fixed]                   # optional: overrides shared by every run
    vocab_size = 3

    [probe]                   # optional: the probes' settings
    n_sequences = 256

    [theory]                  # optional: also compute the optimal selector (ih_circuits.optimal), seconds per run
    optimal = false

Overrides are those of ``preset_parts`` (task, model, training and stage fields). ``kind = "transformer"``
(instead of ``preset``) trains an ordinary attention-only TransformerLens model (``baselines.transformer_parts``:
``layers``, ``heads``, ``d_model``, ``model_class``, ``lr``, ``steps``, ``batch_size``, ``eval_size`` and the
task's fields as overrides; the default recipe is ``baselines.TRANSFORMER_RECIPE``).

Several groups in one sweep (one results table, one report) are an array of tables, each with its own
``name`` (letters, digits, ``-``), ``preset`` or ``kind``, and optional ``seeds``, ``steps``, ``grid`` and
``fixed``; a top-level ``seeds`` or ``steps`` is every group's default, and ``probe`` and ``theory`` are
shared::

    seeds = [0]
    [[group]]
    name = "paper"
    preset = "cwa"
    grid = {parents = [[1, 2], [1, 3]]}
    [[group]]
    name = "transformer"
    kind = "transformer"
    grid = {parents = [[1, 2], [1, 3]]}

A run is one cell of one group and one seed; its id names its group (if any) and values, e.g.
``paper_parents=1,2_seed=0``, and is its directory in the sweep. A spec with more runs than ``max_runs``
(default ``DEFAULT_MAX_RUNS``) is refused before the grid is expanded; every cell is built once (model, task,
training config) as a check.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ih_circuits.checks import check_int, is_int
from ih_circuits.presets import PRESETS, preset_parts
from ih_circuits.task import NGramTask
from ih_circuits.training import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SPEC_KEYS = {"preset", "kind", "seeds", "steps", "grid", "fixed", "probe", "theory", "group"}
GROUP_KEYS = {"name", "preset", "kind", "seeds", "steps", "grid", "fixed"}
KINDS = ("paper", "transformer")
TRANSFORMER = "transformer"
"""The ``preset`` of a run of ``kind = "transformer"`` (in ``RunSpec``, run records and the results table)."""
# The most runs a spec may expand to unless the caller raises it (run_sweep(max_runs=...), --max-runs): ten
# thousand runs of the example's size take about 14 hours on 2 cores.
DEFAULT_MAX_RUNS = 10_000
PROBE_KEYS = {"n_sequences"}
THEORY_KEYS = {"optimal"}
GROUP_NAME = re.compile(r"[A-Za-z0-9-]+")


def format_value(value: Any) -> str:
    """A value as it appears in run ids and in ``results.csv``: lag sets as ``"1,2"``, numbers as written."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _normalise(name: str, value: Any) -> Any:
    """Lists become tuples (hashable, as the task expects); a non-finite number is refused."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    return value


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its preset (or ``TRANSFORMER``), seed, grid cell, fixed overrides, the probes' and
    the theory's settings, and its group's name (``""`` in a one-group spec)."""

    preset: str
    seed: int
    cell: tuple[tuple[str, Any], ...]
    fixed: tuple[tuple[str, Any], ...] = ()
    n_sequences: int = 256
    optimal: bool = False
    group: str = ""

    @property
    def run_id(self) -> str:
        """``alpha=0.05_parents=1,2_seed=0``: the group, the cell's values in the grid's order, then the seed."""
        values = [f"{k}={format_value(v)}" for k, v in self.cell] + [f"seed={self.seed}"]
        return "_".join([self.group] * bool(self.group) + values)

    def overrides(self) -> dict[str, Any]:
        """The keyword overrides of ``preset_parts`` (or ``transformer_parts``) for this run."""
        return {**dict(self.fixed), **dict(self.cell)}

    def parts(self) -> tuple[nn.Module, NGramTask, TrainConfig]:
        """The model, task and training config of this run (``preset_parts`` or ``transformer_parts``)."""
        if self.preset == TRANSFORMER:
            from ih_circuits.baselines import transformer_parts

            return transformer_parts(seed=self.seed, **self.overrides())
        return preset_parts(self.preset, seed=self.seed, **self.overrides())


@dataclass(frozen=True)
class GroupSpec:
    """One group of a sweep: a preset (or ``TRANSFORMER``), seeds, a grid (every combination) and fixed
    overrides, and its name (``""`` when the spec has one group)."""

    name: str
    preset: str
    seeds: tuple[int, ...]
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def n_runs(self) -> int:
        """Cells x seeds, without expanding the grid."""
        return math.prod(len(values) for values in self.grid.values()) * len(self.seeds)

    def runs(self, n_sequences: int, optimal: bool) -> list[RunSpec]:
        """Every cell of the grid (the first key varies slowest) times every seed."""
        fixed, settings = tuple(self.fixed.items()), (n_sequences, optimal, self.name)
        return [
            RunSpec(self.preset, seed, tuple(zip(self.grid, values, strict=True)), fixed, *settings)
            for values in itertools.product(*self.grid.values())
            for seed in self.seeds
        ]

    def to_dict(self) -> dict[str, Any]:
        """The group as plain JSON values (``preset`` or ``kind``, seeds, grid, fixed; ``name`` if it has one)."""

        def plain(value: Any) -> Any:
            return list(value) if isinstance(value, tuple) else value

        which = {"kind": TRANSFORMER} if self.preset == TRANSFORMER else {"preset": self.preset}
        return {
            **({"name": self.name} if self.name else {}),
            **which,
            "seeds": list(self.seeds),
            "grid": {k: [plain(v) for v in vs] for k, vs in self.grid.items()},
            "fixed": {k: plain(v) for k, v in self.fixed.items()},
        }


def _check_seeds(seeds: Any, where: str) -> tuple[int, ...]:
    if (
        not isinstance(seeds, (list, tuple))
        or not seeds
        or not all(is_int(s) and 0 <= s <= 2**63 - 1 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ValueError(f"{where}seeds must be a non-empty list of distinct integers in [0, 2**63 - 1]; got {seeds!r}")
    return tuple(seeds)


def _group_from_dict(data: Mapping[str, Any], defaults: Mapping[str, Any], where: str, name: str) -> GroupSpec:
    """Validate one group's keys (``where`` prefixes the messages: ``"group[1]: "`` or ``""``)."""
    kind = data.get("kind", "paper")
    if kind not in KINDS:
        raise ValueError(f"{where}kind must be one of {KINDS}; got {kind!r}")
    if kind == TRANSFORMER:
        if "preset" in data:
            raise ValueError(f"{where}give preset (the paper's model) or kind = 'transformer', not both")
        preset = TRANSFORMER
    else:
        if "preset" not in data:
            raise ValueError(f"{where}the spec needs preset, one of {sorted(PRESETS)} (or kind = 'transformer')")
        preset = data["preset"]
        if preset not in PRESETS:
            raise ValueError(f"{where}preset must be one of {sorted(PRESETS)}; got {preset!r}")
    seeds = _check_seeds(data.get("seeds", defaults.get("seeds", [0])), where)
    grid = data.get("grid", {})
    if not isinstance(grid, Mapping):
        raise ValueError(f"{where}grid must be a table of override name -> list of values; got {grid!r}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}grid.{key} must be a non-empty list of values; got {values!r}")
    fixed = data.get("fixed", {})
    if not isinstance(fixed, Mapping):
        raise ValueError(f"{where}fixed must be a table of override name -> value; got {fixed!r}")
    fixed = dict(fixed)
    steps = data.get("steps", defaults.get("steps"))
    if steps is not None:
        fixed["steps"] = steps
    if "prior" in grid or "prior" in fixed:
        raise ValueError(
            f"{where}prior is not a sweep override: a sweep's tasks use Dirichlet(alpha), so vary alpha; train a "
            "task with another prior through train_preset(..., prior=...) or NGramTask(..., prior=...)"
        )
    both = set(grid) & set(fixed)
    if both:
        raise ValueError(f"{where}{sorted(both)} are both in grid and fixed (or steps); give each override once")
    return GroupSpec(
        name=name,
        preset=preset,
        seeds=seeds,
        grid={k: tuple(_normalise(f"{where}grid.{k}", v) for v in vs) for k, vs in grid.items()},
        fixed={k: _normalise(f"{where}fixed.{k}", v) for k, v in fixed.items()},
    )


def _groups_from_dict(data: Mapping[str, Any]) -> tuple[GroupSpec, ...]:
    """The spec's groups: its ``[[group]]`` tables, or the spec itself as one unnamed group."""
    if "group" not in data:
        return (_group_from_dict(data, {}, "", ""),)
    groups = data["group"]
    alone = sorted(set(data) & {"preset", "kind", "grid", "fixed"})
    if alone:
        raise ValueError(f"{alone} belong inside each [[group]] of a spec with groups; seeds and steps may be shared")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, Mapping) for g in groups):
        raise ValueError(f"group must be a non-empty array of tables ([[group]]); got {groups!r}")
    defaults = {k: data[k] for k in ("seeds", "steps") if k in data}
    built = []
    for index, group in enumerate(groups):
        where = f"group[{index}]: "
        unknown = set(group) - GROUP_KEYS
        if unknown:
            raise ValueError(f"{where}unknown keys {sorted(unknown)}; allowed: {sorted(GROUP_KEYS)}")
        name = group.get("name")
        if not isinstance(name, str) or not GROUP_NAME.fullmatch(name):
            raise ValueError(f"{where}name must be letters, digits and '-' (it starts each run id); got {name!r}")
        built.append(_group_from_dict(group, defaults, where, name))
    names = [g.name for g in built]
    if len(set(names)) != len(names):
        raise ValueError(f"group names must differ; got {names}")
    return tuple(built)


@dataclass(frozen=True)
class SweepSpec:
    """Groups of runs (usually one), and the probes' and the theory's settings. See the module docstring."""

    groups: tuple[GroupSpec, ...]
    n_sequences: int = 256
    optimal: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, max_runs: int | None = DEFAULT_MAX_RUNS) -> SweepSpec:
        """Build and validate a spec; every cell's model, task and training config is built once as a check.

        ``max_runs``: refuse a spec of more runs (``None``: no limit), counted before anything is expanded.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a sweep spec must be a mapping; got {type(data).__name__}")
        unknown = set(data) - SPEC_KEYS
        if unknown:
            raise ValueError(f"unknown spec keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
        groups = _groups_from_dict(data)
        probe = data.get("probe", {})
        if not isinstance(probe, Mapping) or set(probe) - PROBE_KEYS:
            raise ValueError(f"probe must be a table with keys from {sorted(PROBE_KEYS)}; got {probe!r}")
        n_sequences = probe.get("n_sequences", 256)
        check_int(n_sequences, "probe.n_sequences", 16)
        theory = data.get("theory", {})
        if not isinstance(theory, Mapping) or set(theory) - THEORY_KEYS:
            raise ValueError(f"theory must be a table with keys from {sorted(THEORY_KEYS)}; got {theory!r}")
        optimal = theory.get("optimal", False)
        if not isinstance(optimal, bool):
            raise ValueError(f"theory.optimal must be true or false; got {optimal!r}")
        spec = cls(groups=groups, n_sequences=n_sequences, optimal=optimal)
        if max_runs is not None and spec.n_runs > check_int(max_runs, "max_runs (or None)", 1):
            raise ValueError(
                f"the spec has {spec.n_runs} runs ({spec.description()}), above max_runs={max_runs}; shrink the "
                "grid or the seeds, or raise max_runs (run_sweep(max_runs=...), --max-runs)"
            )
        spec._check_runs()
        return spec

    @classmethod
    def from_toml(cls, path: str | Path, *, max_runs: int | None = DEFAULT_MAX_RUNS) -> SweepSpec:
        """Read a TOML spec (see the module docstring; ``max_runs`` as in ``from_dict``); errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"sweep spec {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path} is not valid TOML: {error}") from None
        try:
            return cls.from_dict(data, max_runs=max_runs)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON values (what ``from_dict`` reads back)."""
        settings = {"probe": {"n_sequences": self.n_sequences}, "theory": {"optimal": self.optimal}}
        if len(self.groups) == 1 and not self.groups[0].name:
            return {**self.groups[0].to_dict(), **settings}
        return {"group": [group.to_dict() for group in self.groups], **settings}

    def runs(self) -> list[RunSpec]:
        """Every group's runs in order: each cell of its grid (the first key varies slowest) times every seed."""
        return [run for group in self.groups for run in group.runs(self.n_sequences, self.optimal)]

    @property
    def n_runs(self) -> int:
        """Cells x seeds over the groups, without expanding the grids."""
        return sum(group.n_runs for group in self.groups)

    def description(self) -> str:
        """``"preset cwa: 12 grid cells x 2 seeds"``, one clause per group (named when there are several)."""
        clauses = []
        for group in self.groups:
            what = "ordinary transformers" if group.preset == TRANSFORMER else f"preset {group.preset}"
            cells = group.n_runs // len(group.seeds)
            clauses.append(
                f"{group.name + ': ' if group.name else ''}{what}, {cells} grid cell{'s' * (cells != 1)} x "
                f"{len(group.seeds)} seed{'s' * (len(group.seeds) != 1)}"
            )
        return "; ".join(clauses)

    def _check_runs(self) -> None:
        """Build every cell once (its first seed: the seed changes only the initial weights), then check the ids."""
        for group in self.groups:
            for run in group.runs(self.n_sequences, self.optimal)[:: len(group.seeds)]:
                try:
                    run.parts()
                except (ValueError, TypeError) as error:
                    raise ValueError(f"run {run.run_id}: {error}") from None
        ids = [run.run_id for run in self.runs()]
        if len(set(ids)) != len(ids):
            duplicated = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"grid values repeat: runs {duplicated} would be the same run; list each value once")
