"""Which lags does the prediction condition on? Query-side token resampling and linear read-outs.

The *parents* of a prediction are the lags of the history the model matches on: lag s of the query row's
prediction is the token s positions before the predicted one (lag 1 = the current token). Resampling that
token changes two things at once: what the query knows about its own history (the parent), and, for an
induction circuit, the context the query reads (the earlier copy of the history and what followed it).
Only the first says which lags are parents, so the behavioural probe measures both separately:

- **query side**: the corruption reaches the prediction only through the query row's gathered history
  (the adapter's history site, patched at the query row from the corrupted run; the context stays clean);
- **total**: the model simply run on the corrupted sequence (the old "token patching" effect).

A lag is *used* when its query-side effect (mean KL(clean || corrupted) at the query row, nats) clears
three bars: an absolute floor (``floor``, default 0.01 nats: by Pinsker, KL < 0.01 means the two
predictions differ by less than sqrt(0.01 / 2) = 7% of probability mass, too little to call a dependence),
``threshold`` times the largest query-side effect (other lags are minor next to the main one), and three
standard errors (it is not sampling noise); and when the corruption also *hurts*: the query loss on the
true next token rises by more than three standard errors. The last bar separates conditioning from a
fixed map: an untrained model's prediction moves with the current token through a random bigram (the
embedding read by the unembedding), but that map is unrelated to the next token, so corrupting the token
does not raise the loss on average. A model with no used lag reports ``()``; the report also gives the
model's and the in-context unigram's query losses for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import einops
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ih_circuits.adapters import TransformerLensAdapter, adapt
from ih_circuits.checks import check_int
from ih_circuits.predictors import kl_divergence, unigram_predictive
from ih_circuits.probes.data import Data, ProbeData, probe_data, resample_positions
from ih_circuits.seeds import derive_seed

FLOOR_NATS = 0.01


@dataclass
class BehaviouralReport:
    """Effect on the query prediction of resampling the token at each lag.

    Attributes:
        lags: the lags tested, 1..max_lag.
        query_effect: mean KL(clean || corrupted) at the query row, nats, with the corruption seen by the query
            row's history only (the context unchanged): the evidence that a lag is a parent.
        query_stderr: its standard error over sequences.
        total_effect: mean KL when the token is resampled everywhere (it also moves the context the query reads).
        total_stderr: its standard error.
        used_lags: lags whose query-side effect exceeds ``floor``, ``threshold`` x the largest and 3 stderr, and
            whose corruption raises the query loss by more than 3 stderr.
        threshold: the relative bar.
        floor: the absolute bar, nats.
        history_site: the activation patched at the query row for the query-side effect.
        loss_increase: mean rise of the query loss (nats) under the query-side corruption, per lag.
        loss_increase_stderr: its standard error.
        model_loss, unigram_loss: query-row losses (nats) of the model and of the in-context unigram.
        loss_stderr: standard error of their paired difference.
    """

    lags: list[int]
    query_effect: list[float]
    query_stderr: list[float]
    total_effect: list[float]
    total_stderr: list[float]
    used_lags: tuple[int, ...]
    threshold: float
    floor: float
    history_site: str
    loss_increase: list[float]
    loss_increase_stderr: list[float]
    model_loss: float
    unigram_loss: float
    loss_stderr: float

    @property
    def beats_unigram(self) -> bool:
        """The model's query loss is below the in-context unigram's by more than 2 standard errors."""
        return self.unigram_loss - self.model_loss > 2 * self.loss_stderr

    @property
    def uses_context(self) -> bool:
        """Whether some lag passes every bar (the model conditions on its context)."""
        return bool(self.used_lags)

    def no_context_reason(self) -> str | None:
        """Why no lag is reported (None when some lag is used)."""
        if self.used_lags:
            return None
        best = max(range(len(self.lags)), key=lambda i: self.query_effect[i])
        lag, effect, hurt = self.lags[best], self.query_effect[best], self.loss_increase[best]
        if effect > self.floor and hurt <= 3 * self.loss_increase_stderr[best]:
            return (
                f"lag {lag} moves the query prediction (KL {effect:.4f} nats) but corrupting it does not raise the "
                f"loss ({hurt:+.4f} +- {self.loss_increase_stderr[best]:.4f} nats): a fixed map, not conditioning; "
                "the model does not use its context"
            )
        return (
            f"no lag moves the query prediction by more than {self.floor} nats (largest: lag {lag}, {effect:.4f}); "
            "the model does not use its context"
        )

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "lag": self.lags,
                "query_effect": self.query_effect,
                "query_stderr": self.query_stderr,
                "total_effect": self.total_effect,
                "total_stderr": self.total_stderr,
                "loss_increase": self.loss_increase,
                "loss_increase_stderr": self.loss_increase_stderr,
                "used": [s in self.used_lags for s in self.lags],
            }
        )

    def __repr__(self) -> str:
        effects = ", ".join(f"{s}: {e:.3f}" for s, e in zip(self.lags, self.query_effect, strict=True))
        return f"BehaviouralReport(used_lags={self.used_lags}; query-side KL per lag (nats) {effects})"


def _mean_stderr(values: Float[Tensor, "lag batch"]) -> tuple[list[float], list[float]]:
    return values.mean(1).tolist(), (values.std(1) / math.sqrt(values.shape[1])).tolist()


def check_max_lag(max_lag: int | None, data: ProbeData) -> int:
    """``max_lag`` or the data's default, checked against the sequence length (lag s reads position T-1-s)."""
    if max_lag is None:
        return data.max_lag()
    return check_int(max_lag, "max_lag", 1, data.seq_len - 2, high_text=f"seq_len-2={data.seq_len - 2}")


