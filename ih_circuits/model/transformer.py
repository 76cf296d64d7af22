"""``IHTransformer``: the paper's two-attention-layer model as a TransformerLens ``HookedRootModule``.

Layout (one position per input token, as TransformerLens's patching sweeps assume): position t is the
query slot for token t+1. Row t of the output is log p(x_{t+1} | x_0..x_t); the last row of a sequence
that ends in its target is unused, and row T-2 is the paper's query prediction.

    tokens ─ hook_embed (one-hot) ─┬─ blocks.0.attn  copier: v_h(t) = copies of x_{t+1-s} ── hook_result
                                   │                                                           │
                                   │  blocks.0.mlp  selector: K(t, j) = Σ_S c_S² Π_h<v_h(t),v_h(j)> / Σ c²
                                   │                                                           │
                                   └─ blocks.1.attn classifier: softmax_j<t(a K(t, j)) · onehot(x_{j+1})
                                                                                   └─ hook_log_probs

Without hooks the forward takes a fast path: every copier output is a function of the token window at lags
1..max_lag, so K is tabulated over window codes: layer 2 reads the query row's scores from the table, and every
row from counts of (window code, next token) in blocks, both linear in T; wider windows or vocabularies use the
query row alone, or fused attention over the selector's feature map. With a hook attached (``run_with_hooks``,
``run_with_cache``, patching) every row is computed and each layer with an attached hook builds its dense
activations and passes them through its hooks, so edits are honoured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, overload

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors.torch import save_file
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from ih_circuits.chain import validate_lags
from ih_circuits.checkpoint import atomic_directory, open_save, read_json, read_weights
from ih_circuits.checks import check_device, check_real, check_tokens
from ih_circuits.memory import check_memory, memory_limit
from ih_circuits.model.cache import IHActivationCache
from ih_circuits.model.classifier import Classifier
from ih_circuits.model.config import MAX_CLASSIFIER_SCALE, IHConfig
from ih_circuits.model.copier import Copier, Lookup, all_windows, window_codes
from ih_circuits.model.selector import Selector

LogProbs = Float[Tensor, "batch pos d_vocab"]
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
CHECKPOINT_KIND = "IHTransformer checkpoint"
# Window-code tables up to 1024 codes (a [1024, 1024] kernel table): d = 3 with up to 5 lags, d = 5 with 3.
MAX_WINDOW_CODES = 1024
# Fused attention over the selector's features up to this width (sum_S d^|S| at H = 3, D = 2: 37 at d = 3, 127
# at d = 6, 217 at d = 8); wider features cost more than the per-head similarities they replace (measured at
# T = 100, batch 64, forward+backward: fused 50 ms vs 84 ms at width 127, 89 ms vs 67 ms at width 217).
MAX_FEATURE_WIDTH = 160


class CopierSelectorBlock(nn.Module):
    """Block 0: ``attn`` is the copier, ``mlp`` the selector."""

    def __init__(self, cfg: IHConfig) -> None:
        super().__init__()
        self.attn = Copier(cfg)
        self.mlp = Selector(cfg)


class ClassifierBlock(nn.Module):
    """Block 1: ``attn`` is the classifier."""

    def __init__(self, cfg: IHConfig) -> None:
        super().__init__()
        self.attn = Classifier(cfg)


class IHTransformer(HookedRootModule):
    """The copier-selector-classifier model of PAPER.md §2, hookable with TransformerLens.

    ``model.config`` is the ``IHConfig``; ``model.cfg`` the TransformerLens view TL utilities read. Both layers
    show ``cfg.n_heads`` = H head slots to TransformerLens; ``heads_per_layer`` = (H, 1) counts the heads that
    compute something (layer 1's slots 1..H-1 are inert). A new model is in eval mode, as TransformerLens's
    patching requires (the model has no dropout: the mode changes nothing it computes).

    >>> model = IHTransformer(IHConfig(d_vocab=3, n_ctx=8, n_heads=2, window=2, max_degree=2))
    >>> model(torch.tensor([[0, 1, 2, 0, 1]])).shape
    torch.Size([1, 5, 3])
    """

    def __init__(self, cfg: IHConfig) -> None:
        super().__init__()
        if not isinstance(cfg, IHConfig):
            raise ValueError(f"cfg must be an IHConfig; got {type(cfg).__name__}")
        check_device(cfg.device, "cfg.device")
        self.config = cfg
        self.cfg = cfg.to_transformer_lens()
        self.hook_embed = HookPoint()  # [batch, pos, d_vocab]
        self.blocks = nn.ModuleList([CopierSelectorBlock(cfg), ClassifierBlock(cfg)])
        self.hook_log_probs = HookPoint()  # [batch, pos, d_vocab]
        self.setup()
        self.eval()

    @property
    def heads_per_layer(self) -> tuple[int, int]:
        """Heads that compute something in each layer: the H copier heads, and the one classifier head."""
        return (self.config.n_heads, 1)

    @property
    def copier(self) -> Copier:
        return self.blocks[0].attn

    @property
    def selector(self) -> Selector:
        return self.blocks[0].mlp

    @property
    def classifier(self) -> Classifier:
        return self.blocks[1].attn

    def check_tokens(self, tokens: Tensor) -> None:
        """Raise ``ValueError`` unless ``tokens`` is an integer [batch, pos] tensor the model accepts."""
        check_tokens(tokens, self.config.d_vocab)
        if tokens.shape[1] > self.config.n_ctx:
            raise ValueError(f"tokens has {tokens.shape[1]} positions but the model allows n_ctx={self.config.n_ctx}")

    def run_with_cache(self, *model_args, remove_batch_dim: bool = False, **kwargs) -> tuple[Tensor, IHActivationCache]:
        """``HookedRootModule.run_with_cache`` with the activations in an ``IHActivationCache`` (TransformerLens's
        ``ActivationCache``, with clear errors for the residual-stream names this model does not have)."""
        output, cache_dict = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        return output, IHActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    def _hooked(self, prefix: str = "") -> bool:
        """Whether a hook is attached to any hook point whose name starts with ``prefix``."""
        return any(
            hp._forward_hooks or hp._backward_hooks for name, hp in self.hook_dict.items() if name.startswith(prefix)
        )

    @overload
    def forward(
        self, tokens: Int[Tensor, "batch pos"], return_type: Literal["log_probs"] = ..., loss_positions: str = ...
    ) -> LogProbs: ...

    @overload
    def forward(
        self, tokens: Int[Tensor, "batch pos"], return_type: Literal["loss"], loss_positions: str = ...
    ) -> Float[Tensor, ""]: ...

    def forward(
        self, tokens: Int[Tensor, "batch pos"], return_type: str = "log_probs", loss_positions: str = "last"
    ) -> Tensor:
        """Log-probabilities ``[batch, pos, d_vocab]`` (row t predicts token t+1), or the mean NLL.

        Args:
            tokens: ``[batch, pos]`` ids in 0..d-1, pos <= n_ctx.
            return_type: ``"log_probs"`` or ``"loss"``.
            loss_positions: for the loss, ``"last"`` (the paper: predict tokens[:, -1] from tokens[:, :-1])
                or ``"all"`` (every next-token prediction, each from its strict past).
        """
        if return_type not in ("log_probs", "loss"):
            raise ValueError(f"return_type must be 'log_probs' or 'loss'; got {return_type!r}")
        if loss_positions not in ("last", "all"):
            raise ValueError(f"loss_positions must be 'last' or 'all'; got {loss_positions!r}")
        self.check_tokens(tokens)
        if return_type == "log_probs":
            return self._log_probs(tokens, "all")
        if tokens.shape[1] < 2:
            raise ValueError(f"the loss needs at least 2 positions (context and target); got {tokens.shape[1]}")
        log_probs = self._log_probs(tokens, loss_positions)
        targets = tokens[:, -1:] if loss_positions == "last" else tokens[:, 1:]
        chosen = log_probs[:, -targets.shape[1] :] if loss_positions == "last" else log_probs[:, :-1]
        return -chosen.gather(-1, targets[..., None].to(chosen.device)).mean()

    def query_log_probs(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch d_vocab"]:
        """log p(x_{T-1} = e | x_0..x_{T-2}): the query row T-2 alone, the row the paper's objective scores.

        ``model(tokens)`` gives every row; this computes only the query row when no hook is attached.
        """
        self.check_tokens(tokens)
        if tokens.shape[1] < 2:
            raise ValueError(f"the query row T-2 needs at least 2 positions; got {tokens.shape[1]}")
        return self._log_probs(tokens, "last")[:, 0]

    def _log_probs(self, tokens: Int[Tensor, "batch pos"], positions: str) -> Float[Tensor, "batch query_pos d_vocab"]:
        """Log-probabilities at every row (``"all"``) or the query row only (``"last"``, one row), tokens checked.

        Without hooks nothing of size [pos, pos] is built: K is tabulated over the lag windows' codes when that
        table is small (``MAX_WINDOW_CODES``) and layer 2 reads the table (the query row) or counts of (code,
        next token) in blocks (every row), linear in T; otherwise ``"last"`` evaluates the query row alone and
        ``"all"`` uses fused attention over the selector's features or the per-head similarities. With hooks
        every row is computed and the layers whose hooks are attached build their dense activations; ``"last"``
        then slices the query row out. All paths agree to float precision.
        """
        n_pos = tokens.shape[1]
        tokens = tokens.to(self.copier.w_pos.device).long()
        if not self._hooked():
            return self._unhooked_log_probs(tokens, positions)
        # With hooks: every row, and each layer builds its dense activations when one of its hooks is attached
        # (so run_with_cache(names_filter=...) stays as light as the names it asks for).
        copier_dense = self._hooked("blocks.0.attn")
        selector_dense, classifier_dense = self._hooked("blocks.0.mlp"), self._hooked("blocks.1.attn")
        self._check_dense_memory(tokens.shape[0], n_pos, copier_dense, selector_dense, classifier_dense)
        embed = self.hook_embed(F.one_hot(tokens, self.config.d_vocab).to(self.copier.w_pos.dtype))
        features = self.copier(embed, copier_dense)
        if selector_dense or classifier_dense:
            kernel = self.selector(features, features, selector_dense)
            rows = torch.arange(n_pos, device=tokens.device)
            log_probs = self.classifier(kernel, embed, rows, classifier_dense)
        else:
            log_probs = self._every_row(features, embed)
        log_probs = self.hook_log_probs(log_probs)
        return log_probs[:, n_pos - 2 : n_pos - 1] if positions == "last" else log_probs

    def _check_dense_memory(self, batch: int, n_pos: int, copier: bool, selector: bool, classifier: bool) -> None:
        """Refuse (``MemoryBudgetError``) a hooked forward whose [batch, pos, pos] maps would exceed the memory
        limit: a cache keeps every one. Layer 1 builds scores and pattern per head (2H maps); the selector the
        per-head similarities and the kernel (H + 1), and its subset stack when hooked; layer 2 scores and
        pattern (2)."""
        cfg = self.config
        maps = 2 * cfg.n_heads if copier else 0
        if selector or classifier:
            maps += cfg.n_heads + 1 + (len(cfg.subsets) if selector else 0)
        maps += 2 if classifier else 0
        check_memory(
            maps * batch * n_pos * n_pos * self.copier.w_pos.element_size(),
            f"a hooked forward over {batch} sequences of {n_pos} tokens builds {maps} [batch, pos, pos] maps and",
            "the batch size or the sequence length, or hook fewer layers (run_with_cache(names_filter=...))",
        )

    def _unhooked_log_probs(
        self, tokens: Int[Tensor, "batch pos"], positions: str
    ) -> Float[Tensor, "batch query_pos d_vocab"]:
        """The fast paths: K tabulated over window codes when the table is small (``window_table_route``), else
        the query row by token codes or features (``"last"``) or every row by ``_every_row`` (``"all"``)."""
        n_pos = tokens.shape[1]
        route = self.window_table_route(tokens.shape[0], n_pos, positions)
        if route is not None:
            table, block = route
            codes = window_codes(tokens, self.config.max_lag, self.config.d_vocab)
            if positions == "last":
                return self.classifier.from_window_row(table, codes, tokens, n_pos - 2)
            embed = F.one_hot(tokens, self.config.d_vocab).to(table.dtype)
            return self.classifier.from_window_blocks(table, codes, embed, block)
        embed = F.one_hot(tokens, self.config.d_vocab).to(self.copier.w_pos.dtype)
        if positions == "all":
            return self._every_row(self.copier(embed, False), embed)
        if self.copier.supports_token_codes:
            kernel = self._query_kernel_from_codes(tokens, n_pos - 2)
        else:
            features = self.copier(embed, False)
            rows = torch.arange(n_pos - 2, n_pos - 1, device=tokens.device)
            kernel = self.selector(features[:, rows], features, False)
        return self.classifier(kernel, embed, torch.arange(n_pos - 2, n_pos - 1, device=tokens.device), False)

    def window_table_route(
        self, batch: int, n_pos: int, positions: str
    ) -> tuple[Float[Tensor, "code code"], int] | None:
        """The kernel table over window codes and the block length for ``Classifier.from_window_blocks``, when
        that route applies: at most ``MAX_WINDOW_CODES`` codes, its tensors within a quarter of the memory limit,
        and (every row) a table whose rows spread a K over at most half the exponent range of the dtype, so
        that every weight exp(a K - max) stays a normal number. ``None`` otherwise.

        Blocks are ceil(sqrt(codes x d)) positions long, which balances the per-block count matrices against
        the pairs inside a block.
        """
        cfg = self.config
        n_codes = (cfg.d_vocab + 1) ** cfg.max_lag
        if n_codes > MAX_WINDOW_CODES:
            return None
        itemsize = self.copier.w_pos.element_size()
        block = min(n_pos, math.isqrt(n_codes * cfg.d_vocab - 1) + 1)
        if positions == "last":
            needed = 8 * itemsize * batch * n_pos + itemsize * n_codes * n_codes
        else:
            needed = 4 * itemsize * batch * (n_pos + block) * (n_codes + 2 * block + cfg.d_vocab)
        if needed > memory_limit() / 4:
            return None
        table = self.window_kernel_table()
        if positions == "all":
            spread = (self.classifier.a * (table.amax(-1) - table.amin(-1))).abs().max().detach()
            if float(spread) > -0.5 * math.log(torch.finfo(table.dtype).tiny):
                return None
        return table, block

    def _every_row(
        self, features: Float[Tensor, "batch pos head d_vocab"], embed: Float[Tensor, "batch pos d_vocab"]
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Every row from per-position copier features: fused attention over the selector's feature map when
        it is at most ``MAX_FEATURE_WIDTH`` wide, else the kernel K from the per-head similarities (cheaper in
        arithmetic when sum_S d^|S| is large, but [batch, pos, pos] in memory)."""
        width = sum(self.config.d_vocab ** len(subset) for subset in self.config.subsets)
        if width <= MAX_FEATURE_WIDTH:
            return self.classifier.attend(self.selector.feature_map(features), embed)
        batch, n_pos = features.shape[:2]
        check_memory(
            (self.config.n_heads + 3) * batch * n_pos * n_pos * features.element_size(),
            f"every row through the kernel K over {batch} sequences of {n_pos} tokens (selector width {width})",
            "the batch size or the sequence length, or use the query row (loss_positions='last')",
        )
        rows = torch.arange(n_pos, device=features.device)
        return self.classifier(self.selector(features, features, False), embed, rows, False)

    def window_kernel_table(self) -> Float[Tensor, "code code"]:
        """K[c, c'] for every pair of ``window_codes``: the copier and selector applied to every lag window."""
        cfg = self.config
        windows = all_windows(cfg.max_lag, cfg.d_vocab, self.copier.w_pos.dtype, self.copier.w_pos.device)
        features = self.copier.window_features(windows)[:, 0]
        similarity = einops.einsum(features, features, "query head e, key head e -> head query key")
        return self.selector.combine(similarity[None], dense=False)[0]

    def _query_kernel_from_codes(self, tokens: Int[Tensor, "batch pos"], row: int) -> Float[Tensor, "batch 1 pos"]:
        """K(row, j) for every key j as a lookup: the selector applied once to the copier's similarity table.

        G_h(row, j) depends on the tokens only through a small integer code (``Copier.token_codes``), so
        K = sum_S shares_S prod_h G_h is tabulated over all codes (a few hundred thousand entries, built from
        the parameters) and read with one gather per key; its gradient is a per-code sum.
        """
        codes = self.copier.token_codes(tokens, row)
        table = self.copier.similarity_table()
        as_batch = einops.rearrange(table, "q c k h -> (q c) h 1 k")
        kernel_table = einops.rearrange(self.selector.combine(as_batch, dense=False), "qc 1 k -> (qc k) 1")
        return einops.rearrange(Lookup.apply(kernel_table, codes), "batch key 1 -> batch 1 key")

    def to_tokens(self, sequence: str | list[str] | list[int] | list[list[int]] | Tensor) -> Int[Tensor, "batch pos"]:
        """Token ids ``[batch, pos]`` from a string, a list of strings (one row each), or ids.

        A string is space-separated ids ("0 12 3"), or, when d_vocab <= 10, may also be a run of digits
        ("0121"), the form ``to_string`` writes. No BOS token is prepended: the model has none.
        """
        if isinstance(sequence, str):
            sequence = [sequence]
        if isinstance(sequence, list) and sequence and all(isinstance(row, str) for row in sequence):
            rows = [self._parse(row) for row in sequence]
            if len({len(row) for row in rows}) > 1:
                raise ValueError(f"sequence strings must all have the same number of tokens; got {sequence!r}")
            tokens = torch.tensor(rows, dtype=torch.long)
        else:
            tokens = torch.as_tensor(sequence)  # no dtype: float ids are refused below, not truncated
            if tokens.ndim == 1:
                tokens = tokens[None]
        self.check_tokens(tokens)
        return tokens.long().to(self.copier.w_pos.device)

    def _parse(self, text: str) -> list[int]:
        parts = list(text.strip()) if self.config.d_vocab <= 10 and " " not in text.strip() else text.split()
        try:
            return [int(part) for part in parts]
        except ValueError as error:
            raise ValueError(f"sequence must contain token ids 0..{self.config.d_vocab - 1}; got {text!r}") from error

    def to_str_tokens(self, sequence: str | list[int] | Tensor) -> list[str] | list[list[str]]:
        """Each token id as a string, like TransformerLens's ``to_str_tokens``: a list for one sequence,
        a list of lists for a batch of several."""
        tokens = self.to_tokens(sequence).cpu()
        rows = [[str(token) for token in row] for row in tokens.tolist()]
        return rows[0] if len(rows) == 1 else rows

    def to_string(self, tokens: Int[Tensor, "... pos"] | list[int]) -> str | list[str]:
        """The inverse of ``to_tokens``: digits run together when d_vocab <= 10, else space-separated ids;
        one string for a 1-D input, a list of strings for ``[batch, pos]``."""
        tokens = torch.as_tensor(tokens)
        single = tokens.ndim == 1
        separator = "" if self.config.d_vocab <= 10 else " "
        rows = [separator.join(str(token) for token in row) for row in self.to_tokens(tokens).cpu().tolist()]
        return rows[0] if single else rows

    def copier_weights(self) -> Float[Tensor, "head lag"]:
        """softmax(w_h) as ``[n_heads, window]``: row h = head h, column m = its m-th lag (lag m+1 when shared)."""
        return self.copier.weights().detach()

    def selector_shares(self) -> dict[tuple[int, ...], float]:
        """c_S^2 / sum c^2 for every head subset S (sorted tuple of 0-based heads)."""
        shares = self.selector.shares().detach().cpu().tolist()
        return dict(zip(self.config.subsets, shares, strict=True))

    def classifier_scale(self) -> float:
        """The classifier scale a."""
        return float(self.classifier.a.detach())

    def head_lags(self) -> list[int]:
        """The lag each copier head attends to most."""
        table = self.config.lag_table
        return [table[h][m] for h, m in enumerate(self.copier_weights().argmax(-1).tolist())]

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``manifest.json`` into ``directory``, atomically.

        A directory that already holds something is refused unless ``overwrite=True`` (see
        ``ih_circuits.checkpoint``: a killed save leaves the previous save or the new one, never a mix).
        """
        with atomic_directory(directory, CHECKPOINT_KIND, overwrite=overwrite) as staging:
            (staging / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
            weights = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(weights, staging / WEIGHTS_FILE)
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | None = None) -> IHTransformer:
        """Load a ``save_pretrained`` directory after checking its manifest; a weight that does not fit the
        config, or is not finite, is an error."""
        directory, manifest = open_save(directory, CHECKPOINT_KIND)
        listed = manifest["files"]
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if name not in listed:
                raise ValueError(f"{directory} is not an IHTransformer checkpoint: {name} is missing")
        try:
            cfg = IHConfig.from_dict(read_json(directory / CONFIG_FILE))
        except ValueError as error:
            raise ValueError(f"{directory / CONFIG_FILE}: {error}") from None
        if device is not None:
            cfg = cfg.replace(device=device)
        model = cls(cfg)
        model.load_state_dict(read_weights(directory / WEIGHTS_FILE, model.state_dict(), CONFIG_FILE))
        return model


def ideal_model(cfg: IHConfig, lags: tuple[int, ...] = (1, 2), a: float = 5.0) -> IHTransformer:
    """The limiting model of PAPER.md §4: head i copies exactly ``lags[i]``, the selector sits on those heads.

    Its query output equals ``gih_predictive(tokens, lags, a)`` (up to ``prob_floor``). Exactness comes from
    a position logit of 1e4 on the copied lag (softmax puts exactly 0 elsewhere in float32/64).

    >>> model = ideal_model(IHConfig(d_vocab=3, n_ctx=12, n_heads=3, window=3, max_degree=2), lags=(1, 3), a=4.0)
    >>> model.head_lags()[:2], model.selector_shares()[(0, 1)]
    ([1, 3], 1.0)
    """
    lags = validate_lags(lags, "lags")
    if cfg.copier != "positional":
        raise ValueError(f"ideal_model needs copier='positional' (the model the theory analyses); got {cfg.copier!r}")
    if not lags:
        raise ValueError("lags must contain at least one lag")
    if len(lags) > cfg.n_heads or len(lags) > cfg.max_degree:
        raise ValueError(
            f"lags {lags} need {len(lags)} heads and max_degree >= {len(lags)}; "
            f"the config has n_heads={cfg.n_heads}, max_degree={cfg.max_degree}"
        )
    check_real(a, "a", -MAX_CLASSIFIER_SCALE, MAX_CLASSIFIER_SCALE)
    model = IHTransformer(cfg)
    table = cfg.lag_table
    with torch.no_grad():
        for head, lag in enumerate(lags):
            if lag not in table[head]:
                raise ValueError(f"lag {lag} is outside head {head}'s window {table[head]}")
            model.copier.w_pos[head].zero_()
            model.copier.w_pos[head, table[head].index(lag)] = 1e4
        model.selector.c.zero_()
        model.selector.c[cfg.subsets.index(tuple(range(len(lags))))] = 1.0
        model.classifier.a.fill_(float(a))
    return model
