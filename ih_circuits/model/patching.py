"""``get_act_patch_stage_out``: TransformerLens's residual-stream patching sweep, for a model without one.

TransformerLens's ``get_act_patch_resid_pre`` / ``attn_out`` / ``mlp_out`` / ``block_every`` patch the residual
stream by (layer, position). IHTransformer passes different things between its stages instead, so the
equivalent sweep patches each stage's output by position, with the same call shape
``(model, corrupted_tokens, clean_cache, patching_metric)``:

    embed       hook_embed                   the one-hot token at the position
    copier      blocks.0.attn.hook_result    every head's copies v_h(t) at the position
    selector    blocks.0.mlp.hook_kernel     the kernel row K(t, .) of the query position t
    classifier  blocks.1.attn.hook_z         the classifier's prediction at the position
"""

from __future__ import annotations

from collections.abc import Callable

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ih_circuits.model.cache import IHActivationCache
from ih_circuits.model.transformer import IHTransformer

STAGES = {
    "embed": "hook_embed",
    "copier": "blocks.0.attn.hook_result",
    "selector": "blocks.0.mlp.hook_kernel",
    "classifier": "blocks.1.attn.hook_z",
}
ELEMENTS = 2**25  # budget for the largest activation of one patched forward ([rows, head or subset, pos, pos])


def get_act_patch_stage_out(
    model: IHTransformer,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: IHActivationCache,
    patching_metric: Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]],
) -> Float[Tensor, "stage pos"]:
    """The metric with each stage's output at each position patched from the clean run (rows: ``STAGES``).

    ``result[s, p]`` is ``patching_metric(model(corrupted_tokens))`` with stage ``s``'s activation at position
    ``p`` taken from ``clean_cache`` (which must hold the four hooks, e.g. a full ``run_with_cache``). The
    positions of a stage are patched in batched forwards, one copy of the corrupted batch per position.
    """
    if not isinstance(model, IHTransformer):
        raise ValueError(
            f"model must be an IHTransformer; got {type(model).__name__} (for TransformerLens models use "
            "transformer_lens.patching.get_act_patch_block_every)"
        )
    model.check_tokens(corrupted_tokens)
    batch, n_pos = corrupted_tokens.shape
    for name in STAGES.values():
        if tuple(clean_cache[name].shape[:2]) != (batch, n_pos):
            raise ValueError(
                f"clean_cache[{name!r}] has batch and positions {tuple(clean_cache[name].shape[:2])}; "
                f"corrupted_tokens has {(batch, n_pos)}"
            )
    widest = max(model.config.n_heads, len(model.config.subsets))
    per_forward = max(1, ELEMENTS // (batch * widest * n_pos * n_pos))
    chunks = torch.arange(n_pos, device=corrupted_tokens.device).split(per_forward)
    with torch.no_grad():
        rows = [
            torch.cat(
                [
                    _patch_positions(model, corrupted_tokens, clean_cache[name], name, chunk, patching_metric)
                    for chunk in chunks
                ]
            )
            for name in STAGES.values()
        ]
    return torch.stack(rows)


def _patch_positions(
    model: IHTransformer,
    corrupted_tokens: Tensor,
    clean: Tensor,
    name: str,
    positions: Int[Tensor, " copy"],
    patching_metric: Callable[[Tensor], Tensor],
) -> Float[Tensor, " copy"]:
    """One forward over ``len(positions)`` copies of the corrupted batch; copy c has position positions[c] patched."""
    n_copies = positions.shape[0]

    def patch(activation: Tensor, hook: object) -> Tensor:
        copies = einops.rearrange(activation, "(copy batch) pos ... -> copy batch pos ...", copy=n_copies)
        chosen = positions[:, None] == torch.arange(copies.shape[2], device=positions.device)  # [copy, pos]
        chosen = chosen.reshape(n_copies, 1, -1, *[1] * (copies.ndim - 3))
        patched = torch.where(chosen, clean[None].to(copies.dtype), copies)
        return einops.rearrange(patched, "copy batch pos ... -> (copy batch) pos ...")

    tokens = einops.repeat(corrupted_tokens, "batch pos -> (copy batch) pos", copy=n_copies)
    output = model.run_with_hooks(tokens, fwd_hooks=[(name, patch)])
    return torch.stack(
        [torch.as_tensor(patching_metric(part)).float() for part in output.split(corrupted_tokens.shape[0])]
    )