def lag_effects(
    adapter: TransformerLensAdapter,
    tokens: Int[Tensor, "batch pos"],
    clean: Float[Tensor, "batch d_vocab"],
    lags: list[int],
    seed: int,
    query_layer: int | None = None,
) -> tuple[Float[Tensor, "lag batch"], Float[Tensor, "lag batch"], Float[Tensor, "lag batch"]]:
    """Per lag and sequence: KL(clean || corrupted) at the query row (query side, total) and the query-side rise
    of the loss on the true last token; ``clean`` is the model's query-row log-probabilities on ``tokens``."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "resample") % 2**62)
    n_pos = tokens.shape[1]
    corrupted = resample_positions(tokens, [n_pos - 1 - lag for lag in lags], generator)
    total, query_side = adapter.corrupted_log_probs(
        tokens.repeat(len(lags), 1), corrupted.flatten(0, 1), query_layer=query_layer
    )
    reference = clean.repeat(len(lags), 1)
    shape = (len(lags), tokens.shape[0])
    query_kl = kl_divergence(reference.exp(), query_side.exp()).clamp_min(0).reshape(shape).cpu()
    total_kl = kl_divergence(reference.exp(), total.exp()).clamp_min(0).reshape(shape).cpu()
    target = tokens[:, -1:].repeat(len(lags), 1)
    hurt = (reference.gather(1, target) - query_side.gather(1, target)).reshape(shape).cpu()
    return query_kl, total_kl, hurt


def behavioural_probe(
    model: nn.Module,
    data: Data,
    *,
    n_sequences: int = 512,
    seed: int = 0,
    max_lag: int | None = None,
    threshold: float = 0.2,
    floor: float = FLOOR_NATS,
    query_layer: int | None = None,
) -> BehaviouralReport:
    """Which lags does the query row's prediction depend on, through its own history?

    For each lag s = 1..max_lag the token at position T-1-s (lag s of the final token) is replaced by another
    token of the batch, and KL(p_clean || p_corrupted) is measured at the query row T-2, on the query side
    (see the module docstring) and in total. All corrupted batches run together.

    Args:
        model: ``IHTransformer`` or any TransformerLens model.
        data: an ``NGramTask``, a data source such as ``RepeatedTokens``, or a token tensor ``[batch, pos]``.
        n_sequences: sequences drawn from a source (a tensor is used as given).
        seed: fixes the sequences and the replacement tokens.
        max_lag: lags tested; default the task's window + 2, else 8.
        threshold: relative bar, in (0, 1].
        floor: absolute bar in nats, >= 0 (default 0.01, see the module docstring).
        query_layer: for TransformerLens models, the layer whose input residual at the query row is taken as
            the query's history (default 1: what layer 0 gathered); ``IHTransformer`` uses its copier output.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold!r}")
    if not floor >= 0:
        raise ValueError(f"floor must be >= 0 nats; got {floor!r}")
    adapter = adapt(model)
    resolved = probe_data(data, adapter)
    max_lag = check_max_lag(max_lag, resolved)
    site = adapter.history_site(query_layer)
    tokens = resolved.tokens_for(n_sequences, seed, "behavioural", adapter.device)
    lags = list(range(1, max_lag + 1))
    clean = adapter.query_log_probs(tokens)
    query_kl, total_kl, hurt = lag_effects(adapter, tokens, clean, lags, seed, query_layer)
    query_mean, query_stderr = _mean_stderr(query_kl)
    total_mean, total_stderr = _mean_stderr(total_kl)
    hurt_mean, hurt_stderr = _mean_stderr(hurt)
    nll = query_nlls(tokens, clean, resolved, adapter.d_vocab)
    difference = nll["unigram"] - nll["model"]
    model_loss, unigram_loss = float(nll["model"].mean()), float(nll["unigram"].mean())
    loss_stderr = float(difference.std() / math.sqrt(len(difference)))
    largest = max(query_mean)
    used = tuple(
        s
        for s, m, e, h, he in zip(lags, query_mean, query_stderr, hurt_mean, hurt_stderr, strict=True)
        if m > floor and m > threshold * largest and m > 3 * e and h > 3 * he
    )
    return BehaviouralReport(
        lags,
        query_mean,
        query_stderr,
        total_mean,
        total_stderr,
        used,
        threshold,
        floor,
        site,
        hurt_mean,
        hurt_stderr,
        model_loss,
        unigram_loss,
        loss_stderr,
    )


