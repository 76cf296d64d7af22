"""``IHConfig``: the paper's two-layer model (PAPER.md §2), validated on construction, exact JSON round trip."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch
from transformer_lens.config import TransformerLensConfig

from ih_circuits.checkpoint import check_fields
from ih_circuits.checks import check_int, check_real, parse_device

COPIERS = ("positional", "full")
LAYOUTS = ("shared", "staggered")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# The classifier's scale a multiplies kernel values whose float32 rounding is about 1e-7, so the routes that compute
# K differently (window table, fused features, the hooked dense path) agree to 1e-6 nats up to |a| = 1e4 and drift
# beyond (1e-4 at 1e6, 0.05 at 1e12 on the every-row loss); trained models reach a of order 10.
MAX_CLASSIFIER_SCALE = 1e4


@dataclass(frozen=True)
class IHConfig:
    """Configuration of ``IHTransformer``.

    Attributes:
        d_vocab: vocabulary size d (>= 2).
        n_ctx: longest token sequence the model accepts (the paper: 100 context tokens + target = 101).
        n_heads: number of copier heads H (>= 1).
        window: relative-position window M: each head attends to M lags.
        max_degree: largest head subset D in the selector (0..n_heads); subsets of size <= D, the empty one
            included, each get a coefficient c_S.
        copier: ``"positional"`` (the simplified model the theory analyses: logits depend on the lag only,
            L2 normalisation) or ``"full"`` (plus token-dependent logits, a value map per head and a
            LayerNorm).
        layout: ``"shared"`` (every head sees lags 1..M, PAPER.md §2) or ``"staggered"`` (head h sees lags
            h+1..h+M, the authors' code, PAPER.md §8).
        w_plus, w_minus: initial position logits: head h starts at w_plus on its own lag (lag h+1 for the
            0-based head h; the first slot of its window when staggered) and w_minus elsewhere.
        c_init: initial value of every selector coefficient c_S.
        a_init: initial classifier scale a, |a| <= ``MAX_CLASSIFIER_SCALE``.
        seed: seeds the random part of the initialisation (the full copier's token weights).
        prob_floor: eps in p_out = (1 - eps) p + eps / d, which keeps log-probabilities finite for tokens
            absent from the context (0 disables it).
        device, dtype: where and in which precision the parameters live (``"float32"`` or ``"float64"``).

    >>> cfg = IHConfig(d_vocab=3, n_ctx=101, n_heads=3, window=3, max_degree=2)
    >>> len(cfg.subsets), cfg.subsets[:4]
    (7, [(), (0,), (1,), (2,)])
    """

    d_vocab: int = 3
    n_ctx: int = 101
    n_heads: int = 3
    window: int = 3
    max_degree: int = 2
    copier: str = "positional"
    layout: str = "shared"
    w_plus: float = 3.0
    w_minus: float = 0.1
    c_init: float = 0.01
    a_init: float = 0.01
    seed: int = 0
    prob_floor: float = 1e-6
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_int(self.d_vocab, "d_vocab", 2)
        check_int(self.n_ctx, "n_ctx", 2)
        check_int(self.n_heads, "n_heads", 1)
        check_int(self.window, "window", 1)
        check_int(self.seed, "seed", 0, 2**63 - 1, high_text="2**63 - 1")
        check_int(self.max_degree, "max_degree", 0, self.n_heads, high_text=f"n_heads={self.n_heads}")
        if self.copier not in COPIERS:
            raise ValueError(f"copier must be one of {COPIERS}; got {self.copier!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {self.layout!r}")
        for name in ("w_plus", "w_minus", "c_init"):
            check_real(getattr(self, name), name)
        check_real(self.a_init, "a_init", -MAX_CLASSIFIER_SCALE, MAX_CLASSIFIER_SCALE)
        check_real(self.prob_floor, "prob_floor")
        if not 0 <= self.prob_floor < 1:
            raise ValueError(f"prob_floor must be in [0, 1); got {self.prob_floor}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}; got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a device string such as 'cpu' or 'cuda'; got {self.device!r}")
        parse_device(self.device)

    @property
    def subsets(self) -> list[tuple[int, ...]]:
        """Head subsets with |S| <= max_degree, by size then lexicographically; index i is c[i]."""
        heads = range(self.n_heads)
        return [s for size in range(self.max_degree + 1) for s in combinations(heads, size)]

    @property
    def lag_table(self) -> list[list[int]]:
        """``lag_table[h][m]``: the lag that head h's m-th position weight reads."""
        offset = (lambda h: h) if self.layout == "staggered" else (lambda h: 0)
        return [[offset(h) + m + 1 for m in range(self.window)] for h in range(self.n_heads)]

    @property
    def max_lag(self) -> int:
        return max(max(row) for row in self.lag_table)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IHConfig:
        """Inverse of ``to_dict``: every field must be present (a missing ``layout`` must not silently become
        ``"shared"``) and nothing else; values are validated as on construction."""
        check_fields(data, {f.name for f in dataclasses.fields(cls)}, "IHConfig")
        return cls(**data)

    def replace(self, **changes: Any) -> IHConfig:
        return dataclasses.replace(self, **changes)

    def to_transformer_lens(self) -> TransformerLensConfig:
        """The TransformerLens view that TL utilities read (``model.cfg``); every field it sets is true.

        Two layers of ``n_heads`` = H head slots (the copier's H heads; the classifier's one head plus H-1
        inert slots); one head's output lives in R^d, so ``d_head = d_vocab``; ``d_model = H * d_vocab`` is
        the width of the copier's concatenated output, the selector's input (there is no residual stream).
        The selector sits at ``blocks.0.mlp`` but has no neurons and no activation function, so ``d_mlp`` and
        ``act_fn`` are None; no layer norm, no BOS token, relative positions.
        """
        cfg = TransformerLensConfig(
            d_model=self.n_heads * self.d_vocab,
            d_head=self.d_vocab,
            n_layers=2,
            n_ctx=self.n_ctx,
            n_heads=self.n_heads,
            d_vocab=self.d_vocab,
            device=self.device,
            attn_only=False,
            normalization_type=None,
            positional_embedding_type="relative",
            default_prepend_bos=False,
            act_fn=None,
            dtype=self.torch_dtype,
        )
        cfg.d_mlp = None  # TransformerLensConfig fills in 4 * d_model when given None
        return cfg
