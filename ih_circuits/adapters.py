"""Model adapters: the one place that knows how a model lays out its computation.

``white_box(model)`` is the single test of "is this our ``IHTransformer``?" that the trainer uses (to pick
parameter groups, record selector shares and save checkpoints); the probes and views use ``adapt(model)``.

The probes ask a model a few questions: its vocabulary and context, its attention patterns per layer, its
next-token log-probabilities at the query row, and where the query row's *history* lives (the activation
that carries what the query has gathered about its own recent tokens before it is matched against the
context). ``TransformerLensAdapter`` answers them for any TransformerLens model (``HookedTransformer`` or
``TransformerBridge``, any depth): the history is the residual stream entering a layer that the probe session
chooses (``ih_circuits.probes.session``). ``IHAdapter`` answers them for ``IHTransformer``, whose history is
the copier output, and offers its white-box parts (``parts``: copier weights, selector shares, scale a); the
probes ask ``adapter.parts is not None``, never the adapter's type.

Conventions shared by all adapters: row t of the output predicts token t+1 from tokens 0..t; the query
row is T-2 (it predicts the last token); key position j of an attention pattern offers, as its value, the
token at j + ``value_offset`` (0 for ordinary models; 1 for ``IHTransformer``, whose key j holds token j+1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ih_circuits.checks import check_int
from ih_circuits.model import IHTransformer


class TransformerLensAdapter:
    """Any TransformerLens model with ``cfg``, ``run_with_cache``, ``run_with_hooks`` and per-layer
    ``blocks.{l}.attn.hook_pattern`` / ``blocks.{l}.hook_resid_pre`` hooks; its output is next-token logits."""

    exact_vocab = False
    value_offset = 0
    parts: IHTransformer | None = None
    """The white-box parts (copier weights, selector shares, scale a) where the model has them, else None."""
    restartable: bool | None = None
    """Whether a run can start at a layer from a given residual (``start_at_layer``); None until first tried."""

    def __init__(self, model: nn.Module) -> None:
        cfg = getattr(model, "cfg", None)
        missing = [name for name in ("run_with_cache", "run_with_hooks") if not hasattr(model, name)]
        if cfg is None or missing or not all(hasattr(cfg, f) for f in ("n_layers", "d_vocab", "n_ctx")):
            raise ValueError(
                "model must be a TransformerLens model (HookedTransformer, TransformerBridge or a HookedRootModule "
                f"with cfg.n_layers/d_vocab/n_ctx, run_with_cache and run_with_hooks); got {type(model).__name__}"
            )
        self.model = model
        self.d_vocab = int(cfg.d_vocab)
        self.n_ctx = int(cfg.n_ctx)
        self.n_layers = int(cfg.n_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def name(self) -> str:
        return type(self.model).__name__

    def pattern_hook(self, layer: int) -> str:
        self.check_layer(layer, "layer")
        return f"blocks.{layer}.attn.hook_pattern"

    def check_layer(self, layer: int, name: str) -> int:
        return check_int(layer, name, 0, self.n_layers - 1)

    @torch.no_grad()
    def patterns(self, tokens: Int[Tensor, "batch pos"], layer: int) -> Float[Tensor, "batch head query_pos key_pos"]:
        """The attention pattern of every head of ``layer``."""
        name = self.pattern_hook(layer)
        _, cache = self.model.run_with_cache(tokens, names_filter=lambda hook: hook == name)
        return cache[name].float()

    @torch.no_grad()
    def activation(self, tokens: Int[Tensor, "batch pos"], site: str) -> Tensor:
        _, cache = self.model.run_with_cache(tokens, names_filter=lambda hook: hook == site)
        return cache[site]

    def n_heads(self, layer: int) -> int:
        return int(self.model.cfg.n_heads)

    def run_with_hooks(self, tokens: Tensor, hooks: list[tuple[str, Callable]]) -> Tensor:
        return self.model.run_with_hooks(tokens, fwd_hooks=hooks)


class IHAdapter(TransformerLensAdapter):
    """``IHTransformer``: copier (layer 0) and classifier (layer 1), with white-box read-outs.

    The query's history is the copier output ``blocks.0.attn.hook_result`` at the query row; key j of the
    classifier holds token j+1 (``value_offset = 1``); the vocabulary must match the task's exactly.
    """

    exact_vocab = True
    value_offset = 1

    def __init__(self, model: IHTransformer) -> None:
        super().__init__(model)
        self.parts = model

    def history_site(self, query_layer: int | None) -> str:
        """The copier output: what the classifier queries with (``query_layer`` must be None or 1)."""
        if query_layer not in (None, 1):
            raise ValueError(f"query_layer must be None or 1 for IHTransformer (the classifier); got {query_layer!r}")
        return "blocks.0.attn.hook_result"

    @torch.no_grad()
    def patterns(self, tokens: Int[Tensor, "batch pos"], layer: int) -> Float[Tensor, "batch head query_pos key_pos"]:
        """The pattern of every head that computes something (layer 1's inert head slots left out)."""
        return super().patterns(tokens, layer)[:, : self.n_heads(layer)]

    def n_heads(self, layer: int) -> int:
        return self.parts.heads_per_layer[layer]


def white_box(model: nn.Module) -> IHTransformer | None:
    """``model`` itself when it is an ``IHTransformer`` (its parts can be read and swapped), else None."""
    return model if isinstance(model, IHTransformer) else None


def adapt(model: nn.Module) -> TransformerLensAdapter:
    """The adapter for ``model``: ``IHAdapter`` for ``IHTransformer``, else ``TransformerLensAdapter``."""
    ours = white_box(model)
    return IHAdapter(ours) if ours is not None else TransformerLensAdapter(model)
