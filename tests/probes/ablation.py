"""Mean ablation of attention heads, written apart from the probes to check what they report by another route.

A head (l, h) is mean-ablated by replacing its output ``blocks.{l}.attn.hook_z[:, :, h]`` with its mean over the
batch at each position; the model's every-position next-token loss is then compared with the clean loss. A head
the probes call a copier or an induction head should cost loss when ablated; heads they call ``other`` little.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ablated_loss(model: torch.nn.Module, tokens: Tensor, heads: list[tuple[int, int]]) -> float:
    """Mean next-token cross-entropy over every position with ``heads`` mean-ablated (none: the clean loss)."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def ablate(chosen: list[int]):
        def hook(z: Tensor, hook: object) -> Tensor:
            z = z.clone()
            z[:, :, chosen] = z[:, :, chosen].mean(0, keepdim=True)
            return z

        return hook

    hooks = [(f"blocks.{layer}.attn.hook_z", ablate(chosen)) for layer, chosen in by_layer.items()]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    log_probs = logits[:, :-1].log_softmax(-1)
    return float(-log_probs.gather(-1, tokens[:, 1:, None]).mean())
