"""Head patching with TransformerLens's own ``generic_activation_patch``: which heads carry a lag's token?"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import Tensor, nn

from ih_circuits.adapters import adapt
from ih_circuits.probes.data import Data, probe_data, resample_positions
from ih_circuits.training import derive_seed


def head_patching(model: nn.Module, data: Data, lag: int, *, n_sequences: int = 64, seed: int = 0) -> pd.DataFrame:
    """TransformerLens's ``generic_activation_patch`` over every head's ``hook_z`` at the query row.

    Clean and corrupted sequences differ only in the token at lag ``lag`` of the final token. Each head's
    output at the query row is patched from the clean run into the corrupted one; the metric is the
    log-probability of the clean final token. Returns one row per (layer, head), both 0-based, with the mean
    effect (patched - corrupted, nats), its standard error and the share of the clean-corrupted gap it
    restores. An explicit ``index_df`` handles layers with different head counts. The model is run in eval
    mode (TransformerLens's patching requires it) and returned to its mode afterwards.
    """
    from transformer_lens.patching import generic_activation_patch, layer_pos_head_vector_patch_setter

    adapter = adapt(model)
    resolved = probe_data(data, adapter)
    if isinstance(lag, bool) or not isinstance(lag, int) or not 1 <= lag <= resolved.seq_len - 2:
        raise ValueError(f"lag must be an integer in 1..seq_len-2={resolved.seq_len - 2}; got {lag!r}")
    clean = resolved.tokens_for(n_sequences, seed, "head_patching", adapter.device)
    generator = torch.Generator().manual_seed(derive_seed(seed, "head_patching_resample") % 2**62)
    corrupted = resample_positions(clean, [clean.shape[1] - 1 - lag], generator)[0]
    query = clean.shape[1] - 2
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clean_out, clean_cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("attn.hook_z"))

            def metric(output: Tensor) -> Tensor:
                return torch.log_softmax(output[:, query].float(), -1).gather(1, clean[:, -1:])[:, 0]

            index_df = pd.DataFrame(
                [(layer, query, head) for layer in range(adapter.n_layers) for head in range(adapter.n_heads(layer))],
                columns=["layer", "pos", "head"],
            )
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
            clean_metric = metric(clean_out)
    finally:
        model.train(was_training)
    effect = result.values - result.baseline
    gap = float((clean_metric - result.baseline).mean())
    frame = index_df[["layer", "head"]].copy()
    frame["effect"] = effect.mean(-1).cpu().numpy()
    frame["stderr"] = (effect.std(-1) / math.sqrt(effect.shape[-1])).cpu().numpy()
    frame["restored"] = frame["effect"] / gap if abs(gap) > 1e-9 else float("nan")
    return frame
