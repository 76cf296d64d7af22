"""Hand-wired attention-only TransformerLens models that implement an exact (generalized) induction circuit.

They are ground truth for the probe tests: we know which heads are copiers (and at which offset), which head
is the induction head, and what the model predicts.

Conventions (those of the probes): row t of the output predicts token t+1 from tokens 0..t; lag s of that
prediction is the token x_{t+1-s} (lag 1 = the current token x_t). For a lag set L, the *history* of the
token at position u is (x_{u-s})_{s in L}. The induction head at row t attends to the keys l <= t whose token
x_l has the same complete history as the token row t predicts, (x_{l-s})_{s in L} = (x_{t+1-s})_{s in L},
and copies x_l.

Circuit:

- **Layer 0 (copiers)**: one positional head per offset o in ``{s : s in L} | {s - 1 : s in L, s > 1}``
  (heads ordered by offset, see ``copier_heads``). Head "offset o" attends from position i to i - o and writes
  the one-hot of that token into its own residual slot. Rows i < o (no position i - o) attend to position 0.
- **Middle layers** (``n_layers > 2``): every head inert (zero W_V and W_O, so it writes nothing).
- **Last layer (induction head, head 0)**: query at t = concat over s in L of onehot(x_{t+1-s}) (the token slot
  for s = 1, the offset-(s-1) slot otherwise); key at l = concat over s in L of onehot(x_{l-s}) (offset-s
  slots), plus a penalty of one match per lag with l - s < 0 (its slot holds x_0, not a real token), so an
  incomplete key history never counts as a match. Score = ``sharpness`` x (#matching lags - #missing lags),
  after TransformerLens's 1/sqrt(d_head) scale. Value = the token one-hot at l, written to the output slot.
  Keys with a full match therefore get all but ~n_ctx * exp(-sharpness) of the attention, evenly.
  When no key matches, attention spreads evenly over the keys with the most matching lags (for L = (1,):
  over all keys l >= 1), so the prediction is a local unigram, not anything principled.
- **Unembedding** reads only the output slot, times ``gain``: logits = gain x (empirical distribution of the
  tokens that followed matching histories). Token and position embeddings are one-hots; all biases are 0.

Residual layout (``residual_layout``): ``[token one-hot (d_vocab) | position one-hot (n_ctx) | one d_vocab
slot per copier offset, in offset order | output slot (d_vocab) | junk slot (d_vocab)]``, d_model = d_vocab x
(3 + #offsets) + n_ctx; the junk slot takes what distractor heads and MLPs write (``induction_circuit``'s options
place the copiers and the induction head in any layers, split a copier over two heads, add distractor heads
and MLPs), and nothing reads it.
d_head = max(n_ctx, |L| x d_vocab + 1); n_heads = max(#offsets, 1) in every layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

DEFAULT_SHARPNESS = 30.0
DEFAULT_GAIN = 20.0


def _lags(lags: Sequence[int]) -> tuple[int, ...]:
    values = list(lags)
    if not values or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in values):
        raise ValueError(f"lags must be a non-empty sequence of integers >= 1; got {lags!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"lags must not repeat; got {lags!r}")
    return tuple(sorted(values))


def copier_offsets(lags: Sequence[int]) -> tuple[int, ...]:
    """The offsets layer 0 copies for lag set ``lags``: keys need offsets s, queries s - 1 (0 = the embedding)."""
    lags = _lags(lags)
    return tuple(sorted(set(lags) | {s - 1 for s in lags if s > 1}))


def copier_heads(lags: Sequence[int]) -> dict[int, int]:
    """Layer-0 head index -> the offset it copies (head h attends from position i to i - offset)."""
    return dict(enumerate(copier_offsets(lags)))


DISTRACTOR_OFFSET = 4


def extra_heads(lags: Sequence[int], *, shared: bool = False, distractors: bool = False) -> dict[int, tuple[int, str]]:
    """Copier-layer heads after the copiers: head -> (offset attended, what it writes: "half" of the offset's
    one-hot into its slot, "silent" nothing, "junk" into the junk slot)."""
    offsets = copier_offsets(lags)
    heads: dict[int, tuple[int, str]] = {}
    if shared:
        heads[len(offsets)] = (offsets[0], "half")
    if distractors:
        heads[len(offsets) + len(heads)] = (offsets[0], "silent")
        heads[len(offsets) + len(heads)] = (DISTRACTOR_OFFSET, "junk")
    return heads


def induction_head_location(lags: Sequence[int], n_layers: int = 2) -> tuple[int, int]:
    """(layer, head) of the induction head of ``induction_circuit(lags, n_layers=n_layers)``: head 0, last layer."""
    _lags(lags)
    if n_layers < 2:
        raise ValueError(f"n_layers must be >= 2; got {n_layers}")
    return (n_layers - 1, 0)


def residual_layout(lags: Sequence[int], *, d_vocab: int = 8, n_ctx: int = 32) -> dict[str, slice]:
    """Residual-stream slices: ``token``, ``position``, ``offset_{o}`` for each copier offset, ``output``."""
    layout = {"token": slice(0, d_vocab), "position": slice(d_vocab, d_vocab + n_ctx)}
    start = d_vocab + n_ctx
    for offset in copier_offsets(lags):
        layout[f"offset_{offset}"] = slice(start, start + d_vocab)
        start += d_vocab
    layout["output"] = slice(start, start + d_vocab)
    return layout


def induction_circuit(
    lags: Sequence[int] = (1,),
    *,
    d_vocab: int = 8,
    n_ctx: int = 32,
    n_layers: int = 2,
    sharpness: float = DEFAULT_SHARPNESS,
    gain: float = DEFAULT_GAIN,
    copier_layer: int = 0,
    induction_layer: int | None = None,
    shared: bool = False,
    distractors: bool = False,
    mlp: bool = False,
) -> TransformerBridge:
    """An attention-only ``TransformerBridge`` whose weights implement the exact induction circuit for ``lags``.

    Args:
        lags: the history lags L (positive, distinct; any order), e.g. (1,), (1, 2), (1, 3).
        d_vocab: vocabulary size.
        n_ctx: context length; max(lags) must be < n_ctx.
        n_layers: >= 2; layer 0 holds the copiers (``copier_heads``), the last layer the induction head
            (``induction_head_location``), any layers between are inert.
        sharpness: attention logit gap (after the 1/sqrt(d_head) scale) between the intended keys and the
            rest, per mismatching lag; 30 leaves ~1e-12 of the mass elsewhere.
        gain: unembedding gain: logits = gain x the induction head's copied token distribution.
        copier_layer, induction_layer: where the copiers and the induction head sit (default 0 and the last
            layer); every other layer is inert (or holds only the distractors and MLPs below).
        shared: the copier of the smallest offset is split over two heads that both attend to it and each write
            half of its one-hot (two heads sharing one job).
        distractors: two more heads in the copier layer: one attends to the smallest offset but writes nothing,
            one attends to offset ``DISTRACTOR_OFFSET`` and writes into the junk slot.
        mlp: an MLP in every block that reads the token slot and writes only into the junk slot.

    Returns:
        the model, in eval mode, float32, on CPU. See the module docstring for the circuit and residual layout.
    """
    lags = _lags(lags)
    if n_layers < 2:
        raise ValueError(f"n_layers must be >= 2; got {n_layers}")
    if d_vocab < 1 or n_ctx < 2 or max(lags) >= n_ctx:
        raise ValueError(f"need d_vocab >= 1 and max(lags) < n_ctx; got d_vocab={d_vocab}, n_ctx={n_ctx}, {lags=}")
    induction_layer = n_layers - 1 if induction_layer is None else induction_layer
    if not 0 <= copier_layer < induction_layer < n_layers:
        raise ValueError(f"need 0 <= copier_layer < induction_layer < n_layers; got {copier_layer}, {induction_layer}")
    offsets = copier_offsets(lags)
    layout = residual_layout(lags, d_vocab=d_vocab, n_ctx=n_ctx)
    junk = layout["output"].stop
    d_model = junk + d_vocab
    heads = extra_heads(lags, shared=shared, distractors=distractors)
    n_heads = len(offsets) + len(heads)
    d_head = max(n_ctx, len(lags) * d_vocab + 1)
    cfg = TransformerBridgeConfig(
        d_model=d_model,
        d_head=d_head,
        n_layers=n_layers,
        n_ctx=n_ctx,
        n_heads=n_heads,
        d_vocab=d_vocab,
        attn_only=not mlp,
        d_mlp=d_vocab,
        act_fn="relu",
        normalization_type=None,
        positional_embedding_type="standard",
        seed=0,
    )
    model = TransformerBridge.boot_native(cfg)
    native = model.original_model
    # Scores are q.k / sqrt(d_head) in NativeAttention; put the whole scale on the query side.
    q_scale = sharpness * math.sqrt(d_head)

    tok = layout["token"].start
    pos = layout["position"].start
    out = layout["output"].start
    slot = {o: layout[f"offset_{o}"].start for o in offsets}
    vocab = torch.arange(d_vocab)

    with torch.no_grad():
        for param in native.parameters():
            param.zero_()
        native.tok_embed.weight[vocab, tok + vocab] = 1.0
        native.pos.weight[torch.arange(n_ctx), pos + torch.arange(n_ctx)] = 1.0

        # Copier layer: head h attends from i to i - o (rows i < o: to position 0) and copies that token to slot o.
        attn = native.layers[copier_layer].attn
        writes = {head: (slot[offset], 1.0) for head, offset in copier_heads(lags).items()}
        attends = dict(copier_heads(lags))
        for head, (offset, target) in heads.items():
            attends[head] = offset
            writes[head] = {"half": (slot.get(offset), 0.5), "silent": None, "junk": (junk, 1.0)}[target]
        if shared:
            writes[0] = (slot[offsets[0]], 0.5)
        for head, offset in attends.items():
            base = head * d_head
            for i in range(n_ctx):
                attn.q.weight[base + max(i, offset), pos + i] = q_scale
            for j in range(n_ctx - offset):
                attn.k.weight[base + j + offset, pos + j] = 1.0
            attn.v.weight[base + vocab, tok + vocab] = 1.0
            if writes[head] is not None:
                start, scale = writes[head]
                attn.o.weight[start + vocab, base + vocab] = scale
        if mlp:
            generator = torch.Generator().manual_seed(0)
            for layer in native.layers:
                layer.mlp.fc_in.weight[:, tok : tok + d_vocab] = torch.randn(d_vocab, d_vocab, generator=generator)
                layer.mlp.fc_out.weight[junk + vocab, :] = torch.randn(d_vocab, d_vocab, generator=generator)

        # Induction layer, head 0: match the query's history against each key's history, copy the key's token.
        attn = native.layers[induction_layer].attn
        for k, s in enumerate(lags):
            block = k * d_vocab + vocab
            query_start = tok if s == 1 else slot[s - 1]
            attn.q.weight[block, query_start + vocab] = q_scale
            attn.k.weight[block, slot[s] + vocab] = 1.0
        penalty = len(lags) * d_vocab
        attn.q.weight[penalty, pos : pos + n_ctx] = q_scale  # the position one-hot sums to 1: a constant
        for j in range(n_ctx):
            attn.k.weight[penalty, pos + j] = -float(sum(j < s for s in lags))
        attn.v.weight[vocab, tok + vocab] = 1.0
        attn.o.weight[out + vocab, vocab] = 1.0

        native.head.weight[vocab, out + vocab] = gain
    model.eval()
    return model
