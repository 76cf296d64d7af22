"""Ordinary transformers: attention-only TransformerLens models sized for a task, saved and loaded.

Built offline from a config, with whichever model class the installed TransformerLens offers: a
``HookedTransformer`` on TransformerLens 3.x, a ``TransformerBridge`` (``boot_native``) on 4.x,
where ``HookedTransformer`` no longer exists. Neither offers relative-position attention like the paper's
copier, so we default to rotary positions, the closest option: attention scores then depend on positions
only through their offset. The model maps tokens ``[batch, pos]`` to logits ``[batch, pos, d_vocab]`` (row t
predicts token t+1), so ``ih_circuits.train`` trains it with the every-position objective and the probes
run on it.

``save_ordinary_transformer`` writes ``transformer.json`` (the class and the config fields that rebuild it) and
``model.safetensors`` as one atomic, checksummed directory (``ih_circuits.checkpoint``);
``load_ordinary_transformer`` rebuilds the model and checks every weight before loading it. ``TrainingRun``
saves such models this way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from ih_circuits.checkpoint import atomic_directory, check_fields, open_save, read_json, read_weights
from ih_circuits.sources import DataSource
from ih_circuits.task import NGramTask

CHECKPOINT_KIND = "ordinary transformer checkpoint"
RECIPE_FILE = "transformer.json"
WEIGHTS_FILE = "model.safetensors"
SAVED_FIELDS = (
    "d_model",
    "d_head",
    "n_layers",
    "n_ctx",
    "n_heads",
    "d_vocab",
    "normalization_type",
    "positional_embedding_type",
)


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
    model = _build("bridge" if kind == "bridge" or not hooked_available else "hooked", fields)
    return model.eval() if device == "cpu" else model.to(device).eval()


def _build(model_class: str, fields: dict[str, Any]) -> nn.Module:
    """A ``TransformerBridge`` (``"bridge"``) or ``HookedTransformer`` (``"hooked"``) with these config fields."""
    if model_class == "bridge":
        return TransformerBridge.boot_native(TransformerBridgeConfig(**fields))
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer(HookedTransformerConfig(**fields, device="cpu"))


def model_class(model: nn.Module) -> str | None:
    """``"bridge"`` or ``"hooked"`` for an attention-only model as ``ordinary_transformer`` builds, else None."""
    if not getattr(getattr(model, "cfg", None), "attn_only", False):
        return None
    if isinstance(model, TransformerBridge):
        return "bridge"
    return "hooked" if type(model).__name__ == "HookedTransformer" else None


def ordinary_config(model: nn.Module) -> dict[str, Any]:
    """The config fields that rebuild an ``ordinary_transformer`` model (``SAVED_FIELDS`` of its ``cfg``)."""
    return {name: getattr(model.cfg, name) for name in SAVED_FIELDS}


def save_ordinary_transformer(model: nn.Module, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``transformer.json``, ``model.safetensors`` and ``manifest.json`` into ``directory``, atomically.

    ``model`` must be one ``ordinary_transformer`` builds (attention-only, a bridge or a ``HookedTransformer``);
    a directory that already holds something is refused unless ``overwrite=True``.
    """
    saved_as = model_class(model)
    if saved_as is None:
        raise ValueError(
            f"model is a {type(model).__name__}; only attention-only models built by ordinary_transformer (a "
            "TransformerBridge or HookedTransformer) are saved this way: save other models with their own tools"
        )
    recipe = {"model_class": saved_as, "config": ordinary_config(model)}
    with atomic_directory(directory, CHECKPOINT_KIND, overwrite=overwrite) as staging:
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, staging / WEIGHTS_FILE)
    return Path(directory)


def load_ordinary_transformer(directory: str | Path, *, device: str = "cpu") -> nn.Module:
    """Inverse of ``save_ordinary_transformer`` after checking the manifest and every weight (names, shapes,
    dtypes, finite values), in eval mode. A save of a ``HookedTransformer`` needs a TransformerLens that has one."""
    directory, manifest = open_save(directory, CHECKPOINT_KIND)
    for name in (RECIPE_FILE, WEIGHTS_FILE):
        if name not in manifest["files"]:
            raise ValueError(f"{directory} is not an ordinary transformer checkpoint: {name} is missing")
    path = directory / RECIPE_FILE
    recipe = read_json(path)
    try:
        check_fields(recipe, {"model_class", "config"}, RECIPE_FILE)
        check_fields(recipe["config"], set(SAVED_FIELDS), f"{RECIPE_FILE} config")
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    saved_as = recipe["model_class"]
    if saved_as not in ("bridge", "hooked"):
        raise ValueError(f"{path}: model_class must be 'bridge' or 'hooked'; got {saved_as!r}")
    if saved_as == "hooked" and not has_hooked_transformer():
        raise ValueError(
            f"{directory} holds a HookedTransformer, which this TransformerLens (4.x) lacks; load it with "
            "'transformer-lens>=3.0,<4'"
        )
    try:
        model = _build(saved_as, {**recipe["config"], "attn_only": True})
    except (TypeError, ValueError, AssertionError) as error:
        raise ValueError(f"{path}: the config does not build a model: {error}") from None
    model.load_state_dict(read_weights(directory / WEIGHTS_FILE, model.state_dict(), RECIPE_FILE))
    return model.eval() if device == "cpu" else model.to(device).eval()