def query_nlls(
    tokens: Int[Tensor, "batch pos"], model_log_probs: Float[Tensor, "batch d_vocab"], data: ProbeData, d_vocab: int
) -> dict[str, Float[Tensor, " batch"]]:
    """Per-sequence query-row loss (nats) on the last token: the model's, the in-context unigram's and, for n-gram
    data, the Bayes predictor's (under the task's prior).

    The unigram is a smoothed baseline, not a Bayes predictor: (N(e) + alpha) / (t + 1 + d alpha) with alpha the
    task's ``alpha`` field (0.1 without a task), whatever the prior."""
    target = tokens[:, -1:]
    task = data.task
    alpha = task.alpha if task is not None else 0.1
    predictors = {"unigram": unigram_predictive(tokens[:, :-1], alpha, d_vocab=d_vocab)[:, -1]}
    if task is not None:
        predictors["bayes"] = task.bayes_predictive(tokens[:, :-1])[:, -1]
    nlls = {"model": -model_log_probs.gather(1, target)[:, 0].double().cpu()}
    for name, probs in predictors.items():
        nlls[name] = -probs.log().gather(1, target.to(probs.device))[:, 0].double().cpu()
    return nlls


@dataclass
class RepresentationalReport:
    """Linear decodability of the token at each lag from the query's gathered history.

    Attributes:
        lags: lags probed.
        accuracy: held-out accuracy of a linear (ridge-regression) probe per lag.
        chance: held-out majority-class frequency per lag.
        represented: lags with accuracy - chance > half of (1 - chance).
        site: the activation probed.
    """

    lags: list[int]
    accuracy: list[float]
    chance: list[float]
    represented: tuple[int, ...]
    site: str

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "lag": self.lags,
                "accuracy": self.accuracy,
                "chance": self.chance,
                "represented": [s in self.represented for s in self.lags],
            }
        )

    def __repr__(self) -> str:
        accs = ", ".join(f"{s}: {a:.2f}" for s, a in zip(self.lags, self.accuracy, strict=True))
        return f"RepresentationalReport(represented={self.represented}; accuracy per lag {accs}; site {self.site})"


