"""Head patching: which heads carry a lag's token to the prediction?"""

from __future__ import annotations

import math

import einops
import pandas as pd
import torch
from torch import Tensor

from ih_circuits.adapters import TransformerLensAdapter
from ih_circuits.checks import check_int
from ih_circuits.probes.data import resample_positions
from ih_circuits.probes.runs import Meter
from ih_circuits.seeds import derive_seed

MAX_ROWS = 2048  # sequences per patched forward (copies x batch)


def head_patching_table(
    adapter: TransformerLensAdapter, clean: Tensor, lag: int, seed: int, meter: Meter
) -> pd.DataFrame:
    """Patch every head's ``hook_z`` at the query row from a clean run into a corrupted one.

    Clean and corrupted sequences differ only in the token at lag ``lag`` of the final token. For each head,
    its output at the query row is taken from the clean run and put into the corrupted run (the same
    ``hook_z`` patch as TransformerLens's ``get_act_patch_attn_head_out_by_pos`` at one position); the
    metric is the log-probability of the clean final token. All heads are patched in batched forwards
    (one copy of the corrupted batch per head), on any TransformerLens version.

    Returns:
        One row per (layer, head), both 0-based: ``effect`` (mean of patched - corrupted, nats), its
        ``stderr`` over sequences, and ``restored``, the share of the clean - corrupted gap it restores.
    """
    check_int(lag, "lag", 1, clean.shape[1] - 2, high_text=f"seq_len-2={clean.shape[1] - 2}")
    generator = torch.Generator().manual_seed(derive_seed(seed, "head_patching_resample") % 2**62)
    corrupted = resample_positions(clean, [clean.shape[1] - 1 - lag], generator)[0]
    model = adapter.model
    heads = [(layer, head) for layer in range(adapter.n_layers) for head in range(adapter.n_heads(layer))]
    rows = clean.shape[0]
    with torch.no_grad():
        with meter.counting("head patching: clean and corrupted runs"):
            clean_out, clean_cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("attn.hook_z"))
            clean_metric = _target_log_prob(clean_out, clean)
            corrupted_metric = _target_log_prob(model(corrupted), clean)
        chunk = max(1, MAX_ROWS // rows)
        groups = [heads[start : start + chunk] for start in range(0, len(heads), chunk)]
        with meter.counting("head patching: patched runs"):
            patched = torch.cat([_patch_heads(adapter, clean_cache, corrupted, clean, group) for group in groups])
    effect = patched - corrupted_metric  # [head, batch]
    gap = float((clean_metric - corrupted_metric).mean())
    frame = pd.DataFrame(heads, columns=["layer", "head"])
    frame["effect"] = effect.mean(-1).cpu().numpy()
    frame["stderr"] = (effect.std(-1) / math.sqrt(effect.shape[-1])).cpu().numpy()
    frame["restored"] = frame["effect"] / gap if abs(gap) > 1e-9 else float("nan")
    return frame


def _target_log_prob(output: Tensor, clean: Tensor) -> Tensor:
    """log p(clean final token) at the query row T-2, per sequence."""
    return torch.log_softmax(output[:, -2].float(), -1).gather(1, clean[:, -1:])[:, 0]


def _patch_heads(
    adapter: TransformerLensAdapter, clean_cache, corrupted: Tensor, clean: Tensor, heads: list[tuple[int, int]]
) -> Tensor:
    """Metric ``[len(heads), batch]``: copy c of the corrupted batch has head ``heads[c]`` patched at the query."""
    n_copies, query = len(heads), corrupted.shape[1] - 2

    def hook_for(layer: int):
        targets = torch.tensor([head if at == layer else -1 for at, head in heads], device=corrupted.device)

        def patch(z: Tensor, hook: object) -> Tensor:
            z = einops.rearrange(z.clone(), "(copy batch) pos head d -> copy batch pos head d", copy=n_copies)
            chosen = targets[:, None] == torch.arange(z.shape[3], device=z.device)  # [copy, head]
            source = clean_cache[f"blocks.{layer}.attn.hook_z"][None, :, query].to(z.dtype)
            z[:, :, query] = torch.where(chosen[:, None, :, None], source, z[:, :, query])
            return einops.rearrange(z, "copy batch pos head d -> (copy batch) pos head d")

        return patch

    layers = sorted({layer for layer, _ in heads})
    hooks = [(f"blocks.{layer}.attn.hook_z", hook_for(layer)) for layer in layers]
    output = adapter.run_with_hooks(einops.repeat(corrupted, "b p -> (copy b) p", copy=n_copies), hooks)
    repeated_clean = einops.repeat(clean, "b p -> (copy b) p", copy=n_copies)
    return einops.rearrange(_target_log_prob(output, repeated_clean), "(copy b) -> copy b", copy=n_copies)
