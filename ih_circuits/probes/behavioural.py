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

**Inconclusive is an answer.** A lag that is not used must be shown not to be: its effect's upper bound (mean +
3 stderr) stays under the bars, or its corruption conclusively does not hurt (the loss increase's upper bound is
below half the effect; a model that conditions on the lag loses about the effect itself). A lag that is neither
used nor excluded is *undecided*, and the report says how many sequences would decide it: the n at which the
observed means and spreads reach the bar they missed (stderr scales as 1 / sqrt(n)).
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
from torch import Tensor

from ih_circuits.probes.data import ProbeData

FLOOR_NATS = 0.01


@dataclass
class BehaviouralReport:
    """Effect on the query prediction of resampling the token at each lag.

    Attributes:
        lags: the lags tested, 1..max_lag.
        query_effect: mean KL(clean || corrupted) at the query row, nats, with the corruption seen by the query
            row's history only (the context unchanged): the evidence that a lag is a parent.
        query_stderr: its standard error over sequences.
        total_effect: mean KL when the token is resampled everywhere (it also moves the context the query reads);
            None unless the session asked for it (``ProbeConfig(total_effect=True)``: it doubles the cost).
        total_stderr: its standard error (None likewise).
        used_lags: lags whose query-side effect exceeds ``floor``, ``threshold`` x the largest and 3 stderr, and
            whose corruption raises the query loss by more than 3 stderr.
        threshold: the relative bar.
        floor: the absolute bar, nats.
        history_site: the activation patched at the query row for the query-side effect.
        loss_increase: mean rise of the query loss (nats) under the query-side corruption, per lag.
        loss_increase_stderr: its standard error.
        model_loss, unigram_loss: query-row losses (nats) of the model and of the in-context unigram.
        loss_stderr: standard error of their paired difference.
        n_stderr: the significance bar, in standard errors.
        site_reason: why the history was read at ``history_site``.
        undecided: lags neither used nor excluded at this sample size (module docstring).
        needed_sequences: sequences that would decide every undecided lag at the observed means and spreads.
        n_sequences: sequences the report used.
    """

    lags: list[int]
    query_effect: list[float]
    query_stderr: list[float]
    total_effect: list[float] | None
    total_stderr: list[float] | None
    used_lags: tuple[int, ...]
    threshold: float
    floor: float
    history_site: str
    loss_increase: list[float]
    loss_increase_stderr: list[float]
    model_loss: float
    unigram_loss: float
    loss_stderr: float
    n_stderr: float = 3.0
    site_reason: str = ""
    undecided: tuple[int, ...] = ()
    needed_sequences: int | None = None
    n_sequences: int = 0

    @property
    def beats_unigram(self) -> bool:
        """The model's query loss is below the in-context unigram's by more than 2 standard errors."""
        return self.unigram_loss - self.model_loss > 2 * self.loss_stderr

    @property
    def uses_context(self) -> bool:
        """Whether some lag passes every bar (the model conditions on its context)."""
        return bool(self.used_lags)

    @property
    def conclusive(self) -> bool:
        """Every lag tested is either used or excluded (none undecided)."""
        return not self.undecided

    def inconclusive_reason(self) -> str | None:
        """What could not be decided and the sample that would decide it (None when conclusive)."""
        if not self.undecided:
            return None
        return (
            f"inconclusive: lags {self.undecided} are neither used nor excluded with {self.n_sequences} sequences "
            f"(an effect or loss increase within {self.n_stderr:g} standard errors of its bar); about "
            f"{self.needed_sequences} sequences would decide them"
        )

    def no_context_reason(self) -> str | None:
        """Why no lag is reported (None when some lag is used)."""
        if self.used_lags:
            return None
        if self.undecided:
            return self.inconclusive_reason()
        best = max(range(len(self.lags)), key=lambda i: self.query_effect[i])
        lag, effect, hurt = self.lags[best], self.query_effect[best], self.loss_increase[best]
        if effect > self.floor and hurt <= self.n_stderr * self.loss_increase_stderr[best]:
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
        columns = {"lag": self.lags, "query_effect": self.query_effect, "query_stderr": self.query_stderr}
        if self.total_effect is not None:
            columns.update(total_effect=self.total_effect, total_stderr=self.total_stderr)
        columns.update(
            loss_increase=self.loss_increase,
            loss_increase_stderr=self.loss_increase_stderr,
            used=[s in self.used_lags for s in self.lags],
        )
        return pd.DataFrame(columns)

    def __repr__(self) -> str:
        effects = ", ".join(f"{s}: {e:.3f}" for s, e in zip(self.lags, self.query_effect, strict=True))
        return f"BehaviouralReport(used_lags={self.used_lags}; query-side KL per lag (nats) {effects})"


