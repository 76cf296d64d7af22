"""Does the model work as copier -> selector -> classifier, a generalized induction head on its parents?

One entry point, ``decomposition_test(model, data)`` (or ``ProbeSession.decomposition()``), four verdicts:

- ``"holds"``: replacing the parts by the ideal GIH changes the query prediction little;
- ``"GIH circuit with smoothing"``: the structure is there (right parents, copier heads, an induction head)
  but a replacement, or the plain GIH predictor, moves the prediction by more than the bars; the report says
  which check failed, by how much, and which heads it replaced;
- ``"not a GIH circuit"``: the parents are wrong or absent, or a copier or the induction head is missing;
- ``"inconclusive"``: the lags were left to ``find_parents``, its sample could not decide them (the reason says
  how many sequences would), and no check that does not hang on them failed; nothing is said about the model.

Both kinds of model are tested by replacement (``method="replacement"``), one part at a time and together:

- ``IHTransformer``: the copier by exact one-hot copies of each head's dominant lag, the selector by all weight
  on the heads that copy the found lags, the classifier by the ideal GIH attention at the model's a;
- any TransformerLens model (``replacement.py``): the copier heads' patterns by exact copiers of the offsets
  they serve, the induction heads' patterns by the ideal GIH attention on the found lags at a fitted a; the
  heads come from ``ProbeSession.heads()`` (roles from attention and patching), the same roles the views show.
  The size of the smoothing (how far the plain GIH predictor on the found lags, the best a on a grid, is from
  the model) is its own check.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from ih_circuits.adapters import IHAdapter, TransformerLensAdapter
from ih_circuits.predictors import gih_predictive, kl_divergence
from ih_circuits.probes.behavioural import query_nlls
from ih_circuits.probes.causal import Head
from ih_circuits.probes.config import ProbeConfig
from ih_circuits.probes.data import ProbeData
from ih_circuits.probes.heads import CopierReport
from ih_circuits.probes.parents import ParentReport
from ih_circuits.probes.replacement import all_matches, copier_pattern, fitted_scale, gih_pattern, replacement_hooks
from ih_circuits.probes.roles import head_name
from ih_circuits.probes.runs import CleanRun, Meter, run_from

HOLDS, SMOOTHING, NOT_GIH = "holds", "GIH circuit with smoothing", "not a GIH circuit"
INCONCLUSIVE = "inconclusive"


@dataclass
class DecompositionReport:
    """Result of ``decomposition_test``.

    Attributes:
        verdict: ``"holds"``, ``"GIH circuit with smoothing"``, ``"not a GIH circuit"`` or ``"inconclusive"``.
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
        method: ``"replacement"``.
        parents: the ``ParentReport`` behind ``lags``.
        config: the session's ``ProbeConfig`` in one line.
        cost: forwards of the batch the session had spent when the report was made.
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
    config: str = ""
    cost: str = ""

    @property
    def holds(self) -> bool:
        return self.verdict == HOLDS

    @property
    def reason(self) -> str:
        """The verdict in words."""
        if self.holds:
            return f"holds: every check passed on lags {self.lags}"
        if self.verdict == INCONCLUSIVE:
            return self.failing[0][1]
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
                result = "undecided" if why.startswith("inconclusive:") else "failed"
                lines.append((f"{check} (structure)" if check in measured else check, result, why))
        return pd.DataFrame(lines, columns=["check", "result", "evidence"])

    def __repr__(self) -> str:
        lines = [
            f"DecompositionReport(verdict={self.verdict!r}, lags={self.lags}, method={self.method}; {self.config}; "
            f"cost {self.cost})"
        ]
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


def _selected_copier_problem(adapter: IHAdapter, copier: CopierReport) -> str | None:
    """Why the heads the selector weighs most are not clean copiers (None if they are): each head of the
    leading subset must put at least half its attention on one lag, and no two may copy the same lag."""
    shares = adapter.parts.selector_shares()
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

    def row(self, check: str, log_probs: Tensor, failing: list[tuple[str, str]], detail: str = "") -> dict[str, Any]:
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
        if detail:
            measures.append((True, detail))
            reasons = [*reasons, detail] if reasons else reasons
        if reasons:
            failing.append((check, ", ".join(reasons)))
        verdict = "failed: " + ", ".join(reasons) if reasons else "passed: " + ", ".join(t for _, t in measures)
        row = {"check": check, "kl": kl, "loss": loss, "recovered": recovered, "passed": passed, "verdict": verdict}
        if "bayes" in self.losses:
            row["excess_over_bayes"] = loss - self.losses["bayes"]
        if recovered is None:
            row["note"] = undefined
        return row


