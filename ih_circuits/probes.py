"""Probes: which parents did the model choose, and does the copier-selector-classifier decomposition hold?

Conventions (both for ``IHTransformer`` and for ordinary TransformerLens models such as
``baselines.ordinary_transformer``): position t predicts token t+1, and *lag s* of that prediction is the
token at position t+1-s (lag 1 = the current token). All probes look at the paper's query row, the
prediction of the last token from the rest (row T-2), unless they say otherwise.

- ``copier_probe``: per layer-1 head, the attention mass on each lag (from the weights when the copier is
  positional, else from cached patterns on task data), its dominant lag and concentration.
- ``selector_probe`` (white-box, ``IHTransformer`` only): selector shares mapped through the copier to lag sets.
- ``behavioural_probe``: resample the token at each lag and measure KL(clean || corrupted) at the query;
  the lags with a clearly non-zero effect are the ones the model uses.
- ``representational_probe``: linear probes decoding the token at each lag from the layer-1 output.
- ``find_parents``: the three combined, compared with the true parents and the theory's prediction.
- ``classifier_probe``: attention mass of the query on context positions whose history over the found lags
  matches the query's, against the ideal GIH (a generalized induction score; with lags {1} it is the usual
  induction score).
- ``decomposition_test``: replace copier, selector and classifier by their ideal counterparts through hooks
  (one at a time and together) and measure what changes; for ordinary models a surrogate test.
- ``head_patching``: TransformerLens's own ``generic_activation_patch`` over heads at the query row.

Every probe leaves the model as it found it (hooks removed, parameters untouched).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ih_circuits.chain import history_codes, validate_lags
from ih_circuits.model import IHTransformer
from ih_circuits.predictors import gih_predictive, kl_divergence, unigram_predictive
from ih_circuits.task import NGramTask
from ih_circuits.theory import predicted_parent_set
from ih_circuits.training import derive_seed

__all__ = [
    "BehaviouralReport",
    "ClassifierReport",
    "CopierReport",
    "DecompositionReport",
    "ParentReport",
    "RepresentationalReport",
    "behavioural_probe",
    "classifier_probe",
    "copier_lags",
    "copier_probe",
    "decomposition_test",
    "find_parents",
    "head_patching",
    "representational_probe",
    "selector_probe",
]


def _tokens(task: NGramTask, n_sequences: int, seed: int, purpose: str, device: torch.device) -> Tensor:
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 8:
        raise ValueError(f"n_sequences must be an integer >= 8; got {n_sequences!r}")
    return task.sample(n_sequences, seed=derive_seed(seed, purpose), device=device).tokens


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check(model: nn.Module, task: NGramTask) -> None:
    if not isinstance(task, NGramTask):
        raise ValueError(f"task must be an NGramTask; got {type(task).__name__}")
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "run_with_cache"):
        raise ValueError(
            f"model must be a TransformerLens-style model with cfg and run_with_cache; got {type(model).__name__}"
        )
    if cfg.d_vocab != task.vocab_size:
        raise ValueError(f"model d_vocab={cfg.d_vocab} but task vocab_size={task.vocab_size}")
    if task.seq_len > cfg.n_ctx:
        raise ValueError(f"task seq_len={task.seq_len} exceeds the model's n_ctx={cfg.n_ctx}")


@torch.no_grad()
def _query_log_probs(
    model: nn.Module, tokens: Int[Tensor, "batch pos"], chunk: int = 4096
) -> Float[Tensor, "batch d_vocab"]:
    """log p(x_T | x_0..x_{T-1}) distributions at the query row, in chunks."""
    outputs = []
    for start in range(0, tokens.shape[0], chunk):
        part = tokens[start : start + chunk]
        if isinstance(model, IHTransformer):
            outputs.append(model.log_probs_at(part, "last")[:, 0])
        else:
            outputs.append(torch.log_softmax(model(part)[:, -2].float(), dim=-1))
    return torch.cat(outputs)


def _default_max_lag(model: nn.Module, task: NGramTask) -> int:
    window = model.config.max_lag if isinstance(model, IHTransformer) else task.window
    return max(window, task.window) + 2


# ---------------------------------------------------------------------------------------------- copier


@dataclass
class CopierReport:
    """Attention of each layer-1 head over lags.

    Attributes:
        mass: ``[head, lag]``; column s-1 is the mean attention on lag s.
        dominant_lags: per head, the lag with the most mass.
        concentration: per head, the share of its mass on the dominant lag.
        source: ``"weights"`` (read from the positional copier) or ``"patterns"`` (cached on task data).
    """

    mass: Float[Tensor, "head lag"]
    dominant_lags: list[int]
    concentration: list[float]
    source: str

    def to_dataframe(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.mass.numpy(), columns=[f"lag {s + 1}" for s in range(self.mass.shape[1])])
        frame.insert(0, "head", range(len(frame)))
        frame["dominant_lag"] = self.dominant_lags
        frame["concentration"] = self.concentration
        return frame

    def __repr__(self) -> str:
        heads = ", ".join(
            f"h{h}->lag {s} ({c:.2f})"
            for h, (s, c) in enumerate(zip(self.dominant_lags, self.concentration, strict=True))
        )
        return f"CopierReport({heads}; from {self.source})"


def copier_probe(
    model: nn.Module,
    task: NGramTask,
    *,
    n_sequences: int = 128,
    seed: int = 0,
    max_lag: int | None = None,
    from_patterns: bool = False,
) -> CopierReport:
    """Which lag does each layer-1 head copy?

    For the positional copier the answer is in the weights (softmax(w_h) over its lags). For the full
    copier and for any TransformerLens model it is measured on task data: the mean of the cached layer-1
    pattern at (query t, key t+1-s), over sequences and over positions where every lag exists
    (``from_patterns=True`` measures the positional copier that way too).
    """
    _check(model, task)
    max_lag = _default_max_lag(model, task) if max_lag is None else max_lag
    if isinstance(model, IHTransformer) and model.config.copier == "positional" and not from_patterns:
        weights = model.copier_weights().cpu()
        mass = torch.zeros(weights.shape[0], max(max_lag, model.config.max_lag))
        table = torch.tensor(model.config.lag_table) - 1
        mass.scatter_add_(1, table, weights.float())
        source = "weights"
    else:
        tokens = _tokens(task, n_sequences, seed, "copier", _device(model))
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name == "blocks.0.attn.hook_pattern")
        pattern = cache["blocks.0.attn.hook_pattern"].float()
        n_pos = pattern.shape[-1]
        columns = []
        for lag in range(1, max_lag + 1):
            diagonal = torch.diagonal(pattern, offset=-(lag - 1), dim1=-2, dim2=-1)  # query t = key + lag - 1
            columns.append(diagonal[..., max_lag - lag :].mean((0, -1)) if n_pos > max_lag else diagonal.mean((0, -1)))
        mass = torch.stack(columns, dim=-1).cpu()
        source = "patterns"
    total = mass.sum(-1).clamp_min(1e-12)
    dominant = mass.argmax(-1)
    concentration = (mass.gather(1, dominant[:, None])[:, 0] / total).tolist()
    return CopierReport(mass, (dominant + 1).tolist(), concentration, source)


def copier_lags(model: nn.Module, task: NGramTask, **kwargs: Any) -> list[int]:
    """The dominant lag of each layer-1 head (``copier_probe(...).dominant_lags``)."""
    return copier_probe(model, task, **kwargs).dominant_lags


# -------------------------------------------------------------------------------------------- selector


def selector_probe(model: nn.Module, task: NGramTask | None = None) -> dict[tuple[int, ...], float]:
    """White-box answer for ``IHTransformer``: selector shares summed by the lag set their heads copy.

    A head subset S maps to the set of dominant lags of its heads; the shares of subsets that map to the
    same lag set add up. The result is sorted by share, largest first.
    """
    if not isinstance(model, IHTransformer):
        raise ValueError(
            "selector_probe reads the selector coefficients, which only IHTransformer has; "
            "use behavioural_probe or representational_probe for other models"
        )
    head_lags = model.head_lags()
    by_lags: dict[tuple[int, ...], float] = {}
    for subset, share in model.selector_shares().items():
        lags = tuple(sorted({head_lags[h] for h in subset}))
        by_lags[lags] = by_lags.get(lags, 0.0) + share
    return dict(sorted(by_lags.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------------------- behavioural


@dataclass
class BehaviouralReport:
    """Effect on the query prediction of resampling the token at each lag.

    Attributes:
        lags: the lags tested, 1..max_lag.
        effect: mean KL(clean || corrupted) at the query row, nats, per lag.
        stderr: its standard error over sequences.
        used_lags: lags whose effect exceeds ``threshold`` x the largest effect and 3 standard errors.
        threshold: that relative threshold.
    """

    lags: list[int]
    effect: list[float]
    stderr: list[float]
    used_lags: tuple[int, ...]
    threshold: float

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "lag": self.lags,
                "effect": self.effect,
                "stderr": self.stderr,
                "used": [s in self.used_lags for s in self.lags],
            }
        )

    def __repr__(self) -> str:
        effects = ", ".join(f"{s}: {e:.3f}" for s, e in zip(self.lags, self.effect, strict=True))
        return f"BehaviouralReport(used_lags={self.used_lags}; KL per lag {effects})"


def resample_at_lags(
    tokens: Int[Tensor, "batch pos"], lags: list[int], d_vocab: int, generator: torch.Generator
) -> Int[Tensor, "lag batch pos"]:
    """For each lag s, a copy of ``tokens`` whose token at lag s of the last token is changed (uniformly
    among the other d-1 values)."""
    batch, n_pos = tokens.shape
    shift = torch.randint(1, d_vocab, (len(lags), batch), generator=generator).to(tokens.device)
    corrupted = tokens[None].repeat(len(lags), 1, 1)
    for i, lag in enumerate(lags):
        position = n_pos - 1 - lag
        corrupted[i, :, position] = (tokens[:, position] + shift[i]) % d_vocab
    return corrupted


def behavioural_probe(
    model: nn.Module,
    task: NGramTask,
    *,
    n_sequences: int = 512,
    seed: int = 0,
    max_lag: int | None = None,
    threshold: float = 0.2,
) -> BehaviouralReport:
    """Which lags does the prediction depend on? Token patching at lags 1..max_lag (window + 2 by default).

    For each lag s we change the token at position T-1-s (lag s of the final token) to another value and
    measure KL(p_clean || p_corrupted) at the query row. The token also appears as a key and value for
    other positions, so unused lags have a small effect too; a lag counts as used when its mean effect
    is above ``threshold`` times the largest mean effect and 3 standard errors above 0. All corrupted
    batches run in one forward pass.
    """
    _check(model, task)
    max_lag = _default_max_lag(model, task) if max_lag is None else max_lag
    if not 1 <= max_lag <= task.seq_len - 2:
        raise ValueError(f"max_lag must be in 1..seq_len-2={task.seq_len - 2}; got {max_lag}")
    tokens = _tokens(task, n_sequences, seed, "behavioural", _device(model))
    lags = list(range(1, max_lag + 1))
    generator = torch.Generator().manual_seed(derive_seed(seed, "resample") % 2**62)
    corrupted = resample_at_lags(tokens, lags, task.vocab_size, generator)
    clean = _query_log_probs(model, tokens).exp()
    patched = _query_log_probs(model, corrupted.flatten(0, 1)).exp().reshape(len(lags), len(tokens), -1)
    kl = kl_divergence(clean[None].expand_as(patched), patched).clamp_min(0).cpu()
    mean, stderr = kl.mean(1), kl.std(1) / math.sqrt(kl.shape[1])
    used = tuple(
        s
        for s, m, e in zip(lags, mean.tolist(), stderr.tolist(), strict=True)
        if m > threshold * float(mean.max()) and m > 3 * e
    )
    return BehaviouralReport(lags, mean.tolist(), stderr.tolist(), used, threshold)


# ------------------------------------------------------------------------------------ representational


@dataclass
class RepresentationalReport:
    """Linear decodability of the token at each lag from the layer-1 output.

    Attributes:
        lags: lags probed.
        accuracy: held-out accuracy of a multinomial logistic probe per lag.
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


