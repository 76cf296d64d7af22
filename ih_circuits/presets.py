"""The paper's training runs by name (PAPER.md §3, §7), in a read-only table, and the overrides that adjust them.

``PRESETS`` maps a name to a ``Preset`` (description, model fields, stages, training fields). ``preset_parts``
builds the model, task and ``TrainConfig`` of one, routing each override to where it belongs; ``train_preset``
trains it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from ih_circuits.checks import check_int
from ih_circuits.model import IHConfig, IHTransformer
from ih_circuits.priors import prior_from_dict
from ih_circuits.task import NGramTask
from ih_circuits.training import Stage, TrainConfig, TrainingRun, train


@dataclass(frozen=True)
class Preset:
    """One named run: what it reproduces, the ``IHConfig`` fields it changes, its stages and ``TrainConfig`` fields."""

    description: str
    model: Mapping[str, Any]
    stages: tuple[Stage, ...]
    train: Mapping[str, Any]


def _preset(description: str, model: dict[str, Any], stages: list[Stage], **train_fields: Any) -> Preset:
    return Preset(description, MappingProxyType(model), tuple(stages), MappingProxyType(train_fields))


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "cwa": _preset(
            "Joint training of the simplified model (PAPER.md §7, first bullet): all parameters, plain SGD.",
            {},
            [Stage(("all",), steps=300, lr=1.0, name="CWa")],
        ),
        "c_w_a": _preset(
            "Three-stage training as the theory analyses it (PAPER.md §3): selector C, then copier W, then a.",
            {},
            [
                Stage(("selector",), steps=150, lr=1.0, name="C"),
                Stage(("copier_position",), steps=100, lr=1.0, name="W"),
                Stage(("classifier",), steps=100, lr=1.0, name="a"),
            ],
        ),
        "c_w_a_d3": _preset(
            "Three-stage training with D = 3: the superset {1,2,3} rises, then loses to {1,2} (PAPER.md §7).",
            {"max_degree": 3},
            [
                Stage(("selector",), steps=100, lr=1.0, name="C"),
                Stage(("copier_position",), steps=100, lr=1.0, name="W"),
                Stage(("classifier",), steps=100, lr=1.0, name="a"),
            ],
            record_every=2,
        ),
        "cw_a": _preset(
            "Copier and selector together, then the classifier scale.",
            {},
            [
                Stage(("copier_position", "selector"), steps=200, lr=1.0, name="CW"),
                Stage(("classifier",), steps=100, lr=1.0, name="a"),
            ],
        ),
        "full": _preset(
            "The full (token-dependent) variant trained jointly with a smaller learning rate (PAPER.md §7).",
            {"copier": "full"},
            [Stage(("all",), steps=300, lr=0.3, name="full")],
        ),
    }
)
"""The paper's runs by name (read-only): ``PRESETS["cwa"].description`` says what each reproduces."""

_TASK_KEYS = {"vocab_size", "parents", "seq_len", "alpha", "init", "prior"}
_MODEL_KEYS = {f for f in IHConfig.__dataclass_fields__} - {"d_vocab", "n_ctx", "device"}
_TRAIN_KEYS = {"batch_size", "objective", "loss", "data", "dataset_size", "eval_size", "record_every", "device"}
_STAGE_KEYS = {"lr", "optimizer", "steps"}
OVERRIDE_KEYS = frozenset(_TASK_KEYS | _MODEL_KEYS | _TRAIN_KEYS | _STAGE_KEYS)
"""Every keyword ``preset_parts`` (and ``train_preset``) accepts as an override."""


def _split_steps(stages: tuple[Stage, ...], total: int) -> list[int]:
    """Scale the stages' steps to add up to ``total`` (largest-remainder rounding)."""
    check_int(total, "steps", len(stages), low_text=f"{len(stages)} (one per stage)")
    planned = sum(s.steps for s in stages)
    exact = [s.steps * total / planned for s in stages]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(stages)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def preset_parts(name: str, *, seed: int = 0, **overrides: Any) -> tuple[IHTransformer, NGramTask, TrainConfig]:
    """The model, task and training config of a preset, with overrides routed to where they belong.

    Task: ``vocab_size, parents, seq_len, alpha, init, prior`` (a ``KernelPrior``, or its ``to_dict()`` form);
    model: any ``IHConfig`` field (``window``, ``n_heads``, ``max_degree``, ``w_plus``, ...); training:
    ``batch_size, objective, loss, data, dataset_size, eval_size, record_every, device``; every stage: ``lr``,
    ``optimizer``; ``steps`` scales the stages so that they add up to that many steps.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    unknown = set(overrides) - OVERRIDE_KEYS
    if unknown:
        raise ValueError(f"unknown overrides {sorted(unknown)} for preset {name!r}; allowed: {sorted(OVERRIDE_KEYS)}")
    preset = PRESETS[name]
    task_values = {"vocab_size": 3, "parents": (1, 2), "seq_len": 101, "alpha": 0.1}
    task_values.update({k: v for k, v in overrides.items() if k in _TASK_KEYS})
    if isinstance(task_values.get("prior"), dict):
        task_values["prior"] = prior_from_dict(task_values["prior"])
    model_values = {"n_heads": 3, "window": 3, "max_degree": 2, **preset.model}
    model_values.update({k: v for k, v in overrides.items() if k in _MODEL_KEYS})
    model_values["seed"] = model_values.get("seed", seed)
    task_values["parents"] = tuple(task_values["parents"])
    window = model_values["window"]
    task = NGramTask(window=max(window, max(task_values["parents"], default=1)), **task_values)
    device = overrides.get("device", "cpu")
    cfg = IHConfig(d_vocab=task.vocab_size, n_ctx=task.seq_len, device=device, **model_values)
    unseen = [lag for lag in task.parents if lag > cfg.max_lag]
    if unseen:
        raise ValueError(
            f"parents {task.parents} include lag(s) {tuple(unseen)} that the model cannot see: its copier heads read "
            f"lags 1..{cfg.max_lag} (window {cfg.window}); raise the window to >= {max(unseen)} (override "
            f"window={max(unseen)}, CLI --window {max(unseen)}) or choose parents within it"
        )
    stages = preset.stages
    if "steps" in overrides:
        stages = tuple(
            replace(s, steps=n) for s, n in zip(stages, _split_steps(stages, overrides["steps"]), strict=True)
        )
    stage_changes = {k: overrides[k] for k in ("lr", "optimizer") if k in overrides}
    stages = tuple(replace(s, **stage_changes) for s in stages)
    train_values = {"batch_size": 2048, **preset.train}
    train_values.update({k: v for k, v in overrides.items() if k in _TRAIN_KEYS})
    return IHTransformer(cfg), task, TrainConfig(stages=stages, seed=seed, **train_values)


def train_preset(
    name: str,
    *,
    seed: int = 0,
    quiet: bool = False,
    callback: Callable[[TrainingRun], None] | None = None,
    **overrides: Any,
) -> TrainingRun:
    """Train one of the paper's runs by name: ``"cwa"``, ``"c_w_a"``, ``"c_w_a_d3"``, ``"cw_a"``, ``"full"``.

    See ``PRESETS[name].description`` and ``preset_parts`` for what can be overridden.
    """
    model, task, config = preset_parts(name, seed=seed, **overrides)
    return train(model, task, config, quiet=quiet, callback=callback)
