"""Ordinary transformers on the same task: an attention-only 2-layer TransformerLens model.

Built offline from a config, with whichever model class the installed TransformerLens offers: a
``HookedTransformer`` on TransformerLens 3.x, a ``TransformerBridge`` (``boot_native``) on 4.x,
where ``HookedTransformer`` no longer exists. Neither offers relative-position attention like the paper's
copier, so we default to rotary positions, the closest option: attention scores then depend on positions
only through their offset. The model maps tokens ``[batch, pos]`` to logits ``[batch, pos, d_vocab]`` (row t
predicts token t+1), so ``ih_circuits.train`` trains it with the every-position objective and the probes
run on it.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import nn
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from ih_circuits.checks import check_int, check_real
from ih_circuits.sources import DataSource, sample_tokens
from ih_circuits.task import NGramTask
from ih_circuits.training import Stage, TrainConfig, TrainingRun, train

KINDS = ("auto", "hooked", "bridge")


def has_hooked_transformer() -> bool:
    """Whether the installed TransformerLens has ``HookedTransformer`` (3.x and earlier; 4.x removed it)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def ordinary_transformer(
    task: NGramTask | DataSource,
    *,
    d_model: int = 64,
    n_heads: int = 4,
    n_layers: int = 2,
    positional_embedding_type: str = "rotary",
    normalization_type: str | None = "LN",
    kind: str = "auto",
    seed: int = 0,
    device: str = "cpu",
    **config: Any,
) -> nn.Module:
    """An attention-only TransformerLens model sized for ``task`` (vocabulary and sequence length).

    Args:
        task: an ``NGramTask`` or any data source (``vocab_size``, ``seq_len``): fixes ``d_vocab`` and ``n_ctx``.
        d_model, n_heads, n_layers: width, heads per layer and depth (the paper's question is about 2).
        positional_embedding_type: ``"rotary"`` (default, relative offsets) or ``"standard"`` (learned
            absolute positions).
        normalization_type: ``"LN"`` (default) or None.
        kind: ``"auto"`` (``HookedTransformer`` where the installed TransformerLens has it, else
            ``TransformerBridge``), ``"hooked"`` or ``"bridge"``.
        seed: initialisation seed.
        **config: any other field of the model's config (``HookedTransformerConfig`` or
            ``TransformerBridgeConfig``), e.g. ``initializer_range``.
    """
    if d_model % n_heads:
        raise ValueError(f"d_model must be divisible by n_heads; got d_model={d_model}, n_heads={n_heads}")
    if positional_embedding_type not in ("rotary", "standard"):
        raise ValueError(f"positional_embedding_type must be 'rotary' or 'standard'; got {positional_embedding_type!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    hooked_available = has_hooked_transformer()
    if kind == "hooked" and not hooked_available:
        raise ValueError(
            "kind='hooked' needs HookedTransformer, which TransformerLens 4.x removed; install "
            "'transformer-lens>=3.0,<4' or use kind='bridge'"
        )
    fields = dict(
        d_model=d_model,
        d_head=d_model // n_heads,
        n_layers=n_layers,
        n_ctx=task.seq_len,
        n_heads=n_heads,
        d_vocab=task.vocab_size,
        attn_only=True,
        normalization_type=normalization_type,
        positional_embedding_type=positional_embedding_type,
        seed=seed,
        **config,
    )
    if kind == "bridge" or not hooked_available:
        model = TransformerBridge.boot_native(TransformerBridgeConfig(**fields))
    else:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model = HookedTransformer(HookedTransformerConfig(**fields, device="cpu"))
    return model.eval() if device == "cpu" else model.to(device).eval()


def baseline_train_config(*, steps: int = 800, seed: int = 0, batch_size: int = 128, lr: float = 3e-3) -> TrainConfig:
    """Adam on the every-position objective: what an ordinary transformer needs (measured here: the loss
    drops from the in-context-unigram plateau to near Bayes after about 500 steps at these defaults)."""
    return TrainConfig(
        stages=(Stage(("all",), steps=steps, lr=lr, optimizer="adam", name="all"),),
        batch_size=batch_size,
        objective="all",
        eval_size=512,
        record_every=25,
        seed=seed,
    )


def train_ordinary_transformer(
    task: NGramTask, *, steps: int = 800, seed: int = 0, quiet: bool = False, **model_kwargs: Any
) -> TrainingRun:
    """Build ``ordinary_transformer(task, seed=seed, **model_kwargs)`` and train it with ``baseline_train_config``."""
    model = ordinary_transformer(task, seed=seed, **model_kwargs)
    return train(model, task, baseline_train_config(steps=steps, seed=seed), quiet=quiet)


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