def _fit_linear_probe(
    features: Float[Tensor, "sample feature"], labels: Int[Tensor, " sample"], n_classes: int, steps: int = 60
) -> nn.Linear:
    """Multinomial logistic regression (L-BFGS, small L2 penalty)."""
    scale = features.std(0).clamp_min(1e-6)
    probe = nn.Linear(features.shape[1], n_classes).to(features.device)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    normalised = features / scale

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(normalised), labels) + 1e-4 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        probe.weight /= scale
    return probe


def representational_probe(
    model: nn.Module, task: NGramTask, *, n_sequences: int = 256, seed: int = 0, max_lag: int | None = None
) -> RepresentationalReport:
    """Which lags' tokens can be read linearly from what layer 2 sees?

    Site: the copier output ``blocks.0.attn.hook_result`` (all heads) for ``IHTransformer``, the residual
    stream after block 0 (``blocks.0.hook_resid_post``) for TransformerLens models; there the current token
    (lag 1) is always present through the embedding. Probes train on half of the sequences and are scored
    on the other half, at positions where every lag exists.
    """
    _check(model, task)
    max_lag = _default_max_lag(model, task) if max_lag is None else max_lag
    site = "blocks.0.attn.hook_result" if isinstance(model, IHTransformer) else "blocks.0.hook_resid_post"
    tokens = _tokens(task, n_sequences, seed, "representational", _device(model))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name == site)
    features = cache[site].float().flatten(2)[:, max_lag - 1 :]
    half = n_sequences // 2
    accuracy, chance = [], []
    for lag in range(1, max_lag + 1):
        labels = tokens[:, max_lag - lag : tokens.shape[1] + 1 - lag]
        with torch.enable_grad():
            probe = _fit_linear_probe(features[:half].flatten(0, 1), labels[:half].flatten(), task.vocab_size)
        with torch.no_grad():
            predicted = probe(features[half:].flatten(0, 1)).argmax(-1)
        truth = labels[half:].flatten()
        accuracy.append(float((predicted == truth).float().mean()))
        chance.append(float(torch.bincount(truth, minlength=task.vocab_size).max() / truth.numel()))
    lags = list(range(1, max_lag + 1))
    represented = tuple(s for s, a, c in zip(lags, accuracy, chance, strict=True) if a - c > 0.5 * (1 - c))
    return RepresentationalReport(lags, accuracy, chance, represented, site)


