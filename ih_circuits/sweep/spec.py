"""A sweep's specification: one preset, a grid of overrides and seeds, expanded to runs.

A spec is a Python dict or a TOML file with the same keys::

    preset = "cwa"            # a name in ih_circuits.PRESETS
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

Overrides are those of ``preset_parts`` (task, model, training and stage fields). A run is one cell and one
seed; its id names its values, e.g. ``alpha=0.05_parents=1,2_seed=0``, and is its directory in the sweep.

A spec with more runs (cells x seeds) than ``max_runs`` (default ``DEFAULT_MAX_RUNS``) is refused before the
grid is expanded; every cell is built once (model, task, training config) as a check.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ih_circuits.checks import check_int, is_int
from ih_circuits.presets import PRESETS, preset_parts

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SPEC_KEYS = {"preset", "seeds", "steps", "grid", "fixed", "probe", "theory"}
# The most runs a spec may expand to unless the caller raises it (run_sweep(max_runs=...), --max-runs): ten
# thousand runs of the example's size take about 14 hours on 2 cores.
DEFAULT_MAX_RUNS = 10_000
PROBE_KEYS = {"n_sequences"}
THEORY_KEYS = {"optimal"}


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
    """One run of a sweep: the preset, the seed, its grid cell, the fixed overrides and the probes' settings."""

    preset: str
    seed: int
    cell: tuple[tuple[str, Any], ...]
    fixed: tuple[tuple[str, Any], ...] = ()
    n_sequences: int = 256
    optimal: bool = False

    @property
    def run_id(self) -> str:
        """``alpha=0.05_parents=1,2_seed=0``: the cell's values in the grid's order, then the seed."""
        return "_".join([f"{k}={format_value(v)}" for k, v in self.cell] + [f"seed={self.seed}"])

    def overrides(self) -> dict[str, Any]:
        """The keyword overrides of ``preset_parts`` for this run."""
        return {**dict(self.fixed), **dict(self.cell)}


@dataclass(frozen=True)
class SweepSpec:
    """A preset, seeds, a grid of overrides (every combination) and fixed overrides. See the module docstring."""

    preset: str
    seeds: tuple[int, ...]
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
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
        if "preset" not in data:
            raise ValueError(f"the spec needs preset, one of {sorted(PRESETS)}")
        preset = data["preset"]
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {preset!r}")
        seeds = data.get("seeds", [0])
        if (
            not isinstance(seeds, (list, tuple))
            or not seeds
            or not all(is_int(s) and 0 <= s <= 2**63 - 1 for s in seeds)
            or len(set(seeds)) != len(seeds)
        ):
            raise ValueError(f"seeds must be a non-empty list of distinct integers in [0, 2**63 - 1]; got {seeds!r}")
        grid = data.get("grid", {})
        if not isinstance(grid, Mapping):
            raise ValueError(f"grid must be a table of override name -> list of values; got {grid!r}")
        for name, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid.{name} must be a non-empty list of values; got {values!r}")
        fixed = dict(data.get("fixed", {}))
        if "steps" in data:
            fixed["steps"] = data["steps"]
        if "prior" in grid or "prior" in fixed:
            raise ValueError(
                "prior is not a sweep override: a sweep's tasks use Dirichlet(alpha), so vary alpha; train a task "
                "with another prior through train_preset(..., prior=...) or NGramTask(..., prior=...)"
            )
        both = set(grid) & set(fixed)
        if both:
            raise ValueError(f"{sorted(both)} are both in grid and fixed (or steps); give each override once")
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
        n_runs = math.prod(len(values) for values in grid.values()) * len(seeds)
        if max_runs is not None and n_runs > check_int(max_runs, "max_runs (or None)", 1):
            raise ValueError(
                f"the spec has {n_runs} runs ({n_runs // len(seeds)} cells x {len(seeds)} seeds), above "
                f"max_runs={max_runs}; shrink the grid or the seeds, or raise max_runs (run_sweep(max_runs=...), "
                "--max-runs)"
            )
        spec = cls(
            preset=preset,
            seeds=tuple(seeds),
            grid={k: tuple(_normalise(f"grid.{k}", v) for v in vs) for k, vs in grid.items()},
            fixed={k: _normalise(f"fixed.{k}", v) for k, v in fixed.items()},
            n_sequences=n_sequences,
            optimal=optimal,
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

        def plain(value: Any) -> Any:
            return list(value) if isinstance(value, tuple) else value

        return {
            "preset": self.preset,
            "seeds": list(self.seeds),
            "grid": {k: [plain(v) for v in vs] for k, vs in self.grid.items()},
            "fixed": {k: plain(v) for k, v in self.fixed.items()},
            "probe": {"n_sequences": self.n_sequences},
            "theory": {"optimal": self.optimal},
        }

    def runs(self) -> list[RunSpec]:
        """Every cell of the grid (the first key varies slowest) times every seed."""
        fixed, settings = tuple(self.fixed.items()), (self.n_sequences, self.optimal)
        return [
            RunSpec(self.preset, seed, tuple(zip(self.grid, values, strict=True)), fixed, *settings)
            for values in itertools.product(*self.grid.values())
            for seed in self.seeds
        ]

    @property
    def n_runs(self) -> int:
        """Cells x seeds, without expanding the grid."""
        return math.prod(len(values) for values in self.grid.values()) * len(self.seeds)

    def _check_runs(self) -> None:
        """Build every cell once (its first seed: the seed changes only the initial weights), then check the ids."""
        runs = self.runs()
        for run in runs[:: len(self.seeds)]:
            try:
                preset_parts(run.preset, seed=run.seed, **run.overrides())
            except (ValueError, TypeError) as error:
                raise ValueError(f"run {run.run_id}: {error}") from None
        ids = [run.run_id for run in runs]
        if len(set(ids)) != len(ids):
            duplicated = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"grid values repeat: runs {duplicated} would be the same run; list each value once")