def decide_lags(
    lags: list[int],
    effect: list[float],
    effect_stderr: list[float],
    hurt: list[float],
    hurt_stderr: list[float],
    *,
    floor: float,
    threshold: float,
    n_stderr: float,
    n_sequences: int,
) -> tuple[tuple[int, ...], tuple[int, ...], int | None]:
    """(used, undecided, sequences needed) under the module docstring's bars.

    With bar = max(floor, threshold x the largest effect) and b = ``n_stderr``, a lag with effect m +- e and loss
    increase h +- f is used when m > bar, m > b e and h > b f; excluded when m + b e <= bar (it cannot reach the
    bars) or, its effect being significant, h + b f < m / 2 (its corruption does not hurt as conditioning would);
    otherwise undecided. The n that decides it: stderr e at n sequences is e sqrt(n / n') at n', so a mean m
    clears b e' when n' = n (b e / m)^2; for several ways to decide, the first one reached.
    """
    largest = max(effect)
    bar = max(floor, threshold * largest)
    used, undecided, needed = [], [], []
    for lag, m, e, h, f in zip(lags, effect, effect_stderr, hurt, hurt_stderr, strict=True):
        significant = m > bar and m > n_stderr * e
        if significant and h > n_stderr * f:
            used.append(lag)
            continue
        if m + n_stderr * e <= bar or (significant and h + n_stderr * f < m / 2):
            continue
        undecided.append(lag)

        def at(margin: float, spread: float) -> float:
            return n_sequences * (n_stderr * spread / margin) ** 2 if margin > 0 else math.inf

        if not significant:
            ways = [at(m, e) if m > bar else at(bar - m, e)]
        else:
            ways = [at(h, f), at(m / 2 - h, f)]
        needed.append(min(ways))
    finite = [n for n in needed if math.isfinite(n)]
    return tuple(used), tuple(undecided), (math.ceil(max(finite)) if finite else None) if undecided else None


def mean_stderr(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over the last dimension (sequences) and its standard error std / sqrt(n), in float64."""
    values = values.double()
    return values.mean(-1), values.std(-1) / math.sqrt(values.shape[-1])


def query_nlls(
    tokens: Int[Tensor, "batch pos"], model_log_probs: Float[Tensor, "batch d_vocab"], data: ProbeData, d_vocab: int
) -> dict[str, Float[Tensor, " batch"]]:
    """Per-sequence query-row loss (nats) on the last token: the model's, the in-context unigram's and, for n-gram
    data, the Bayes predictor's (under the task's prior).

    The unigram is a smoothed baseline, not a Bayes predictor: (N(e) + alpha) / (t + 1 + d alpha) with alpha the
    task's ``alpha`` field (0.1 without a task), whatever the prior; only the query row's counts are made (one
    vocabulary-sized row per sequence, not one per position)."""
    target = tokens[:, -1:]
    task = data.task
    alpha = task.alpha if task is not None else 0.1
    context = tokens[:, :-1]
    counts = torch.zeros(len(tokens), d_vocab, dtype=torch.float64, device=tokens.device)
    counts.scatter_add_(1, context, torch.ones_like(context, dtype=torch.float64))
    predictors = {"unigram": (counts + alpha) / (context.shape[1] + d_vocab * alpha)}
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
    features: Float[Tensor, "sample feature"], labels: Int[Tensor, "sample lag"], ridge: float = 1e-3
) -> Callable[[Tensor], Int[Tensor, "sample lag"]]:
    """Ridge-regression classifiers, one per column of ``labels``, in one closed-form solve.

    On standardised features X (plus a bias column) W = (X^T X + ridge n I)^-1 X^T Y with Y the one-hot labels of
    every lag side by side (over the classes the training labels contain, so a vocabulary of 50257 costs no more than
    one of 8); a sample's class for lag s is the argmax of its block of X W. A least-squares probe
    is linear like a logistic one and recovers exactly any label that is a linear function of the features
    (one-hot copies), with no iterations. Returns the predictor.
    """
    n_samples, n_lags = labels.shape
    seen, labels = torch.unique(labels, return_inverse=True)
    mean, scale = features.mean(0), features.std(0).clamp_min(1e-6)

    def design(x: Tensor) -> Tensor:
        return torch.cat([(x - mean) / scale, torch.ones(len(x), 1, device=x.device)], dim=-1).double()

    x = design(features)
    targets = einops.rearrange(F.one_hot(labels, len(seen)), "sample lag cls -> sample (lag cls)").double()
    gram = x.T @ x + ridge * n_samples * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    weights = torch.linalg.solve(gram, x.T @ targets)

    def predict(new: Tensor) -> Tensor:
        scores = einops.rearrange(design(new) @ weights, "sample (lag cls) -> sample lag cls", lag=n_lags)
        return seen[scores.argmax(-1)]

    return predict