# --------------------------------------------------------------------------------------- find_parents


@dataclass
class ParentReport:
    """The parents a model uses, with the evidence.

    Attributes:
        lags: the lags the model uses (behavioural probe), sorted.
        true_parents: the task's parents.
        predicted: the theory's prediction (argmax I~ within the model's budget).
        behavioural, representational, copier: the probe reports.
        selector: white-box lag-set shares (``IHTransformer`` only, else None).
    """

    lags: tuple[int, ...]
    true_parents: tuple[int, ...]
    predicted: tuple[int, ...]
    behavioural: BehaviouralReport
    representational: RepresentationalReport
    copier: CopierReport
    selector: dict[tuple[int, ...], float] | None = None

    @property
    def matches_truth(self) -> bool:
        return self.lags == self.true_parents

    @property
    def matches_theory(self) -> bool:
        return self.lags == self.predicted

    @property
    def white_box_lags(self) -> tuple[int, ...] | None:
        """The lag set with the largest selector share (``IHTransformer`` only)."""
        return None if self.selector is None else next(iter(self.selector))

    @property
    def represented(self) -> bool:
        """Every used lag is linearly decodable from the layer-1 output."""
        return set(self.lags) <= set(self.representational.represented)

    def to_dataframe(self) -> pd.DataFrame:
        frame = self.behavioural.to_dataframe().merge(self.representational.to_dataframe(), on="lag")
        frame["true_parent"] = frame["lag"].isin(self.true_parents)
        frame["predicted"] = frame["lag"].isin(self.predicted)
        return frame

    def __repr__(self) -> str:
        white = (
            ""
            if self.selector is None
            else f", white-box {self.white_box_lags} ({self.selector[self.white_box_lags]:.3f})"
        )
        truth = "match" if self.matches_truth else "differ"
        theory = "match" if self.matches_theory else "differ"
        return (
            f"ParentReport(lags={self.lags}, true parents {self.true_parents} ({truth}), "
            f"theory {self.predicted} ({theory}){white}, "
            f"represented {self.representational.represented})"
        )

    def _repr_html_(self) -> str:
        return f"<p><code>{self!r}</code></p>" + self.to_dataframe().to_html(index=False, float_format="%.4f")


