"""Replacing a head's attention in any TransformerLens model: the edit must reach the output on every version.

TL 3.x's ``TransformerBridge`` fires ``hook_pattern`` after its wrapped module has used the pattern, so an edit
there is discarded (measured: logits unchanged to 0.0). ``replacement_hooks`` rewrites the head's output instead;
these tests check it against a pattern edit where the model honours one, and that it moves the output everywhere.
"""

import pytest
import torch

from ih_circuits import RepeatedTokens
from ih_circuits.baselines import has_hooked_transformer, ordinary_transformer
from ih_circuits.probes.replacement import copier_pattern, replacement_hooks

SOURCE = RepeatedTokens(vocab_size=16, seq_len=24, min_period=3, max_period=8)
KINDS = [
    "bridge",
    pytest.param("hooked", marks=pytest.mark.skipif(not has_hooked_transformer(), reason="no HookedTransformer")),
]


def uniform_pattern(n_pos: int) -> torch.Tensor:
    """Causal uniform attention, with row 0..1 left to the model (NaN) to exercise the kept rows."""
    pattern = torch.ones(n_pos, n_pos).tril() / torch.arange(1, n_pos + 1)[:, None]
    pattern[:2] = float("nan")
    return pattern


def pattern_edit(replacements):
    def edit(pattern, hook):
        pattern = pattern.clone()
        for (_, head), ideal in replacements.items():
            pattern[:, head] = torch.where(ideal.isnan(), pattern[:, head], ideal.to(pattern.dtype))
        return pattern

    return edit


@pytest.mark.parametrize("kind", KINDS)
def test_replacing_a_heads_attention_moves_the_output_as_a_pattern_edit_would(kind):
    model = ordinary_transformer(SOURCE, seed=0, d_model=32, n_heads=2, n_layers=2, kind=kind)
    tokens = SOURCE.sample(4, seed=0)
    n_pos = tokens.shape[1]
    replacements = {(1, 0): uniform_pattern(n_pos), (1, 1): copier_pattern(n_pos, {1: 0.7, 2: 0.3}, tokens.device)}
    with torch.no_grad():
        clean = model(tokens)
        replaced = model.run_with_hooks(tokens, fwd_hooks=replacement_hooks(replacements))
        edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", pattern_edit(replacements))])
    # Random weights at init: the replaced heads move the logits by O(0.1) (a silent no-op measures 0.0).
    moved = (replaced - clean).abs().max().item()
    assert moved > 1e-3
    # Rows the replacement leaves to the model (0 and 1) are the model's own.
    assert torch.allclose(replaced[:, :2], clean[:, :2], atol=1e-6)
    if (edited - clean).abs().max().item() > 1e-3:  # this model honours pattern edits: the two must agree
        assert torch.allclose(replaced, edited, atol=1e-5)
