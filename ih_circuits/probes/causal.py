"""Causal evidence for head roles: attribution patching ranks every head at once, exact path patching confirms.

Two paths carry a parent s of the prediction into an induction head (lag s is the token at T-1-s; a head at
offset o reads lag o + 1 at the query row):

- **query side** (s > 1): a head at offset s - 1 brings the lag-s token into the query row before the query
  layer. Patch: the head's output ``hook_z`` at the query row taken from the lag-s-corrupted run, everything else
  clean; measure KL(clean || patched) at the query row. *Share*: that KL over the lag's query-side effect.
- **key side** (every s): a head at offset s writes x_{j-s} into key j, so the induction heads can find the keys
  whose history matches. Patch: the head's output at every key position (not the query row) taken from another
  sequence of the batch (resample ablation); measure the induction heads' attention on the matching keys at the
  query row and the prediction. *Share*: the drop of that attention over its lift above chance,
  (clean - patched) / (clean - chance).

Attribution patching (one forward and one backward of the clean batch) estimates every head's effect on the
log-probability of the true next token as grad . (patched - clean) activation; the ``top_k`` heads it ranks
first on each side, and every head whose attention makes it a candidate for the side, are confirmed by exact
patching (each a restart from the head's layer; ``exhaustive`` patches every head). Heads that share a job are
also patched together: redundant heads can each look unused alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ih_circuits.adapters import TransformerLensAdapter
from ih_circuits.predictors import kl_divergence
from ih_circuits.probes.behavioural import mean_stderr
from ih_circuits.probes.roles import head_name
from ih_circuits.probes.runs import CleanRun, Meter, query_row_hook, run_from, store_hook

Head = tuple[int, int]


@dataclass
class Attribution:
    """Attribution-patching estimates (nats of the true token's log-probability) per head: key side, and query
    side per lag."""

    key: dict[Head, float]
    query: dict[int, dict[Head, float]]


def attribute(
    adapter: TransformerLensAdapter,
    tokens: Int[Tensor, "batch pos"],
    clean: CleanRun,
    corrupted_z: dict[int, dict[int, Tensor]],
    meter: Meter,
) -> Attribution:
    """One forward and one backward: d log p(x_{T-1}) / d z at every head, times the key-side (another
    sequence's z at the keys) and query-side (the lag-s-corrupted z at the query row) differences."""
    row = tokens.shape[1] - 2
    z: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(activation: Tensor, hook: object) -> Tensor:
            z[layer] = activation
            return activation

        return hook

    hooks = [(f"blocks.{layer}.attn.hook_z", keep(layer)) for layer in range(adapter.n_layers)]
    with torch.enable_grad():
        with meter.counting("heads: attribution forward"):
            output = adapter.model.run_with_hooks(tokens, fwd_hooks=[*hooks, query_row_hook(adapter, row)])[:, 0]
        metric = torch.log_softmax(output.float(), -1).gather(1, tokens[:, -1:]).mean()
        layers = sorted(z)
        grads = dict(zip(layers, torch.autograd.grad(metric, [z[lyr] for lyr in layers]), strict=True))
    meter.add_backward("heads: attribution backward", meter.parts["heads: attribution forward"])
    key: dict[Head, float] = {}
    query: dict[int, dict[Head, float]] = {lag: {} for lag in corrupted_z}
    for layer in layers:
        grad, value = grads[layer].detach().float(), clean.z[layer].float()
        other = value.roll(1, 0)
        key_effect = (grad[:, :row] * (other[:, :row] - value[:, :row])).sum((1, 3)).mean(0)
        for head in range(grad.shape[2]):
            key[(layer, head)] = float(key_effect[head])
        for lag, by_layer in corrupted_z.items():
            if layer in by_layer:
                diff = by_layer[layer].float() - value[:, row]
                effect = (grad[:, row] * diff).sum(-1).mean(0)
                for head in range(grad.shape[2]):
                    query[lag][(layer, head)] = float(effect[head])
    return Attribution(key, query)


def _patch_z(heads: list[Head], source: dict[int, Tensor], positions: slice | int):
    """Hooks putting ``source[layer]`` into ``hook_z`` of the given heads at ``positions``."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def hook_for(layer: int):
        chosen = by_layer[layer]

        def patch(activation: Tensor, hook: object) -> Tensor:
            activation = activation.clone()
            value = source[layer].to(activation.dtype)
            activation[:, positions, chosen] = value[:, positions, chosen] if value.ndim == 4 else value[:, chosen]
            return activation

        return patch

    return [(f"blocks.{layer}.attn.hook_z", hook_for(layer)) for layer in sorted(by_layer)]


def matching_mass(
    patterns: dict[int, Tensor], induction: list[Head], match: Bool[Tensor, "batch key_pos"]
) -> Float[Tensor, " batch"]:
    """Mean over the induction heads of the query row's attention on the matching keys, per sequence."""
    masses = [(patterns[layer][:, head] * match).sum(-1) for layer, head in induction]
    return torch.stack(masses).mean(0)


def key_side(
    adapter: TransformerLensAdapter,
    tokens: Int[Tensor, "batch pos"],
    clean: CleanRun,
    groups: list[list[Head]],
    induction: list[Head],
    match: Bool[Tensor, "batch key_pos"],
    meter: Meter,
) -> pd.DataFrame:
    """Exact key-side patching of each group of heads (see the module docstring); one row per group."""
    row = tokens.shape[1] - 2
    other = {layer: z.roll(1, 0) for layer, z in clean.z.items()}
    has = match.any(-1)
    clean_rows = {layer: clean.patterns[layer][:, :, row] for layer in {lyr for lyr, _ in induction}}
    clean_mass = matching_mass(clean_rows, induction, match)[has]
    chance = (match.float().sum(-1) / (row + 1))[has]
    lift = float((clean_mass - chance).mean())
    records = []
    for group in groups:
        start = min(layer for layer, _ in group)
        captured: dict[int, Tensor] = {}
        capture = [
            (adapter.pattern_hook(layer), store_hook(captured, layer, lambda x: x[:, :, row].float()))
            for layer in clean_rows
            if layer >= start
        ]
        with torch.no_grad():
            hooks = [*_patch_z(group, other, slice(0, row)), *capture]
            log_probs = run_from(adapter, clean.resid[start], start, tokens, hooks, meter, "heads: key-side patching")
        kl = kl_divergence(clean.log_probs, log_probs, kind="log_probs").clamp_min(0)
        patterns = {**clean_rows, **captured}
        mass = matching_mass(patterns, induction, match)[has]
        drop = float((clean_mass - mass).mean())
        kl_mean, kl_stderr = mean_stderr(kl)
        records.append(
            {
                "heads": " + ".join(head_name(*h) for h in group),
                "side": "key",
                "kl": float(kl_mean),
                "kl_stderr": float(kl_stderr),
                "matching_attention": float(mass.mean()) if len(mass) else float("nan"),
                "share": drop / lift if lift > 1e-9 else 0.0,
            }
        )
    return pd.DataFrame(records)


def query_side_patching(
    adapter: TransformerLensAdapter,
    tokens: Int[Tensor, "batch pos"],
    clean: CleanRun,
    lag: int,
    corrupted_z: dict[int, Tensor],
    lag_effect: float,
    groups: list[list[Head]],
    meter: Meter,
) -> pd.DataFrame:
    """Exact query-side path patching for ``lag``: each group's ``hook_z`` at the query row from the lag-corrupted
    run; one row per group with the KL and its share of the lag's query-side effect."""
    row = tokens.shape[1] - 2
    records = []
    for group in groups:
        start = min(layer for layer, _ in group)
        with torch.no_grad():
            hooks = _patch_z(group, corrupted_z, row)
            log_probs = run_from(adapter, clean.resid[start], start, tokens, hooks, meter, "heads: query-side patching")
        kl = kl_divergence(clean.log_probs, log_probs, kind="log_probs").clamp_min(0)
        mean, stderr = (float(v) for v in mean_stderr(kl))
        records.append(
            {
                "heads": " + ".join(head_name(*h) for h in group),
                "side": f"query (lag {lag})",
                "kl": mean,
                "kl_stderr": stderr,
                "matching_attention": float("nan"),
                "share": mean / lag_effect if lag_effect > 1e-12 else 0.0,
            }
        )
    return pd.DataFrame(records)


def pattern_shift(
    clean_row: Float[Tensor, "batch head key_pos"], corrupted_rows: Float[Tensor, "lag batch head key_pos"]
) -> tuple[Float[Tensor, "lag head"], Float[Tensor, "lag head"]]:
    """Total variation between each head's clean and query-side-corrupted query-row attention: mean, stderr."""
    tv = 0.5 * (corrupted_rows - clean_row[None]).abs().sum(-1)  # [lag, batch, head]
    return mean_stderr(tv.transpose(1, 2))
