"""How a probe session runs the model: one clean run with the cache the probes need, staged corrupted runs, and
restarts from the cached residual, each counted in forwards of the batch.

Cost (``Meter``): a run over ``rows`` sequences through ``layers`` of the model's L layers costs
rows / B x layers / L forwards of the batch (B sequences); a backward pass counts as two forwards of the layers it
goes through. Only the query row T-2 is unembedded (a hook keeps that row of the last block's output), so no run
holds logits for every position: on a GPT-2-sized vocabulary that is most of a forward's memory.

Staging (TransformerLens models whose ``forward`` takes ``start_at_layer``, as ``HookedTransformer`` and
``TransformerBridge`` do): a corrupted run stops at the query layer q (``stop_at_layer``, q / L of a forward);
the query-side run restarts at q from the clean residual with only the query row replaced ((L - q) / L). Models
without ``start_at_layer`` run from the tokens with the residual entering q replaced by a hook (a whole forward);
``IHTransformer`` runs whole (two layers).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ih_circuits.adapters import TransformerLensAdapter

Hook = tuple[str, Callable]
VARIANTS_PER_RUN = 1
"""Corrupted copies of the batch per staged run: one, so no run holds more activations than a forward of the batch
(measured on the GPT-2-small shape: eight copies at once peaked at 8.8x one forward's added memory)."""


@dataclass
class Meter:
    """Forwards of the batch spent so far, by purpose (see the module docstring)."""

    n_layers: int
    batch: int
    parts: dict[str, float] = field(default_factory=dict)

    def add(self, purpose: str, rows: int, layers: int, *, backward: bool = False) -> None:
        cost = rows / self.batch * layers / self.n_layers * (2 if backward else 1)
        self.parts[purpose] = self.parts.get(purpose, 0.0) + cost

    @property
    def forwards(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        items = ", ".join(f"{name} {cost:.2f}" for name, cost in self.parts.items())
        return f"{self.forwards:.2f} forwards of the batch ({items})"


@dataclass
class CleanRun:
    """The clean run's cache: query-row log-probabilities, every layer's patterns, and (TransformerLens models)
    every layer's input residual and per-head outputs ``hook_z``."""

    log_probs: Float[Tensor, "batch d_vocab"]
    patterns: dict[int, Float[Tensor, "batch head query_pos key_pos"]]
    resid: dict[int, Tensor]
    z: dict[int, Tensor]


@dataclass
class QuerySide:
    """Corrupted variants seen on the query side: query-row log-probabilities, optionally the whole corrupted run's,
    each layer's query-row pattern (layers >= q) and the corrupted run's per-head outputs at the query row
    (layers < q)."""

    log_probs: Float[Tensor, "variant batch d_vocab"]
    total: Float[Tensor, "variant batch d_vocab"] | None
    patterns: dict[int, Float[Tensor, "variant batch head key_pos"]]
    z: dict[int, Float[Tensor, "variant batch head d_head"]]


def query_row_hook(adapter: TransformerLensAdapter, row: int) -> Hook:
    """Keep only the query row of the last block's output, so the unembedding runs on one position."""
    return (f"blocks.{adapter.n_layers - 1}.hook_resid_post", lambda x, hook: x[:, row : row + 1])


def store_hook(store: dict, key: object, select: Callable[[Tensor], Tensor] = lambda x: x) -> Callable:
    """A forward hook that keeps ``select(activation)`` (detached) in ``store[key]``."""

    def hook(activation: Tensor, hook: object) -> None:
        store[key] = select(activation.detach())

    return hook


@torch.no_grad()
def clean_run(adapter: TransformerLensAdapter, tokens: Int[Tensor, "batch pos"], meter: Meter) -> CleanRun:
    """One forward: query-row log-probabilities with every layer's pattern (and residual and ``hook_z``)."""
    row = tokens.shape[1] - 2
    patterns: dict[int, Tensor] = {}
    resid: dict[int, Tensor] = {}
    z: dict[int, Tensor] = {}
    hooks = [(adapter.pattern_hook(layer), store_hook(patterns, layer)) for layer in range(adapter.n_layers)]
    if adapter.parts is None:
        hooks += [(f"blocks.{layer}.hook_resid_pre", store_hook(resid, layer)) for layer in range(adapter.n_layers)]
        hooks += [(f"blocks.{layer}.attn.hook_z", store_hook(z, layer)) for layer in range(adapter.n_layers)]
        hooks.append(query_row_hook(adapter, row))
        output = adapter.model.run_with_hooks(tokens, fwd_hooks=hooks)[:, 0]
    else:
        output = adapter.model.run_with_hooks(tokens, fwd_hooks=hooks)[:, row]
    meter.add("clean run", tokens.shape[0], adapter.n_layers)
    patterns = {layer: p[:, : adapter.n_heads(layer)].float() for layer, p in patterns.items()}
    return CleanRun(torch.log_softmax(output.float(), -1), patterns, resid, z)


def run_from(
    adapter: TransformerLensAdapter,
    resid: Tensor,
    layer: int,
    tokens: Int[Tensor, "rows pos"],
    hooks: list[Hook],
    meter: Meter,
    purpose: str,
) -> Float[Tensor, "rows d_vocab"]:
    """Query-row log-probabilities of a run that enters ``layer`` with residual ``resid``.

    Restarts at ``layer`` where the model can (``start_at_layer``: (L - layer) / L of a forward); otherwise runs
    ``tokens`` from the start with the residual entering ``layer`` replaced (a whole forward). Whether it can is
    learnt on the first run and kept on the adapter (``restartable``): the model's ``forward`` must take
    ``start_at_layer`` (``IHTransformer``'s does not), and TransformerLens 3.x's ``TransformerBridge`` takes it but
    raises ``NotImplementedError``."""
    row = resid.shape[1] - 2
    every = [*hooks, query_row_hook(adapter, row)]
    if adapter.restartable is None:
        adapter.restartable = "start_at_layer" in inspect.signature(adapter.model.forward).parameters
    if adapter.restartable:
        try:
            output = adapter.model.run_with_hooks(resid, start_at_layer=layer, fwd_hooks=every)
        except NotImplementedError:
            adapter.restartable = False
    if adapter.restartable:
        meter.add(purpose, resid.shape[0], adapter.n_layers - layer)
    else:
        replace = (f"blocks.{layer}.hook_resid_pre", lambda x, hook: resid.to(x.dtype))
        output = adapter.model.run_with_hooks(tokens, fwd_hooks=[replace, *every])
        meter.add(purpose, resid.shape[0], adapter.n_layers)
    return torch.log_softmax(output[:, 0].float(), -1)


@torch.no_grad()
def query_side(
    adapter: TransformerLensAdapter,
    tokens: Int[Tensor, "batch pos"],
    corrupted: Int[Tensor, "variant batch pos"],
    layer: int,
    clean: CleanRun,
    meter: Meter,
    *,
    total: bool,
) -> QuerySide:
    """Each corrupted variant seen only by the query row's history at the input of ``layer`` (TransformerLens
    models) or at the copier output (``IHTransformer``), with the query-row patterns of the later layers."""
    if adapter.parts is not None:
        return _query_side_whole(adapter, tokens, corrupted, clean, meter)
    n_variants, batch, n_pos = corrupted.shape
    row = n_pos - 2
    parts: list[QuerySide] = []
    for start in range(0, n_variants, VARIANTS_PER_RUN):
        chunk = corrupted[start : start + VARIANTS_PER_RUN].flatten(0, 1)
        n = chunk.shape[0] // batch
        z: dict[int, Tensor] = {}
        hooks = [(f"blocks.{lyr}.attn.hook_z", store_hook(z, lyr, lambda x: x[:, row])) for lyr in range(layer)]
        resid_q = adapter.model.run_with_hooks(chunk, stop_at_layer=layer, fwd_hooks=hooks)
        meter.add("parents: corrupted runs to the query layer", chunk.shape[0], layer)
        patched = clean.resid[layer].repeat(n, 1, 1)
        patched[:, row] = resid_q[:, row]
        patterns: dict[int, Tensor] = {}
        capture = [
            (adapter.pattern_hook(lyr), store_hook(patterns, lyr, lambda x: x[:, :, row]))
            for lyr in range(layer, adapter.n_layers)
        ]
        repeated = tokens.repeat(n, 1)
        log_probs = run_from(adapter, patched, layer, repeated, capture, meter, "parents: query-side restarts")
        whole = run_from(adapter, resid_q, layer, chunk, [], meter, "parents: total effect") if total else None
        parts.append(
            QuerySide(
                log_probs.reshape(n, batch, -1),
                None if whole is None else whole.reshape(n, batch, -1),
                {lyr: p.float().reshape(n, batch, *p.shape[1:]) for lyr, p in patterns.items()},
                {lyr: v.reshape(n, batch, *v.shape[1:]) for lyr, v in z.items()},
            )
        )
    return _concat(parts)


def _concat(parts: list[QuerySide]) -> QuerySide:
    first = parts[0]
    return QuerySide(
        torch.cat([p.log_probs for p in parts]),
        None if first.total is None else torch.cat([p.total for p in parts]),
        {lyr: torch.cat([p.patterns[lyr] for p in parts]) for lyr in first.patterns},
        {lyr: torch.cat([p.z[lyr] for p in parts]) for lyr in first.z},
    )


def _query_side_whole(
    adapter: TransformerLensAdapter,
    tokens: Tensor,
    corrupted: Tensor,
    clean: CleanRun,
    meter: Meter,
) -> QuerySide:
    """``IHTransformer``: the copier output's query row taken from the corrupted run (two whole runs per variant;
    the corrupted run's own prediction, the total effect, comes free)."""
    n_variants, batch, n_pos = corrupted.shape
    row = n_pos - 2
    site = adapter.history_site(None)
    flat = corrupted.flatten(0, 1)
    store: dict[str, Tensor] = {}
    output = adapter.model.run_with_hooks(flat, fwd_hooks=[(site, store_hook(store, "site"))])
    meter.add("parents: corrupted runs", flat.shape[0], adapter.n_layers)
    patterns: dict[int, Tensor] = {}

    def replace(activation: Tensor, hook: object) -> Tensor:
        activation = activation.clone()
        activation[:, row] = store["site"][:, row].to(activation.dtype)
        return activation

    capture = [(adapter.pattern_hook(1), store_hook(patterns, 1, lambda x: x[:, : adapter.n_heads(1), row]))]
    patched = adapter.model.run_with_hooks(tokens.repeat(n_variants, 1), fwd_hooks=[(site, replace), *capture])
    meter.add("parents: query-side runs", flat.shape[0], adapter.n_layers)

    def shaped(log_probs: Tensor) -> Tensor:
        return torch.log_softmax(log_probs[:, row].float(), -1).reshape(n_variants, batch, -1)

    return QuerySide(
        shaped(patched),
        shaped(output),
        {1: patterns[1].float().reshape(n_variants, batch, *patterns[1].shape[1:])},
        {},
    )