def decompose(
    adapter: TransformerLensAdapter,
    tokens: Int[Tensor, "batch pos"],
    data: ProbeData,
    config: ProbeConfig,
    parents: ParentReport,
    lags: tuple[int, ...] | None,
    heads: Callable[[tuple[int, ...]], pd.DataFrame],
    clean: CleanRun,
    meter: Meter,
) -> DecompositionReport:
    """The decomposition test on a probe session's batch (``ProbeSession.decomposition``): ``lags`` default to
    the found parents, ``heads(lags)`` gives the heads' roles, ``clean`` the clean run's cache."""
    losses = {
        name: float(nll.mean()) for name, nll in query_nlls(tokens, clean.log_probs, data, adapter.d_vocab).items()
    }
    undecided = lags is None and not parents.conclusive
    if lags is None:
        lags = parents.lags
    scorer = _Scorer(clean.log_probs, tokens[:, -1], losses, config.kl_threshold, config.recovered_threshold)
    thresholds = {
        "kl": config.kl_threshold,
        "recovered": config.recovered_threshold,
        "control_ratio": config.control_ratio,
    }
    failing: list[tuple[str, str]] = []
    structural: list[tuple[str, str]] = []
    rows: list[dict[str, Any]] = []
    if not lags:
        structural.append(("parents", parents.summary().splitlines()[0]))
    elif adapter.parts is not None:
        _replacements(adapter, tokens, lags, parents, scorer, rows, failing, structural)
    else:
        _replace_heads(adapter, tokens, lags, heads(lags), clean, config, scorer, meter, rows, failing, structural)
    if lags:
        _controls(parents, lags, config.control_ratio, rows, structural)
    if data.parents is not None and lags != data.parents:
        # IHTransformer with clean copiers on the wrong lags: the selector chose them.
        copiers_clean = adapter.parts is not None and not any(check == "copier" for check, _ in structural)
        check = "selector" if copiers_clean else "parents"
        structural.append((check, f"the model uses lags {lags}; the data's parents are {data.parents}"))
    verdict = NOT_GIH if structural else SMOOTHING if failing else HOLDS
    if undecided:
        # Only a failure that does not hang on the undecided lags is a finding; the rest waits for a larger sample.
        structural = [(check, why) for check, why in structural if check not in ("parents", "selector", "controls")]
        verdict = NOT_GIH if structural else INCONCLUSIVE
        structural = [("parents", parents.behavioural.inconclusive_reason()), *structural]
    return DecompositionReport(
        verdict,
        lags,
        data.parents,
        rows,
        losses,
        thresholds,
        structural + failing,
        "replacement",
        parents,
        config.describe(),
        meter.describe(),
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
    model, config = adapter.parts, adapter.parts.config
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
    ideal = gih_pattern(all_matches(tokens, lags, adapter.value_offset), model.classifier_scale(), adapter.value_offset)
    ideal = ideal[:, None].to(dtype)
    # Head 0 is the classifier; the layer's other head slots are inert and keep their pattern.
    hooks["classifier"] = [("blocks.1.attn.hook_pattern", lambda act, hook: torch.cat([ideal, act[:, 1:]], dim=1))]
    row = tokens.shape[1] - 2
    with torch.no_grad():
        for check, hook_list in hooks.items():
            rows.append(scorer.row(check, adapter.run_with_hooks(tokens, hook_list)[:, row].float(), failing))
        if candidates:
            every = [hook for hook_list in hooks.values() for hook in hook_list]
            rows.append(scorer.row("all", adapter.run_with_hooks(tokens, every)[:, row].float(), failing))


def _names(heads: list[Head]) -> str:
    return " + ".join(head_name(*h) for h in heads)


def _replace_heads(
    adapter: TransformerLensAdapter,
    tokens: Tensor,
    lags: tuple[int, ...],
    frame: pd.DataFrame,
    clean: CleanRun,
    config: ProbeConfig,
    scorer: _Scorer,
    meter: Meter,
    rows: list[dict[str, Any]],
    failing: list[tuple[str, str]],
    structural: list[tuple[str, str]],
) -> None:
    """TransformerLens models: the copier and induction heads (by role) replaced by the ideal parts
    (``replacement.py``), then the plain GIH predictor's distance to the model (the smoothing)."""
    induction = [(int(r.layer), int(r.head)) for r in frame.itertuples() if r.role == "induction"]
    later = frame[frame["layer"] >= 1]
    best = later.loc[later["induction_lift"].idxmax()] if len(later) else None
    lift = float(best["induction_lift"]) if best is not None else 0.0
    if induction:
        verdict = (
            f"passed: {_names(induction)} have an induction lift >= {config.role_lift} on lags {lags} "
            f"(best {head_name(int(best['layer']), int(best['head']))}: {lift:.3f})"
        )
    else:
        where = (
            f"best {head_name(int(best['layer']), int(best['head']))}: {lift:.3f}" if best is not None else "one layer"
        )
        why = f"no head in layers >= 1 has an induction lift >= {config.role_lift} on lags {lags} ({where})"
        structural.append(("induction head", why))
        verdict = f"failed: {why}"
    rows.append(
        {
            "check": "induction head",
            "heads": _names(induction) or "none",
            "induction_lift": lift,
            "passed": bool(induction),
            "verdict": verdict,
        }
    )
    last = max((layer for layer, _ in induction), default=adapter.n_layers)
    needed = sorted(set(lags) | {s - 1 for s in lags if s > 1})
    copiers: dict[int, list[Head]] = {}
    weights: dict[Head, dict[int, float]] = {}
    for record in frame.itertuples():
        served = {o: mass for o, mass in record.offsets.items() if o in needed}
        if record.role == "copier" and record.layer < last and served:
            head = (int(record.layer), int(record.head))
            weights[head] = served
            for offset in served:
                copiers.setdefault(offset, []).append(head)
    missing = [o for o in needed if o not in copiers]
    if missing:
        structural.append(("copier heads", _missing_copiers(frame, missing, last, clean)))
    found = ", ".join(f"offset {o}: {_names(h)}" for o, h in sorted(copiers.items()))
    rows.append(
        {
            "check": "copier heads",
            "heads": found,
            "passed": not missing,
            "verdict": ("failed: " + structural[-1][1])
            if missing
            else f"passed: every needed offset {needed} has copier heads ({found})",
        }
    )
    if not induction:
        return
    n_pos = tokens.shape[1]
    row = n_pos - 2
    match = all_matches(tokens, lags, adapter.value_offset)
    scales = {h: fitted_scale(clean.patterns[h[0]][:, h[1], row], match[:, row], row + 1) for h in induction}
    copier_patterns = {h: copier_pattern(n_pos, served, tokens.device) for h, served in weights.items()}
    classifier_patterns = {h: gih_pattern(match, a) for h, a in scales.items()}
    fitted = ", ".join(f"{head_name(*h)} a = {a:.2f}" for h, a in scales.items())
    plans = {
        "copier": (copier_patterns, f"replaced {_names(list(copier_patterns))} by exact copiers of their offsets"),
        "classifier": (classifier_patterns, f"replaced {_names(induction)} by the ideal GIH on {lags} ({fitted})"),
        "all": ({**copier_patterns, **classifier_patterns}, "both replacements at once"),
    }
    for check, (patterns, detail) in plans.items():
        if not patterns:
            continue
        start = min(layer for layer, _ in patterns)
        with torch.no_grad():
            log_probs = run_from(
                adapter,
                clean.resid[start],
                start,
                tokens,
                replacement_hooks(patterns),
                meter,
                "decomposition: replacements",
            )
        rows.append({**scorer.row(check, log_probs, failing, detail), "heads": _names(list(patterns))})
    d_vocab = adapter.d_vocab
    model_log_probs = scorer.model_log_probs
    fits = [
        (a, gih_predictive(tokens[:, :-1], lags, a, d_vocab=d_vocab)[:, -1].clamp_min(1e-9).log().to(model_log_probs))
        for a in config.a_grid
    ]
    a_best, best_fit = min(fits, key=lambda fit: float(kl_divergence(model_log_probs, fit[1], kind="log_probs").mean()))
    detail = f"the plain GIH on {lags} at the best a = {a_best} (what the OV circuits and unembedding add beyond it)"
    rows.append({**scorer.row("smoothing", best_fit, failing, detail), "a": a_best})


def _missing_copiers(frame: pd.DataFrame, missing: list[int], last: int, clean: CleanRun) -> str:
    """Why an offset has no copier head: the heads before layer ``last`` that attend to it most, with their mean
    attention there, and what patching found for them."""
    parts = []
    for offset in missing:
        best, best_mass = None, -1.0
        for layer in range(last):
            pattern = clean.patterns[layer]
            column = torch.diagonal(pattern, offset=-offset, dim1=-2, dim2=-1).mean((0, -1))
            head = int(column.argmax())
            if float(column[head]) > best_mass:
                best, best_mass = (layer, head), float(column[head])
        if best is None:
            parts.append(f"offset {offset}: no layer before the induction heads")
            continue
        record = frame[(frame["layer"] == best[0]) & (frame["head"] == best[1])].iloc[0]
        parts.append(
            f"offset {offset} (best {head_name(*best)}: {best_mass:.3f} of its attention there; its role "
            f"{record.role}, dominant offset {record.offset}; {record.get('carries', 'not patched')})"
        )
    return f"no copier head before layer {last} for offset(s) {missing}: " + "; ".join(parts)


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
