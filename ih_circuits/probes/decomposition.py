"""Does the model work as copier -> selector -> classifier, a generalized induction head on its parents?

One entry point, ``decomposition_test(model, data)``, three verdicts:

- ``"holds"``: replacing the parts by the ideal GIH changes the query prediction little;
- ``"GIH circuit with smoothing"``: the structure is there (right parents, copier heads, an induction head)
  but the output is not a plain GIH at any scale a (e.g. it mixes in Bayes-like pseudo-counts); the report
  says which check failed and by how much;
- ``"not a GIH circuit"``: the parents are wrong or absent, or a copier or the induction head is missing.

For ``IHTransformer`` the parts are replaced through hooks by their ideal counterparts (one at a time and
together): the copier by exact one-hot copies of each head's dominant lag, the selector by all weight on
the heads that copy the found lags, the classifier by the ideal GIH attention at the model's a. For
ordinary TransformerLens models, which have no such parts, the checks are: some head (layer >= 1) is a
generalized induction head on the found lags (lift >= 0.5, see ``heads.py``); for every offset the circuit
needs (query side s - 1 and key side s for each parent s, except the token itself), some earlier head puts
at least a third of its attention there; and the best GIH on the found lags (a on a grid) is within
``kl_threshold`` of the model's prediction.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor, nn

from ih_circuits.adapters import IHAdapter, TransformerLensAdapter, adapt
from ih_circuits.chain import history_codes
from ih_circuits.predictors import gih_predictive, kl_divergence
from ih_circuits.probes.behavioural import query_nlls
from ih_circuits.probes.data import Data, probe_data
from ih_circuits.probes.heads import ROLE_THRESHOLD, CopierReport, offset_mass, scan_heads
from ih_circuits.probes.parents import ParentReport, find_parents

HOLDS, SMOOTHING, NOT_GIH = "holds", "GIH circuit with smoothing", "not a GIH circuit"
A_GRID = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 20.0, math.inf)
COPIER_MASS = 1 / 3


@dataclass
class DecompositionReport:
    """Result of ``decomposition_test``.

    Attributes:
        verdict: ``"holds"``, ``"GIH circuit with smoothing"`` or ``"not a GIH circuit"``.
        lags: the parents the test used (found by ``find_parents`` unless given).
        true_parents: the data's parents, or None when unknown.
        rows: one per check: replacements (``IHTransformer``) or structure and GIH fit (other models), with
            KL to the model's query prediction, loss, kept fraction of the gain over the in-context unigram
            (``recovered``; None, with a ``note`` saying why, when the model does not beat the unigram), excess
            loss over Bayes (n-gram data), ``passed`` and ``verdict``: "passed: ..." or "failed: ..." with each
            measured number and its threshold in words.
        losses: model, unigram (and Bayes, for n-gram data) query-row losses on the test sequences.
        thresholds: the numbers the verdict uses.
        failing: (check, reason in words) pairs.
        method: ``"replacement"`` (``IHTransformer``) or ``"surrogate"`` (other models).
        parents: the ``ParentReport`` behind ``lags``.
    """

    verdict: str
    lags: tuple[int, ...]
    true_parents: tuple[int, ...] | None
    rows: list[dict[str, Any]]
    losses: dict[str, float]
    thresholds: dict[str, float]
    failing: list[tuple[str, str]] = field(default_factory=list)
    method: str = "replacement"
    parents: ParentReport | None = field(default=None, repr=False)

    @property
    def holds(self) -> bool:
        return self.verdict == HOLDS

    @property
    def reason(self) -> str:
        """The verdict in words."""
        if self.holds:
            return f"holds: every check passed on lags {self.lags}"
        return f"{self.verdict}: " + "; ".join(f"{check} failed: {why}" for check, why in self.failing)

    def to_dataframe(self) -> pd.DataFrame:
        """The rows' numbers, one row per check; a column a check does not measure is NaN (``checks()`` has the
        same checks in words, with nothing missing)."""
        return pd.DataFrame(self.rows)

    def checks(self) -> pd.DataFrame:
        """Every check in words: ``check``, ``result`` ("passed" or "failed") and ``evidence`` (the measured numbers
        with their thresholds), one row per measured check, then the failed structural checks that have no row
        (no used lag, diffuse or duplicate copiers, parents other than the data's), named "<part> (structure)"
        where a measured check already bears the part's name (its replacement can pass while its structure fails).
        """
        lines = [(row["check"], *row["verdict"].split(": ", 1)) for row in self.rows]
        explained = {(check, evidence) for check, result, evidence in lines if result == "failed"}
        measured = {row["check"] for row in self.rows}
        for check, why in self.failing:
            if (check, why) not in explained:
                lines.append((f"{check} (structure)" if check in measured else check, "failed", why))
        return pd.DataFrame(lines, columns=["check", "result", "evidence"])

    def __repr__(self) -> str:
        lines = [f"DecompositionReport(verdict={self.verdict!r}, lags={self.lags}, method={self.method})"]
        lines.append("  losses: " + ", ".join(f"{k} {v:.4f}" for k, v in self.losses.items()))
        lines.extend(f"  {c.check:<14} {c.result}: {c.evidence}" for c in self.checks().itertuples())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return (
            f"<p>Decomposition: <b>{html.escape(self.verdict)}</b> (lags {self.lags}, {self.method})</p>"
            + self.checks().to_html(index=False, justify="left")
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
    codes = history_codes(tokens, lags, d_vocab)[:, 1:]
    match = (codes[:, :, None] == codes[:, None, :]) & (codes[:, :, None] >= 0) & (codes[:, None, :] >= 0)
    n_pos = tokens.shape[1]
    visible = torch.ones(n_pos, n_pos, dtype=torch.bool, device=tokens.device).tril(-1)
    logits = torch.where(visible, a * match.double(), float("-inf"))
    pattern = torch.softmax(torch.where(visible.any(-1)[:, None], logits, 0.0), dim=-1) * visible.any(-1)[:, None]
    return pattern[:, None].float()


def _selected_copier_problem(adapter: IHAdapter, copier: CopierReport) -> str | None:
    """Why the heads the selector weighs most are not clean copiers (None if they are): each head of the
    leading subset must put at least half its attention on one lag, and no two may copy the same lag."""
    shares = adapter.ih.selector_shares()
    leading = max(shares, key=shares.get)
    lags = [copier.dominant_lags[h] for h in leading]
    weak = [h for h in leading if copier.concentration[h] < 0.5]
    if weak:
        return f"selected heads {list(leading)} are diffuse: head(s) {weak} put < 0.5 of their attention on any lag"
    if len(set(lags)) < len(lags):
        return f"selected heads {list(leading)} copy the same lag twice ({lags})"
    return None


class _Scorer:
    """KL to the model's query prediction, loss and kept fraction of the gain over the in-context unigram."""

    def __init__(
        self,
        model_log_probs: Tensor,
        target: Tensor,
        losses: dict[str, float],
        kl_threshold: float,
        recovered_threshold: float,
    ) -> None:
        self.model_log_probs, self.target, self.losses = model_log_probs, target, losses
        self.kl_threshold, self.recovered_threshold = kl_threshold, recovered_threshold

    def loss(self, log_probs: Tensor) -> float:
        return float(-log_probs.gather(1, self.target[:, None]).mean())

    def row(self, check: str, log_probs: Tensor, failing: list[tuple[str, str]]) -> dict[str, Any]:
        """The check's numbers, and its verdict in words: the failed measures with their thresholds, or, when none
        failed, every measure (and why ``recovered`` is not, when the model has no gain over the unigram)."""
        kl = float(kl_divergence(self.model_log_probs, log_probs, kind="log_probs").clamp_min(0).mean())
        loss = self.loss(log_probs)
        gain = self.losses["unigram"] - self.losses["model"]
        recovered = (self.losses["unigram"] - loss) / gain if gain > 1e-9 else None
        measures = [(kl <= self.kl_threshold, f"KL to the model {kl:.4f} nats (needs <= {self.kl_threshold})")]
        undefined = (
            f"recovered is undefined: the model's loss {self.losses['model']:.4f} is not below the in-context "
            f"unigram's {self.losses['unigram']:.4f}, so it has no gain to keep"
        )
        if recovered is None:
            measures.append((True, undefined))
        else:
            kept = f"keeps {recovered:.3f} of the model's gain over the unigram (needs >= {self.recovered_threshold})"
            measures.append((recovered >= self.recovered_threshold, kept))
        reasons = [text for ok, text in measures if not ok]
        passed = not reasons
        if reasons:
            failing.append((check, ", ".join(reasons)))
        verdict = "failed: " + ", ".join(reasons) if reasons else "passed: " + ", ".join(t for _, t in measures)
        row = {"check": check, "kl": kl, "loss": loss, "recovered": recovered, "passed": passed, "verdict": verdict}
        if "bayes" in self.losses:
            row["excess_over_bayes"] = loss - self.losses["bayes"]
        if recovered is None:
            row["note"] = undefined
        return row


def decomposition_test(
    model: nn.Module,
    data: Data,
    *,
    lags: tuple[int, ...] | None = None,
    n_sequences: int = 256,
    seed: int = 0,
    kl_threshold: float = 0.05,
    recovered_threshold: float = 0.9,
    control_ratio: float = 0.25,
) -> DecompositionReport:
    """Is the model a generalized induction head on its parents? See the module docstring for the checks.

    Args:
        model: ``IHTransformer`` or any TransformerLens model, any depth.
        data: an ``NGramTask``, a data source such as ``RepeatedTokens``, or an integer token tensor.
        lags: the parents to test; default ``find_parents(model, data).lags``. Must lie inside the lags the
            probes test, 1..window+2 (1..8 for data without a window), so that the controls can compare them.
        n_sequences: test sequences drawn from a source (a tensor is used as given).
        kl_threshold: largest KL (nats) between the model and its replacement / best GIH for "holds".
        recovered_threshold: smallest kept fraction of the model's gain over the in-context unigram.
        control_ratio: a lag outside ``lags`` must move the query prediction (query side) less than this
            times the weakest lag in ``lags``.
    """
    adapter = adapt(model)
    resolved = probe_data(data, adapter)
    if lags is not None:
        lags = resolved.check_lags(lags)
    parents = find_parents(model, data, n_sequences=max(n_sequences, 256), seed=seed)
    if lags is None:
        lags = parents.lags
    tokens = resolved.tokens_for(n_sequences, seed, "decomposition", adapter.device)
    target = tokens[:, -1]
    model_log_probs = adapter.query_log_probs(tokens)
    losses = {
        name: float(nll.mean()) for name, nll in query_nlls(tokens, model_log_probs, resolved, adapter.d_vocab).items()
    }
    scorer = _Scorer(model_log_probs, target, losses, kl_threshold, recovered_threshold)
    thresholds = {"kl": kl_threshold, "recovered": recovered_threshold, "control_ratio": control_ratio}
    failing: list[tuple[str, str]] = []
    structural: list[tuple[str, str]] = []
    rows: list[dict[str, Any]] = []
    if not lags:
        structural.append(("parents", parents.summary().splitlines()[0]))
    elif isinstance(adapter, IHAdapter):
        _replacements(adapter, tokens, lags, parents, scorer, rows, failing, structural)
    else:
        _surrogate(adapter, data, tokens, lags, n_sequences, seed, scorer, rows, failing, structural)
    if lags:
        _controls(parents, lags, control_ratio, rows, structural)
    if resolved.parents is not None and lags != resolved.parents:
        # IHTransformer with clean copiers on the wrong lags: the selector chose them.
        copiers_clean = adapter.white_box and not any(check == "copier" for check, _ in structural)
        check = "selector" if copiers_clean else "parents"
        structural.append((check, f"the model uses lags {lags}; the data's parents are {resolved.parents}"))
    verdict = NOT_GIH if structural else SMOOTHING if failing else HOLDS
    method = "replacement" if adapter.white_box else "surrogate"
    return DecompositionReport(
        verdict, lags, resolved.parents, rows, losses, thresholds, structural + failing, method, parents
    )


def _replacements(
    adapter: IHAdapter,
    tokens: Tensor,
    lags: tuple[int, ...],
    parents: ParentReport,
    scorer: _Scorer,
    rows: list[dict[str, Any]],
    failing: list[tuple[str, str]],
    structural: list[tuple[str, str]],
) -> None:
    """``IHTransformer``: replace copier, selector, classifier by their ideals (one at a time, then all)."""
    model, config = adapter.ih, adapter.ih.config
    head_lags = parents.copier.dominant_lags
    copier_reason = _selected_copier_problem(adapter, parents.copier)
    if copier_reason is not None:
        structural.append(("copier", copier_reason))
    shares = model.selector_shares()
    candidates = [s for s in config.subsets if len(s) == len(lags) and tuple(sorted(head_lags[h] for h in s)) == lags]
    dtype = model.copier.w_pos.dtype
    copies = _exact_copies(tokens, head_lags, config.d_vocab, dtype)
    hooks = {"copier": [("blocks.0.attn.hook_result", lambda act, hook: copies.to(act.dtype))]}
    if not candidates:
        structural.append(
            ("copier", f"no selector subset of heads copies exactly the lags {lags} (head lags {head_lags})")
        )
    else:
        # The ideal selector puts all its weight on one subset: the kernel is that subset's similarity.
        chosen = config.subsets.index(max(candidates, key=shares.get))
        similarity: dict[str, Tensor] = {}

        def keep_chosen(act: Tensor, hook: object) -> None:
            similarity["chosen"] = act[:, chosen]

        hooks["selector"] = [
            ("blocks.0.mlp.hook_subset_similarity", keep_chosen),
            ("blocks.0.mlp.hook_kernel", lambda act, hook: similarity["chosen"]),
        ]
    ideal = _ideal_pattern(tokens, lags, model.classifier_scale(), config.d_vocab).to(dtype)
    # Head 0 is the classifier; the layer's other head slots are inert and keep their pattern.
    hooks["classifier"] = [("blocks.1.attn.hook_pattern", lambda act, hook: torch.cat([ideal, act[:, 1:]], dim=1))]
    row = tokens.shape[1] - 2
    with torch.no_grad():
        for check, hook_list in hooks.items():
            rows.append(scorer.row(check, adapter.run_with_hooks(tokens, hook_list)[:, row].float(), failing))
        if candidates:
            every = [hook for hook_list in hooks.values() for hook in hook_list]
            rows.append(scorer.row("all", adapter.run_with_hooks(tokens, every)[:, row].float(), failing))


def _surrogate(
    adapter: TransformerLensAdapter,
    data: Data,
    tokens: Tensor,
    lags: tuple[int, ...],
    n_sequences: int,
    seed: int,
    scorer: _Scorer,
    rows: list[dict[str, Any]],
    failing: list[tuple[str, str]],
    structural: list[tuple[str, str]],
) -> None:
    """Ordinary models: an induction head on ``lags``, copier heads for the offsets it needs, a GIH fit."""
    heads = scan_heads(adapter.model, data, lags=lags, n_sequences=min(n_sequences, 64), seed=seed)
    later = heads[heads["layer"] >= 1]
    best = later.loc[later["induction_lift"].idxmax()] if len(later) and later["induction_lift"].notna().any() else None
    lift = float(best["induction_lift"]) if best is not None else float("nan")
    found = best is not None and lift >= ROLE_THRESHOLD
    where = f"L{int(best['layer'])}H{int(best['head'])}" if best is not None else "none"
    if found:
        verdict = f"passed: {where} has an induction lift {lift:.3f} on lags {lags} (needs >= {ROLE_THRESHOLD})"
    else:
        why = f"no head in layers >= 1 has an induction lift >= {ROLE_THRESHOLD} on lags {lags} (best {where}: "
        why += f"{lift:.3f})" if best is not None else "no head scored)"
        structural.append(("induction head", why))
        verdict = f"failed: {why}"
    rows.append({"check": "induction head", "head": where, "induction_lift": lift, "passed": found, "verdict": verdict})
    needed = sorted({s - 1 for s in lags if s > 1} | set(lags))
    induction_layer = int(best["layer"]) if found else adapter.n_layers
    mass = _offset_masses(adapter, tokens, max(needed), induction_layer)
    missing = [o for o in needed if mass.get(o, 0.0) < COPIER_MASS]
    best_mass = {o: round(mass.get(o, 0.0), 3) for o in needed}
    if missing:
        why = (
            f"no head before layer {induction_layer} puts >= {COPIER_MASS:.3f} of its attention on offset(s) "
            f"{missing} (best { ({o: best_mass[o] for o in missing}) })"
        )
        structural.append(("copier heads", why))
        verdict = f"failed: {why}"
    else:
        verdict = (
            f"passed: each offset in {needed} has a head before layer {induction_layer} with {best_mass} of its "
            f"attention there (needs >= {COPIER_MASS:.3f})"
        )
    rows.append(
        {
            "check": "copier heads",
            "offsets_needed": str(needed),
            "best_mass": str(best_mass),
            "passed": not missing,
            "verdict": verdict,
        }
    )
    d_vocab = adapter.d_vocab
    fits = [(a, gih_predictive(tokens[:, :-1], lags, a, d_vocab=d_vocab)[:, -1].clamp_min(1e-9).log()) for a in A_GRID]
    model_log_probs = scorer.model_log_probs
    a_best, best_fit = min(
        fits, key=lambda fit: float(kl_divergence(model_log_probs, fit[1].to(model_log_probs), kind="log_probs").mean())
    )
    rows.append({**scorer.row("gih fit", best_fit.to(scorer.model_log_probs.device), failing), "a": a_best})


def _offset_masses(adapter: TransformerLensAdapter, tokens: Tensor, max_offset: int, before: int) -> dict[int, float]:
    """For each offset, the largest mean attention any head in layers < ``before`` puts on it."""
    best: dict[int, float] = {}
    for layer in range(min(before, adapter.n_layers)):
        mass = offset_mass(adapter.patterns(tokens, layer), max_offset).max(0).values
        for offset, value in enumerate(mass.tolist()):
            best[offset] = max(best.get(offset, 0.0), value)
    return best


def _controls(
    parents: ParentReport,
    lags: tuple[int, ...],
    control_ratio: float,
    rows: list[dict[str, Any]],
    structural: list[tuple[str, str]],
) -> None:
    """A lag outside ``lags`` must move the query prediction less than ``control_ratio`` x the weakest parent.

    With no probed lag outside ``lags`` there is nothing to compare (passed, and said so); a lag of ``lags`` that
    does not move the prediction at all makes the ratio infinite (failed).
    """
    effects = parents.query_effects
    tested = [effects[s] for s in lags if s in effects]
    weakest = min(tested) if tested else 0.0
    others = [effects[s] for s in effects if s not in lags]
    if not others:
        ratio = 0.0
        measure = f"no probed lag lies outside {lags}, so there is nothing to compare (needs <= {control_ratio})"
    elif weakest <= 0:
        ratio = math.inf
        measure = f"a lag of {lags} does not move the prediction at all, so nothing outside can be compared with it"
    else:
        ratio = max(others) / weakest
        measure = (
            f"the lags outside {lags} move the prediction at most {ratio:.2f}x the weakest of them "
            f"(needs <= {control_ratio})"
        )
    passed = ratio <= control_ratio
    if not passed:
        structural.append(("controls", measure))
    verdict = ("passed: " if passed else "failed: ") + measure
    rows.append({"check": "controls", "control_ratio": ratio, "passed": passed, "verdict": verdict})
