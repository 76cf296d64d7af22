"""Training recipes for ordinary transformers (``ih_circuits.ordinary``) on the paper's task and other sources.

``baseline_train_config`` is the recipe (Adam on the every-position objective), ``train_ordinary_transformer``
builds and trains one model, ``transformer_parts`` is the sweep's ``kind = "transformer"`` run (model, task and
training config from overrides, as ``presets.preset_parts`` is for the paper's model), and ``train_on_source``
trains any next-token model on any data source.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import nn

from ih_circuits.checks import check_int, check_real
from ih_circuits.ordinary import has_hooked_transformer, ordinary_transformer
from ih_circuits.sources import DataSource, sample_tokens
from ih_circuits.task import NGramTask
from ih_circuits.training import Stage, TrainConfig, TrainingRun, train

__all__ = [  # the model builders live in ih_circuits.ordinary; they are re-exported here, where they started
    "TRANSFORMER_KEYS",
    "TRANSFORMER_RECIPE",
    "baseline_train_config",
    "has_hooked_transformer",
    "ordinary_transformer",
    "train_on_source",
    "train_ordinary_transformer",
    "transformer_parts",
]


def baseline_train_config(
    *, steps: int = 800, seed: int = 0, batch_size: int = 128, lr: float = 3e-3, eval_size: int = 512
) -> TrainConfig:
    """Adam on the every-position objective: what an ordinary transformer needs (measured here: the loss
    drops from the in-context-unigram plateau to near Bayes after about 500 steps at these defaults)."""
    return TrainConfig(
        stages=(Stage(("all",), steps=steps, lr=lr, optimizer="adam", name="all"),),
        batch_size=batch_size,
        objective="all",
        eval_size=eval_size,
        record_every=25,
        seed=seed,
    )


def train_ordinary_transformer(
    task: NGramTask, *, steps: int = 800, seed: int = 0, quiet: bool = False, **model_kwargs: Any
) -> TrainingRun:
    """Build ``ordinary_transformer(task, seed=seed, **model_kwargs)`` and train it with ``baseline_train_config``."""
    model = ordinary_transformer(task, seed=seed, **model_kwargs)
    return train(model, task, baseline_train_config(steps=steps, seed=seed), quiet=quiet)


TRANSFORMER_TASK_KEYS = frozenset({"vocab_size", "parents", "seq_len", "alpha", "init", "window"})
TRANSFORMER_KEYS = frozenset(
    TRANSFORMER_TASK_KEYS | {"layers", "heads", "d_model", "model_class", "lr", "steps", "batch_size", "eval_size"}
)
"""Every override of ``transformer_parts`` (a sweep's ``kind = "transformer"`` fields)."""
TRANSFORMER_RECIPE = {"layers": 2, "heads": 4, "d_model": 64, "model_class": "bridge", "lr": 3e-3, "steps": 1500}
"""The defaults of ``transformer_parts``: ``ordinary_transformer``'s and ``baseline_train_config``'s, with 1500 steps
(measured on vocabulary 3, alpha 0.1, seed 0: the loss leaves the in-context-unigram plateau after 500 steps for
parents {1,3} and 800 for {2,3}, whose found lags are the parents by step 1500 at excess losses of 0.05-0.09)."""


def transformer_parts(*, seed: int = 0, **overrides: Any) -> tuple[nn.Module, NGramTask, TrainConfig]:
    """The model, task and training config of an ordinary transformer's run, as ``preset_parts`` gives the paper's.

    Task: ``vocab_size, parents, seq_len, alpha, init`` (the presets' defaults: vocabulary 3, parents (1, 2),
    T = 101, alpha 0.1) and ``window``, the lags the theory considers (default 3, at least the largest parent);
    model: ``layers, heads, d_model`` (``ordinary_transformer``'s ``n_layers, n_heads,
    d_model``) and ``model_class`` (``"bridge"``, the default, or ``"hooked"`` where TransformerLens has
    ``HookedTransformer``); training: ``lr, steps, batch_size, eval_size`` of ``baseline_train_config``. The
    defaults are ``TRANSFORMER_RECIPE``.
    """
    unknown = set(overrides) - TRANSFORMER_KEYS
    if unknown:
        raise ValueError(
            f"unknown overrides {sorted(unknown)} for kind 'transformer'; allowed: {sorted(TRANSFORMER_KEYS)}"
        )
    values = {**TRANSFORMER_RECIPE, **overrides}
    if values["model_class"] not in ("bridge", "hooked"):
        raise ValueError(f"model_class must be 'bridge' or 'hooked'; got {values['model_class']!r}")
    task_values = {"vocab_size": 3, "parents": (1, 2), "seq_len": 101, "alpha": 0.1}
    task_values.update({k: v for k, v in overrides.items() if k in TRANSFORMER_TASK_KEYS})
    task_values["parents"] = tuple(task_values["parents"])
    task_values["window"] = max(task_values.get("window", 3), max(task_values["parents"], default=1))
    task = NGramTask(**task_values)
    check_int(values["layers"], "layers", 1, 64)
    check_int(values["heads"], "heads", 1, 64)
    check_int(values["d_model"], "d_model", 1, 4096)
    model = ordinary_transformer(
        task,
        d_model=values["d_model"],
        n_heads=values["heads"],
        n_layers=values["layers"],
        kind=values["model_class"],
        seed=seed,
    )
    training = {k: values[k] for k in ("steps", "lr", "batch_size", "eval_size") if k in values}
    return model, task, baseline_train_config(seed=seed, **training)


def train_on_source(
    model: nn.Module,
    source: DataSource,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    quiet: bool = True,
) -> pd.DataFrame:
    """Train any next-token model on fresh sequences from ``source`` with Adam on the every-position loss.

    The loss is the mean over rows t = 0..T-2 of -log p(x_{t+1} | x_0..x_t) (the model returns logits
    ``[batch, pos, d_vocab]``). Step k trains on ``source.sample(batch_size, seed=seed * 1_000_003 + k)``,
    so a seed fixes the run. ``ih_circuits.train`` is the richer trainer for ``NGramTask`` (Bayes yardstick,
    checkpoints); this one works for any source, e.g. ``RepeatedTokens``. The model is left in eval mode.

    Returns:
        One row per step: ``step``, ``loss`` (the training loss in nats).
    """
    from tqdm.auto import tqdm

    check_int(steps, "steps", 1)
    check_int(batch_size, "batch_size", 1)
    check_int(seed, "seed", 0)
    check_real(lr, "lr", 0.0, low_open=True)
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in tqdm(range(steps), disable=quiet, desc="train"):
        tokens = sample_tokens(source, batch_size, seed=seed * 1_000_003 + step).to(device)
        log_probs = torch.log_softmax(model(tokens)[:, :-1].float(), dim=-1)
        loss = -log_probs.gather(-1, tokens[:, 1:, None]).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return pd.DataFrame({"step": range(1, steps + 1), "loss": losses})
