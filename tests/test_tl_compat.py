"""IHTransformer is a TransformerLens model: proven with TransformerLens's own code."""

import re
from pathlib import Path

import pandas as pd
import torch
from transformer_lens import ActivationCache
from transformer_lens.head_detector import detect_head
from transformer_lens.model_protocol import TransformerLensModel
from transformer_lens.patching import generic_activation_patch, layer_pos_head_vector_patch_setter

from ih_circuits import IHTransformer, ideal_model
from tests.model.helpers import random_tokens, randomized, tiny_config

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_hook_table() -> dict[str, list[str]]:
    rows = re.findall(r"^\| `([\w.]+)` \| `\[([\w, ]+)\]` \|", README.read_text(), flags=re.MULTILINE)
    return {name: [axis.strip() for axis in shape.split(",")] for name, shape in rows}


def test_is_a_transformer_lens_model():
    model = IHTransformer(tiny_config())
    assert isinstance(model, TransformerLensModel)
    assert model.cfg.n_layers == 2 and model.cfg.n_heads == 3 and model.cfg.d_vocab == 3


def test_cache_keys_and_shapes_are_the_readme_hook_table():
    cfg = tiny_config()
    model = IHTransformer(cfg)
    tokens = random_tokens(2, 7)
    _, cache = model.run_with_cache(tokens)
    assert isinstance(cache, ActivationCache)
    table = readme_hook_table()
    assert set(table) == set(cache.keys())
    for name, axes in table.items():
        sizes = {
            "batch": 2,
            "pos": 7,
            "query_pos": 7,
            "key_pos": 7,
            "head": cfg.n_heads if name.startswith("blocks.0") else 1,
            "d_vocab": 3,
            "subset": len(cfg.subsets),
            "lag": cfg.window,
        }
        assert tuple(cache[name].shape) == tuple(sizes[a] for a in axes), name
    assert torch.equal(cache["pattern", 0], cache["blocks.0.attn.hook_pattern"])
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())


def test_identity_hooks_are_a_no_op_and_zeroing_changes_the_output():
    model = randomized(IHTransformer(tiny_config()), seed=1)
    tokens = random_tokens(3, 16, seed=1)
    clean = model(tokens)
    identity = [(name, lambda x, hook: x) for name in model.hook_dict]
    assert torch.allclose(model.run_with_hooks(tokens, fwd_hooks=identity), clean, atol=1e-6)
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", lambda x, hook: torch.zeros_like(x))])
    assert (zeroed - clean).abs().max() > 1e-2


def test_generic_activation_patch_over_heads_and_positions():
    """Clean and corrupted differ at the token read by lag 1 at the query; patch z per (layer, pos, head).

    Ideal model on lags (1, 2): head 0 copies lag 1, head 1 lag 2, head 2 is not selected. Patching head 0's
    copy at the query position moves the metric; head 2 anywhere, and any head at an unrelated early
    position, changes nothing.
    """
    model = ideal_model(tiny_config(), lags=(1, 2), a=6.0).eval()
    clean = random_tokens(32, 20, seed=2)
    corrupted = clean.clone()
    query = clean.shape[1] - 2
    corrupted[:, query] = (clean[:, query] + 1) % 3
    _, clean_cache = model.run_with_cache(clean)

    def metric(log_probs):
        return log_probs[:, query].gather(1, clean[:, -1:])[:, 0]

    rows = [(0, pos, head) for pos in (1, query) for head in range(3)] + [(1, query, 0)]
    index_df = pd.DataFrame(rows, columns=["layer", "pos", "head"])
    result = generic_activation_patch(
        model,
        corrupted,
        clean_cache,
        metric,
        layer_pos_head_vector_patch_setter,
        "z",
        index_df=index_df,
        reduce="none",
        baseline=True,
    )
    effect = (result.values - result.baseline).mean(-1)
    by_row = dict(zip(rows, effect.tolist(), strict=True))
    assert by_row[(0, query, 0)] > 0.1
    assert abs(by_row[(0, query, 2)]) < 1e-6 and abs(by_row[(0, 1, 2)]) < 1e-6
    assert abs(by_row[(0, 1, 0)]) < 1e-6
    assert result.values.shape == (len(rows), 32)


def test_detect_head_finds_the_copied_lags():
    model = ideal_model(tiny_config(), lags=(1, 3), a=5.0).eval()
    sequence = "0120210112201"
    n = len(sequence)

    def lag_pattern(lag):
        pattern = torch.zeros(n, n)
        rows = torch.arange(lag - 1, n)
        pattern[rows, rows + 1 - lag] = 1.0
        return pattern

    lag1 = detect_head(model, sequence, lag_pattern(1), heads={0: [0, 1]})
    lag3 = detect_head(model, sequence, lag_pattern(3), heads={0: [0, 1]})
    assert lag1[0, 0] > 0.99 and lag1[0, 1] < 0.01
    assert lag3[0, 1] > 0.99 and lag3[0, 0] < 0.01


def test_get_act_patch_attn_head_out_by_pos_on_a_one_head_model():
    """With one copier head both layers have one head, so TL's stock per-head sweep runs as is.

    An induction head on lag 1: corrupting the current token moves the prediction; patching the copier's
    output back at that position restores it, while patching at a position past the query does nothing.
    """
    from transformer_lens.patching import get_act_patch_attn_head_out_by_pos

    model = ideal_model(tiny_config(n_heads=1, window=1, max_degree=1), lags=(1,), a=6.0).eval()
    clean = random_tokens(16, 12, seed=3)
    corrupted = clean.clone()
    query = clean.shape[1] - 2
    corrupted[:, query] = (clean[:, query] + 1) % 3
    _, clean_cache = model.run_with_cache(clean)

    def metric(log_probs):
        return log_probs[:, query].gather(1, clean[:, -1:]).mean()

    result = get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, metric)
    baseline = metric(model(corrupted))
    assert result.shape == (2, 12, 1)
    assert result[0, query, 0] - baseline > 0.05
    assert abs(result[0, query + 1, 0] - baseline) < 1e-6
