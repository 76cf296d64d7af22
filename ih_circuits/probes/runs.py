"""How a probe session runs the model: one clean run with the cache the probes need, staged corrupted runs, and
restarts from the cached residual, each counted in forwards of the batch.

Cost (``Meter``): every block call over ``rows`` sequences costs rows / B x 1 / L forwards of the batch (B
sequences, L blocks), counted by hooks on the blocks while a run goes; a backward pass counts as two forwards of
the run it goes back through. Only the query row T-2 is unembedded (a hook keeps that row of the last block's
output), so no run holds logits for every position: on a GPT-2-sized vocabulary that is most of a forward's memory.

Staging (TransformerLens models whose ``forward`` takes ``start_at_layer``): a corrupted run stops at the query
layer q (``stop_at_layer``, q / L of a forward); the query-side run restarts at q from the clean residual with only
the query row replaced. ``HookedTransformer`` then runs the blocks from q on ((L - q) / L); TransformerLens 4.x's
``TransformerBridge`` runs every block and discards those below q (a whole forward, and the meter says so);
TransformerLens 3.x's bridge refuses ``start_at_layer``, and its runs start from the tokens with the residual
entering q replaced by a hook (a whole forward). ``IHTransformer`` runs whole (two layers).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ih_circuits.adapters import TransformerLensAdapter

Hook = tuple[str, Callable]


@dataclass
class Meter:
    """Forwards of the batch spent so far, by purpose, counted from the blocks that actually ran (see the module
    docstring).

    ``counting(purpose)`` attaches a plain PyTorch forward hook to every block of the model for the duration of
    a run and adds rows / B x 1 / L per block call that completes; so a run stopped at layer q costs q / L, and a
    restart costs what the model really runs (TransformerLens 4.x's ``TransformerBridge`` runs the blocks below
    ``start_at_layer`` too and discards them, so its restarts cost a whole forward of the blocks). A model whose
    blocks do not run as modules (``IHTransformer``) is counted by its runs, rows / B each (its first hook point,
    the embedding's, fires once per run).
    """

    model: nn.Module
    batch: int
    parts: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def counting(self, purpose: str) -> Iterator[None]:
        blocks = list(getattr(self.model, "blocks", []))
        calls = {"blocks": 0.0, "model": 0.0}

        def counter(key: str, unit: float):
            def count(module: nn.Module, inputs: tuple, output: object) -> None:
                rows = next(x.shape[0] for x in (*inputs, output) if isinstance(x, Tensor))
                calls[key] += rows / self.batch * unit

            return count

        handles = [block.register_forward_hook(counter("blocks", 1 / len(blocks))) for block in blocks]
        entry = next(iter(getattr(self.model, "hook_dict", {}).values()), self.model)  # the embedding's hook
        handles.append(entry.register_forward_hook(counter("model", 1.0)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            # A model whose blocks do not run as modules (IHTransformer) counts whole runs, one per embedding.
            cost = calls["blocks"] if calls["blocks"] else calls["model"]
            self.parts[purpose] = self.parts.get(purpose, 0.0) + cost

    def add_backward(self, purpose: str, forwards: float) -> None:
        """A backward pass through runs that cost ``forwards``: twice that."""
        self.parts[purpose] = self.parts.get(purpose, 0.0) + 2 * forwards

    @property
    def forwards(self) -> float:
        return float(sum(self.parts.values()))

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
    """A forward hook that keeps ``select(activation)`` (detached) in ``store[key]``; a selection smaller than the
    activation is copied, so that the store does not pin the whole activation (a query row of every layer's
    pattern, kept as views, once held 0.9 GB on the GPT-2-small shape)."""

    def hook(activation: Tensor, hook: object) -> None:
        kept = select(activation.detach())
        store[key] = kept.clone() if kept.numel() < activation.numel() else kept

    return hook


@torch.no_grad()
def clean_run(adapter: TransformerLensAdapter, tokens: Int[Tensor, "batch pos"], meter: Meter) -> CleanRun:
    """One forward: query-row log-probabilities with every layer's pattern (and residual and ``hook_z``)."""
    row = tokens.shape[1] - 2
    patterns: dict[int, Tensor] = {}
    resid: dict[int, Tensor] = {}
    z: dict[int, Tensor] = {}
    hooks = [(adapter.pattern_hook(layer), store_hook(patterns, layer)) for layer in range(adapter.n_layers)]
    with meter.counting("clean run"):
        if adapter.parts is None:
            hooks += [(f"blocks.{lyr}.hook_resid_pre", store_hook(resid, lyr)) for lyr in range(adapter.n_layers)]
            hooks += [(f"blocks.{lyr}.attn.hook_z", store_hook(z, lyr)) for lyr in range(adapter.n_layers)]
            hooks.append(query_row_hook(adapter, row))
            output = adapter.model.run_with_hooks(tokens, fwd_hooks=hooks)[:, 0]
        else:
            output = adapter.model.run_with_hooks(tokens, fwd_hooks=hooks)[:, row]
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
    with meter.counting(purpose):
        if adapter.restartable:
            try:
                output = adapter.model.run_with_hooks(resid, start_at_layer=layer, fwd_hooks=every)
            except NotImplementedError:
                adapter.restartable = False
        if not adapter.restartable:
            replace = (f"blocks.{layer}.hook_resid_pre", lambda x, hook: resid.to(x.dtype))
            output = adapter.model.run_with_hooks(tokens, fwd_hooks=[replace, *every])
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
    models) or at the copier output (``IHTransformer``), with the query-row patterns of the later layers.

    TransformerLens models run one corrupted copy of the batch at a time, so no run holds more activations than a
    forward of the batch (eight copies at once peaked at 8.8x one forward's added memory on the GPT-2-small
    shape)."""
    if adapter.parts is not None:
        return _query_side_whole(adapter, tokens, corrupted, clean, meter)
    n_variants, batch, n_pos = corrupted.shape
    row = n_pos - 2
    log_probs = torch.empty(n_variants, batch, adapter.d_vocab, device=tokens.device)
    whole = torch.empty_like(log_probs) if total else None
    patterns: dict[int, Tensor] = {}
    z: dict[int, Tensor] = {}
    for variant, chunk in enumerate(corrupted):
        hooks = [
            (f"blocks.{lyr}.attn.hook_z", fill_hook(z, lyr, variant, n_variants, lambda x: x[:, row]))
            for lyr in range(layer)
        ]
        with meter.counting("parents: corrupted runs to the query layer"):
            resid_q = adapter.model.run_with_hooks(chunk, stop_at_layer=layer, fwd_hooks=hooks)
        patched = clean.resid[layer].clone()
        patched[:, row] = resid_q[:, row]
        capture = [
            (adapter.pattern_hook(lyr), fill_hook(patterns, lyr, variant, n_variants, lambda x: x[:, :, row]))
            for lyr in range(layer, adapter.n_layers)
        ]
        restarted = run_from(adapter, patched, layer, tokens, capture, meter, "parents: query-side restarts")
        log_probs[variant] = restarted
        if whole is not None:
            whole[variant] = run_from(adapter, resid_q, layer, chunk, [], meter, "parents: total effect")
    return QuerySide(log_probs, whole, patterns, z)


def fill_hook(store: dict, key: object, index: int, count: int, select: Callable[[Tensor], Tensor]) -> Callable:
    """A forward hook that copies ``select(activation)`` into ``store[key][index]``, a float32 buffer of ``count``
    such rows made on the first call. The corrupted variants run one at a time, so writing into one buffer keeps
    the small kept rows from landing between the runs' large transient tensors (kept as separate tensors, they
    fragmented the heap: 0.3 GB of extra peak memory on the GPT-2-small shape)."""

    def hook(activation: Tensor, hook: object) -> None:
        kept = select(activation.detach())
        if key not in store:
            store[key] = torch.empty(count, *kept.shape, dtype=torch.float32, device=kept.device)
        store[key][index] = kept

    return hook


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
    with meter.counting("parents: corrupted runs"):
        output = adapter.model.run_with_hooks(flat, fwd_hooks=[(site, store_hook(store, "site"))])
    patterns: dict[int, Tensor] = {}

    def replace(activation: Tensor, hook: object) -> Tensor:
        activation = activation.clone()
        activation[:, row] = store["site"][:, row].to(activation.dtype)
        return activation

    capture = [(adapter.pattern_hook(1), store_hook(patterns, 1, lambda x: x[:, : adapter.n_heads(1), row]))]
    with meter.counting("parents: query-side runs"):
        patched = adapter.model.run_with_hooks(tokens.repeat(n_variants, 1), fwd_hooks=[(site, replace), *capture])

    def shaped(log_probs: Tensor) -> Tensor:
        return torch.log_softmax(log_probs[:, row].float(), -1).reshape(n_variants, batch, -1)

    return QuerySide(
        shaped(patched),
        shaped(output),
        {1: patterns[1].float().reshape(n_variants, batch, *patterns[1].shape[1:])},
        {},
    )