def find_parents(model: nn.Module, task: NGramTask, *, n_sequences: int = 512, seed: int = 0) -> ParentReport:
    """Which parent tokens does the model use? Behavioural, representational and (white-box) selector evidence.

    The answer (``.lags``) is the behavioural one: the lags whose resampling changes the prediction. It is
    compared with the task's parents and with the theory's prediction (argmax I~ over |S| <= D for
    ``IHTransformer``, over the task's window with the true number of parents otherwise).
    """
    _check(model, task)
    behavioural = behavioural_probe(model, task, n_sequences=n_sequences, seed=seed)
    representational = representational_probe(model, task, n_sequences=max(n_sequences // 2, 8), seed=seed)
    copier = copier_probe(model, task, seed=seed)
    if isinstance(model, IHTransformer):
        budget, window, selector = model.config.max_degree, max(model.config.max_lag, task.order), selector_probe(model)
    else:
        budget, window, selector = len(task.parents), task.window, None
    predicted = predicted_parent_set(
        vocab_size=task.vocab_size,
        parents=task.parents,
        alpha=task.alpha,
        window=window,
        max_degree=budget,
        n_kernels=1000,
        seed=seed,
    )
    return ParentReport(behavioural.used_lags, task.parents, predicted, behavioural, representational, copier, selector)


# ------------------------------------------------------------------------------------------ classifier


@dataclass
class ClassifierReport:
    """Does layer 2 attend where the generalized induction head would?

    Attributes:
        lags: the history lags used for matching.
        score: per layer-2 head, mean attention mass of the query on matching positions.
        ideal: the ideal GIH's mass at the model's a (``IHTransformer``), 1.0 otherwise (a = inf).
        best_head: the head with the highest score.
        n_sequences: sequences with at least one matching position (the others are skipped).
    """

    lags: tuple[int, ...]
    score: list[float]
    ideal: float
    best_head: int
    n_sequences: int

    @property
    def induction_score(self) -> float:
        """The generalized induction score of the best head."""
        return self.score[self.best_head]

    def __repr__(self) -> str:
        return (
            f"ClassifierReport(lags={self.lags}, induction score {self.induction_score:.3f} (head {self.best_head}), "
            f"ideal GIH {self.ideal:.3f}, {self.n_sequences} sequences)"
        )


def history_matches(tokens: Int[Tensor, "batch pos"], lags: tuple[int, ...], d_vocab: int) -> Tensor:
    """``match[b, l]``: position l's history over ``lags`` is complete and equals the final token's."""
    codes = history_codes(tokens, lags, d_vocab)
    target = codes[:, tokens.shape[1] - 1]
    return (
        (codes[:, : tokens.shape[1]] == target[:, None]) & (codes[:, : tokens.shape[1]] >= 0) & (target[:, None] >= 0)
    )


def classifier_probe(
    model: nn.Module, task: NGramTask, lags: tuple[int, ...] | None = None, *, n_sequences: int = 256, seed: int = 0
) -> ClassifierReport:
    """Attention mass of the query on context positions whose history over ``lags`` matches the query's.

    The query row q = T-2 predicts the last token; a context position l <= q *matches* when
    (x_{l-s})_{s in lags} equals (x_{T-1-s}). ``IHTransformer``'s key j holds token j+1, so it is read at
    key l-1; an ordinary model's induction head attends to the position l itself. With ``lags=(1,)`` this
    is the usual induction score (attention to the token after an earlier copy of the current token).
    ``lags`` defaults to the behavioural probe's answer.
    """
    _check(model, task)
    lags = behavioural_probe(model, task, seed=seed).used_lags if lags is None else validate_lags(lags, "lags")
    if not lags:
        raise ValueError("lags must be non-empty for the classifier probe")
    tokens = _tokens(task, n_sequences, seed, "classifier", _device(model))
    query = tokens.shape[1] - 2
    match = history_matches(tokens, lags, task.vocab_size)[:, 1 : query + 1]  # targets l = 1..q
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name == "blocks.1.attn.hook_pattern")
    pattern = cache["blocks.1.attn.hook_pattern"][:, :, query].float()  # [batch, head, key]
    keys = pattern[..., 0:query] if isinstance(model, IHTransformer) else pattern[..., 1 : query + 1]
    mass = (keys * match[:, None]).sum(-1)
    has_match = match.any(-1)
    score = mass[has_match].mean(0).tolist()
    if isinstance(model, IHTransformer):
        a = model.classifier_scale()
        n = match[has_match].sum(-1).double()
        weight = torch.exp(torch.tensor(min(a, 700.0), dtype=torch.float64))
        ideal = float((weight * n / (weight * n + query - n)).mean())
    else:
        ideal = 1.0
    best = max(range(len(score)), key=score.__getitem__)
    return ClassifierReport(lags, score, ideal, best, int(has_match.sum()))


# --------------------------------------------------------------------------------------- decomposition


@dataclass
class DecompositionReport:
    """Result of ``decomposition_test``.

    Attributes:
        holds: the verdict.
        lags: the parents the test used (found by the behavioural probe unless given).
        true_parents: the task's parents.
        rows: one per replacement (copier, selector, classifier, all) or surrogate check, with the KL to the
            model's own query prediction, the loss, the fraction of the model's gain over the in-context
            unigram that the replacement keeps (``recovered``), its excess loss over Bayes, and pass/fail.
        losses: model, unigram and Bayes last-position losses on the test sequences.
        thresholds: the numbers the verdict uses.
        failing: (component, reason) pairs.
        method: ``"replacement"`` (``IHTransformer``) or ``"surrogate"`` (other models).
    """

    holds: bool
    lags: tuple[int, ...]
    true_parents: tuple[int, ...]
    rows: list[dict[str, Any]]
    losses: dict[str, float]
    thresholds: dict[str, float]
    failing: list[tuple[str, str]] = field(default_factory=list)
    method: str = "replacement"

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def __repr__(self) -> str:
        lines = [
            f"DecompositionReport(holds={self.holds}, lags={self.lags}, true parents={self.true_parents}, "
            f"method={self.method})"
        ]
        lines.append("  losses: " + ", ".join(f"{k} {v:.4f}" for k, v in self.losses.items()))
        for row in self.rows:
            values = ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "component"
            )
            lines.append(f"  {row['component']:<12} {values}")
        for component, reason in self.failing:
            lines.append(f"  FAILS {component}: {reason}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        verdict = "holds" if self.holds else "does not hold"
        failing = "".join(f"<li><b>{c}</b>: {r}</li>" for c, r in self.failing)
        return (
            f"<p>Decomposition <b>{verdict}</b> (lags {self.lags}, true parents {self.true_parents}, "
            f"{self.method})</p>"
            + self.to_dataframe().to_html(index=False, float_format="%.4f")
            + (f"<ul>{failing}</ul>" if failing else "")
        )


def _exact_copies(tokens: Int[Tensor, "batch pos"], head_lags: list[int], d_vocab: int, dtype: torch.dtype) -> Tensor:
    """v_h(t) = onehot(x_{t+1-lag_h}), zero before the start: ``[batch, pos, head, d_vocab]``."""
    n_pos = tokens.shape[1]
    copies = []
    for lag in head_lags:
        shifted = F.pad(tokens, (lag - 1, 0), value=-1)[:, :n_pos]
        copies.append(F.one_hot(shifted.clamp_min(0), d_vocab).to(dtype) * (shifted >= 0)[..., None])
    return torch.stack(copies, dim=2)


def _ideal_pattern(tokens: Int[Tensor, "batch pos"], lags: tuple[int, ...], a: float, d_vocab: int) -> Tensor:
    """The GIH's layer-2 attention at scale a: softmax over keys j < t of a [hist(j+1) = hist(t+1)]."""
    codes = history_codes(tokens, lags, d_vocab)[:, 1:]  # history of token t+1, for t = 0..T-1
    match = (codes[:, :, None] == codes[:, None, :]) & (codes[:, :, None] >= 0) & (codes[:, None, :] >= 0)
    n_pos = tokens.shape[1]
    visible = torch.ones(n_pos, n_pos, dtype=torch.bool, device=tokens.device).tril(-1)
    logits = torch.where(visible, a * match.double(), float("-inf"))
    pattern = torch.softmax(torch.where(visible.any(-1)[:, None], logits, 0.0), dim=-1) * visible.any(-1)[:, None]
    return pattern[:, None].float()


def _selected_copier_problem(model: IHTransformer, copier: CopierReport) -> str | None:
    """Why the heads the selector weighs most are not clean copiers (None if they are).

    Clean: each head of the leading subset puts at least half its attention on one lag, and no two copy
    the same lag.
    """
    shares = model.selector_shares()
    leading = max(shares, key=shares.get)
    lags = [copier.dominant_lags[h] for h in leading]
    weak = [h for h in leading if copier.concentration[h] < 0.5]
    if weak:
        return f"selected heads {list(leading)} are diffuse: head(s) {weak} put < 0.5 of their attention on any lag"
    if len(set(lags)) < len(lags):
        return f"selected heads {list(leading)} copy the same lag twice ({lags})"
    return None


def _head_subset(model: IHTransformer, lags: tuple[int, ...], head_lags: list[int]) -> tuple[int, ...] | None:
    """The selector subset whose heads copy exactly ``lags`` (the largest-share one if several)."""
    shares = model.selector_shares()
    candidates = [
        s for s in model.config.subsets if tuple(sorted(head_lags[h] for h in s)) == lags and len(s) == len(lags)
    ]
    return max(candidates, key=shares.get) if candidates else None


def decomposition_test(
    model: nn.Module,
    task: NGramTask,
    *,
    lags: tuple[int, ...] | None = None,
    n_sequences: int = 256,
    seed: int = 0,
    kl_threshold: float = 0.05,
    recovered_threshold: float = 0.9,
    control_ratio: float = 0.25,
) -> DecompositionReport:
    """Does the model work as copier -> selector -> classifier = a generalized induction head on its parents?

    For ``IHTransformer`` each component is replaced, through hooks, by its ideal counterpart: the copier by
    exact one-hot copies of each head's dominant lag (``blocks.0.attn.hook_result``), the selector by all
    weight on the heads that copy the found lags (``blocks.0.mlp.hook_shares``), the classifier by the ideal
    GIH attention at the model's a (``blocks.1.attn.hook_pattern``); one at a time and all together. For
    each: KL(model || replaced) at the query row and the fraction of the model's gain over the in-context
    unigram that is kept, recovered = (L_unigram - L_replaced) / (L_unigram - L_model). Controls: resampling
    a non-parent lag must move the prediction less than ``control_ratio`` times the weakest parent lag. The
    decomposition holds when every KL <= ``kl_threshold``, every recovered >= ``recovered_threshold``, the
    controls pass, and the found lags are the task's parents (else the selector chose the wrong parents).

    Ordinary TransformerLens models have no such components; for them the test is a *surrogate*: the best
    GIH on the found lags (a fitted on a grid) must match the query prediction (KL <= ``kl_threshold``), some
    layer-2 head must put most of its attention on matching histories (induction score >= 0.5), and each
    found lag other than 1 must be the dominant lag of some layer-1 head (lag 1 is in the residual stream).
    """
    _check(model, task)
    parents = find_parents(model, task, n_sequences=max(n_sequences, 256), seed=seed)
    lags = parents.lags if lags is None else validate_lags(lags, "lags")
    tokens = _tokens(task, n_sequences, seed, "decomposition", _device(model))
    target = tokens[:, -1]
    model_log_probs = _query_log_probs(model, tokens)
    unigram = unigram_predictive(tokens[:, :-1], task.alpha, d_vocab=task.vocab_size)[:, -1]
    bayes = task.bayes_predictive(tokens[:, :-1])[:, -1]

    def loss_of(log_probs: Tensor) -> float:
        return float(-log_probs.gather(1, target[:, None]).mean())

    losses = {"model": loss_of(model_log_probs), "unigram": loss_of(unigram.log()), "bayes": loss_of(bayes.log())}
    gain = losses["unigram"] - losses["model"]
    thresholds = {"kl": kl_threshold, "recovered": recovered_threshold, "control_ratio": control_ratio}
    failing: list[tuple[str, str]] = []

    def row(component: str, log_probs: Tensor) -> dict[str, Any]:
        kl = float(kl_divergence(model_log_probs.exp(), log_probs.exp()).clamp_min(0).mean())
        loss = loss_of(log_probs)
        recovered = (losses["unigram"] - loss) / gain if gain > 1e-9 else float("nan")
        passed = kl <= kl_threshold and (recovered >= recovered_threshold)
        if not passed:
            failing.append(
                (component, f"KL {kl:.4f} (<= {kl_threshold}), recovered {recovered:.3f} (>= {recovered_threshold})")
            )
        return {
            "component": component,
            "kl": kl,
            "loss": loss,
            "recovered": recovered,
            "excess_over_bayes": loss - losses["bayes"],
            "passed": passed,
        }

    rows: list[dict[str, Any]] = []
    if not lags:
        failing.append(("selector", "the prediction depends on no lag: there is no parent set to decompose"))
    elif isinstance(model, IHTransformer):
        head_lags = parents.copier.dominant_lags
        subset = _head_subset(model, lags, head_lags)
        dtype = model.copier.w_pos.dtype
        copies = _exact_copies(tokens, head_lags, task.vocab_size, dtype)
        hooks = {"copier": ("blocks.0.attn.hook_result", lambda act, hook: copies.to(act.dtype))}
        if subset is None:
            failing.append(
                ("copier", f"no selector subset of heads copies exactly the lags {lags} (head lags {head_lags})")
            )
        else:
            one_hot = torch.zeros(len(model.config.subsets), dtype=dtype, device=tokens.device)
            one_hot[model.config.subsets.index(subset)] = 1.0
            hooks["selector"] = ("blocks.0.mlp.hook_shares", lambda act, hook: one_hot)
        ideal = _ideal_pattern(tokens, lags, model.classifier_scale(), task.vocab_size).to(dtype)
        hooks["classifier"] = ("blocks.1.attn.hook_pattern", lambda act, hook: ideal)
        with torch.no_grad():
            for component, hook in hooks.items():
                rows.append(row(component, model.run_with_hooks(tokens, fwd_hooks=[hook])[:, -2]))
            if subset is not None:
                rows.append(row("all", model.run_with_hooks(tokens, fwd_hooks=list(hooks.values()))[:, -2]))
    else:
        grid = [0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 20.0, math.inf]
        fits = [
            (a, gih_predictive(tokens[:, :-1], lags, a, d_vocab=task.vocab_size)[:, -1].clamp_min(1e-9).log())
            for a in grid
        ]
        a_best, best = min(fits, key=lambda fit: float(kl_divergence(model_log_probs.exp(), fit[1].exp()).mean()))
        rows.append({**row("gih_fit", best), "a": a_best})
        classifier = classifier_probe(model, task, lags, n_sequences=n_sequences, seed=seed)
        induction_passed = classifier.induction_score >= 0.5
        rows.append(
            {
                "component": "classifier",
                "induction_score": classifier.induction_score,
                "head": classifier.best_head,
                "passed": induction_passed,
            }
        )
        if not induction_passed:
            failing.append(
                ("classifier", f"best layer-2 head puts {classifier.induction_score:.3f} (< 0.5) on matching histories")
            )
        copied = set(parents.copier.dominant_lags)
        missing = [s for s in lags if s != 1 and s not in copied]
        rows.append({"component": "copier", "head_lags": str(parents.copier.dominant_lags), "passed": not missing})
        if missing:
            failing.append(("copier", f"no layer-1 head's dominant lag is {missing}"))
    if lags:
        effects = dict(zip(parents.behavioural.lags, parents.behavioural.effect, strict=True))
        weakest = min(effects[s] for s in lags if s in effects)
        others = [effects[s] for s in effects if s not in lags]
        ratio = max(others) / weakest if others and weakest > 0 else 0.0
        rows.append({"component": "controls", "control_ratio": ratio, "passed": ratio <= control_ratio})
        if ratio > control_ratio:
            failing.append(("controls", f"a non-parent lag moves the prediction {ratio:.2f}x the weakest parent lag"))
    copier_reason = _selected_copier_problem(model, parents.copier) if isinstance(model, IHTransformer) else None
    if copier_reason is not None:
        failing.append(("copier", copier_reason))
    if lags != task.parents:
        component = (
            "parents" if not isinstance(model, IHTransformer) else "selector" if copier_reason is None else "copier"
        )
        failing.append((component, f"the model uses lags {lags}; the task's parents are {task.parents}"))
    method = "replacement" if isinstance(model, IHTransformer) else "surrogate"
    return DecompositionReport(not failing, lags, task.parents, rows, losses, thresholds, failing, method)


# ------------------------------------------------------------------------------------------ patching


def head_patching(model: nn.Module, task: NGramTask, lag: int, *, n_sequences: int = 64, seed: int = 0) -> pd.DataFrame:
    """TransformerLens's ``generic_activation_patch`` over every head's ``hook_z`` at the query row.

    Clean and corrupted sequences differ only in the token at lag ``lag`` of the final token. Each head's
    output at the query position is patched from the clean run into the corrupted one; the metric is the
    log-probability of the clean final token. Returns one row per (layer, head) with the mean effect
    (patched - corrupted), its standard error and the share of the clean-corrupted gap it restores.
    An explicit ``index_df`` handles layers with different head counts.
    """
    from transformer_lens.patching import generic_activation_patch, layer_pos_head_vector_patch_setter

    _check(model, task)
    if not 1 <= lag <= task.seq_len - 2:
        raise ValueError(f"lag must be in 1..seq_len-2={task.seq_len - 2}; got {lag}")
    clean = _tokens(task, n_sequences, seed, "head_patching", _device(model))
    generator = torch.Generator().manual_seed(derive_seed(seed, "head_patching_resample") % 2**62)
    corrupted = resample_at_lags(clean, [lag], task.vocab_size, generator)[0]
    query = clean.shape[1] - 2
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clean_out, clean_cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("attn.hook_z"))

            def metric(output: Tensor) -> Tensor:
                return torch.log_softmax(output[:, query].float(), -1).gather(1, clean[:, -1:])[:, 0]

            heads = [clean_cache[f"blocks.{layer}.attn.hook_z"].shape[2] for layer in range(model.cfg.n_layers)]
            index_df = pd.DataFrame(
                [(layer, query, head) for layer, n in enumerate(heads) for head in range(n)],
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