def fit_linear_probes(
    features: Float[Tensor, "sample feature"], labels: Int[Tensor, "sample lag"], n_classes: int, ridge: float = 1e-3
) -> Callable[[Tensor], Int[Tensor, "sample lag"]]:
    """Ridge-regression classifiers, one per column of ``labels``, in one closed-form solve.

    On standardised features X (plus a bias column) W = (X^T X + ridge n I)^-1 X^T Y with Y the one-hot labels of
    every lag side by side; a sample's class for lag s is the argmax of its block of X W. A least-squares probe
    is linear like a logistic one and recovers exactly any label that is a linear function of the features
    (one-hot copies), with no iterations. Returns the predictor.
    """
    n_samples, n_lags = labels.shape
    mean, scale = features.mean(0), features.std(0).clamp_min(1e-6)

    def design(x: Tensor) -> Tensor:
        return torch.cat([(x - mean) / scale, torch.ones(len(x), 1, device=x.device)], dim=-1).double()

    x = design(features)
    targets = einops.rearrange(F.one_hot(labels, n_classes), "sample lag cls -> sample (lag cls)").double()
    gram = x.T @ x + ridge * n_samples * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    weights = torch.linalg.solve(gram, x.T @ targets)

    def predict(new: Tensor) -> Tensor:
        scores = einops.rearrange(design(new) @ weights, "sample (lag cls) -> sample lag cls", lag=n_lags)
        return scores.argmax(-1)

    return predict


def representational_probe(
    model: nn.Module,
    data: Data,
    *,
    n_sequences: int = 256,
    seed: int = 0,
    max_lag: int | None = None,
    query_layer: int | None = None,
) -> RepresentationalReport:
    """Which lags' tokens can be read linearly from the query's gathered history?

    Site: the adapter's history site (``blocks.0.attn.hook_result``, the copier output, for ``IHTransformer``;
    the residual stream entering ``query_layer`` for TransformerLens models, where the current token, lag 1,
    is always present through the embedding). Probes train on half of the sequences and are scored on the
    other half, at every position where all lags exist (row t holds lag s at position t+1-s).
    """
    adapter = adapt(model)
    resolved = probe_data(data, adapter)
    max_lag = check_max_lag(max_lag, resolved)
    site = adapter.history_site(query_layer)
    tokens = resolved.tokens_for(n_sequences, seed, "representational", adapter.device)
    if tokens.shape[0] < 4:
        raise ValueError(f"the representational probe needs >= 4 sequences; got {tokens.shape[0]}")
    features = adapter.activation(tokens, site).float().flatten(2)[:, max_lag - 1 : -1]
    half = tokens.shape[0] // 2
    lags = list(range(1, max_lag + 1))
    # Row t (t = max_lag-1 .. T-2) holds lag s at position t + 1 - s.
    labels = torch.stack([tokens[:, max_lag - lag : tokens.shape[1] - lag] for lag in lags], dim=-1)
    probe = fit_linear_probes(features[:half].flatten(0, 1), labels[:half].flatten(0, 1), adapter.d_vocab)
    predicted = probe(features[half:].flatten(0, 1))
    truth = labels[half:].flatten(0, 1)
    accuracy = (predicted == truth).float().mean(0).tolist()
    counts = torch.zeros(max_lag, adapter.d_vocab, device=truth.device).scatter_add_(
        1, truth.T, torch.ones_like(truth.T, dtype=torch.float)
    )
    chance = (counts.max(-1).values / truth.shape[0]).tolist()
    represented = tuple(s for s, a, c in zip(lags, accuracy, chance, strict=True) if a - c > 0.5 * (1 - c))
    return RepresentationalReport(lags, accuracy, chance, represented, site)
