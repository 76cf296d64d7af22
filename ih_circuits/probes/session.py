"""``ProbeSession``: adapt the model once, draw the data once, run the clean batch once, answer every probe from it.

    session = ProbeSession(model, data, ProbeConfig(n_sequences=256))
    session.parents()          # ParentReport: the lags the prediction conditions on (query side)
    session.heads()            # every head's role, from attention relative to chance and from patching
    session.head_parents()     # per induction head, the lags its matching uses
    session.path_patching()    # exact patching of the heads that carry each lag (query and key side)
    session.decomposition()    # replacement of the copier and induction heads by the ideal parts
    views.session_view(session, layer)  # circuitsvis view, heads named by the same roles
    session.cost               # forwards of the batch spent so far, by probe

Each answer is computed once and kept. The query row's history is read at the input of ``query_layer``: by
default the earliest layer that holds an induction head on the current token (lag 1: every generalized induction
head that matches on the current token also attends to its matches), else layer 1; the report says which and why.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import cached_property

import pandas as pd
import torch
from torch import Tensor, nn

from ih_circuits.adapters import TransformerLensAdapter, adapt
from ih_circuits.checks import check_int
from ih_circuits.predictors import kl_divergence
from ih_circuits.probes.behavioural import (
    BehaviouralReport,
    RepresentationalReport,
    decide_lags,
    fit_linear_probes,
    mean_stderr,
    query_nlls,
)
from ih_circuits.probes.causal import Head, attribute, key_side, pattern_shift, query_side_patching
from ih_circuits.probes.config import ProbeConfig
from ih_circuits.probes.data import Data, probe_data, resample_positions
from ih_circuits.probes.decomposition import DecompositionReport, decompose
from ih_circuits.probes.heads import (
    ClassifierReport,
    CopierReport,
    classifier_report,
    copier_report,
    history_matches,
    induction_rows,
    induction_scores,
    selector_probe,
)
from ih_circuits.probes.parents import ParentReport, theory_prediction
from ih_circuits.probes.patching import head_patching_table
from ih_circuits.probes.roles import assign_roles, head_name, offset_table
from ih_circuits.probes.runs import Meter, QuerySide, clean_run, query_side
from ih_circuits.seeds import derive_seed


def _mean_stderr(values: Tensor) -> tuple[list[float], list[float]]:
    """Per lag (rows of ``values``), the mean over sequences and its standard error, as lists."""
    mean, stderr = mean_stderr(values)
    return mean.tolist(), stderr.tolist()


class ProbeSession:
    """Every probe of one model on one batch (see the module docstring).

    Args:
        model: ``IHTransformer`` or any TransformerLens model (``HookedTransformer``, ``TransformerBridge``).
        data: an ``NGramTask``, a data source such as ``RepeatedTokens``, or an integer token tensor.
        config: thresholds and sizes (``ProbeConfig``); keyword arguments override its fields.
    """

    def __init__(self, model: nn.Module, data: Data, config: ProbeConfig | None = None, **overrides: object) -> None:
        config = config if config is not None else ProbeConfig()
        if not isinstance(config, ProbeConfig):
            raise ValueError(f"config must be a ProbeConfig; got {type(config).__name__}")
        self.config = replace(config, **overrides) if overrides else config
        self.model = model
        self.adapter: TransformerLensAdapter = adapt(model)
        self.data = probe_data(data, self.adapter)
        self.max_lag = self._check_max("max_lag", self.config.max_lag, self.data.max_lag(), self.data.seq_len - 2)
        self.max_offset = self._check_max(
            "max_offset", self.config.max_offset, self.data.seq_len - 1, self.data.seq_len - 1
        )
        if self.adapter.parts is not None:
            self.adapter.history_site(self.config.query_layer)  # IHTransformer: None or 1 (the classifier)
        elif self.config.query_layer is not None:
            self.adapter.check_layer(self.config.query_layer, "query_layer")
        self.tokens = self.data.tokens_for(self.config.n_sequences, self.config.seed, "session", self.adapter.device)
        self.meter = Meter(model, self.tokens.shape[0])
        self.clean = clean_run(self.adapter, self.tokens, self.meter)
        self._roles: dict[tuple[int, ...], pd.DataFrame] = {}
        self._heads: dict[tuple[int, ...], pd.DataFrame] = {}
        self._patching: dict[tuple[int, ...], pd.DataFrame] = {}

    @staticmethod
    def _check_max(name: str, value: int | None, default: int, high: int) -> int:
        if value is None:
            return max(1, min(default, high))
        return check_int(value, name, 1, high, high_text=f"{high} for sequences of this length")

    # ------------------------------------------------------------------------------------------ bookkeeping

    @property
    def cost(self) -> str:
        """Forwards of the batch spent so far, by probe."""
        return self.meter.describe()

    @property
    def forwards(self) -> float:
        return self.meter.forwards

    @property
    def row(self) -> int:
        return self.tokens.shape[1] - 2

    @cached_property
    def query_site(self) -> tuple[int, str, str]:
        """(query layer, history site, why): where the query's gathered history is read."""
        adapter = self.adapter
        if adapter.parts is not None:
            return 1, adapter.history_site(None), "IHTransformer: the copier output, what the classifier queries with"
        if self.config.query_layer is not None:
            layer = self.config.query_layer
            return layer, f"blocks.{layer}.hook_resid_pre", f"query_layer={layer} was given"
        rows = induction_rows(self.tokens.shape[1], (1,)).to(self.tokens.device)
        match = history_matches(self.tokens, (1,), rows, adapter.value_offset)
        for layer in range(1, adapter.n_layers):
            score, baseline, _ = induction_scores(self.clean.patterns[layer], match, rows, adapter.value_offset)
            lift = (score - baseline) / (1 - baseline)
            best = int(lift.argmax())
            if float(lift[best]) >= self.config.role_lift:
                why = (
                    f"the input of layer {layer}, the earliest layer with an induction head "
                    f"({head_name(layer, best)}, lift {float(lift[best]):.2f} on lag 1)"
                )
                return layer, f"blocks.{layer}.hook_resid_pre", why
        layer = min(1, adapter.n_layers - 1)
        why = f"no head has an induction lift >= {self.config.role_lift} on lag 1, so layer {layer}'s input"
        return layer, f"blocks.{layer}.hook_resid_pre", why

    # ---------------------------------------------------------------------------------------------- parents

    @cached_property
    def _lag_runs(self) -> tuple[list[int], QuerySide]:
        lags = list(range(1, self.max_lag + 1))
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "resample") % 2**62)
        n_pos = self.tokens.shape[1]
        corrupted = resample_positions(self.tokens, [n_pos - 1 - s for s in lags], generator)
        layer = self.query_site[0]
        return lags, query_side(
            self.adapter, self.tokens, corrupted, layer, self.clean, self.meter, total=self.config.total_effect
        )

    @cached_property
    def behaviour(self) -> BehaviouralReport:
        """Query-side resampling per lag (see ``behavioural.py`` for the bars)."""
        lags, runs = self._lag_runs
        config = self.config
        reference = self.clean.log_probs[None].expand_as(runs.log_probs)
        target = self.tokens[:, -1:]
        shape = (len(lags), self.tokens.shape[0])

        def kl(corrupted: Tensor) -> Tensor:
            flat = kl_divergence(reference.flatten(0, 1), corrupted.flatten(0, 1), kind="log_probs")
            return flat.clamp_min(0).reshape(shape).cpu()

        query_kl = kl(runs.log_probs)
        hurt = self.clean.log_probs.gather(1, target)[None] - runs.log_probs.gather(
            2, target[None].expand(len(lags), -1, -1)
        )
        query_mean, query_stderr = _mean_stderr(query_kl)
        hurt_mean, hurt_stderr = _mean_stderr(hurt[..., 0].cpu())
        total_mean = total_stderr = None
        if runs.total is not None:
            total_mean, total_stderr = _mean_stderr(kl(runs.total))
        nll = query_nlls(self.tokens, self.clean.log_probs, self.data, self.adapter.d_vocab)
        difference = nll["unigram"] - nll["model"]
        bar = config.n_stderr
        used, undecided, needed = decide_lags(
            lags,
            query_mean,
            query_stderr,
            hurt_mean,
            hurt_stderr,
            floor=config.floor,
            threshold=config.threshold,
            n_stderr=bar,
            n_sequences=self.tokens.shape[0],
        )
        return BehaviouralReport(
            lags,
            query_mean,
            query_stderr,
            total_mean,
            total_stderr,
            used,
            config.threshold,
            config.floor,
            self.query_site[1],
            hurt_mean,
            hurt_stderr,
            float(nll["model"].mean()),
            float(nll["unigram"].mean()),
            float(difference.std() / math.sqrt(len(difference))),
            n_stderr=bar,
            site_reason=self.query_site[2],
            undecided=undecided,
            needed_sequences=needed,
            n_sequences=self.tokens.shape[0],
        )

    @cached_property
    def representation(self) -> RepresentationalReport:
        """Ridge read-outs of each lag's token from the query's history (held-out half of the batch)."""
        tokens, max_lag = self.tokens, self.max_lag
        if tokens.shape[0] < 4:
            raise ValueError(f"the representational probe needs >= 4 sequences; got {tokens.shape[0]}")
        layer, site, _ = self.query_site
        if self.adapter.parts is None:
            features = self.clean.resid[layer]
        else:
            with self.meter.counting("parents: history read-out"):
                features = self.adapter.activation(tokens, site)
        features = features.float().flatten(2)[:, max_lag - 1 : -1]
        half = tokens.shape[0] // 2
        lags = list(range(1, max_lag + 1))
        labels = torch.stack([tokens[:, max_lag - lag : tokens.shape[1] - lag] for lag in lags], dim=-1)
        probe = fit_linear_probes(features[:half].flatten(0, 1), labels[:half].flatten(0, 1))
        truth = labels[half:].flatten(0, 1)
        accuracy = (probe(features[half:].flatten(0, 1)) == truth).float().mean(0).tolist()
        counts = torch.zeros(max_lag, self.adapter.d_vocab, device=truth.device).scatter_add_(
            1, truth.T, torch.ones_like(truth.T, dtype=torch.float)
        )
        chance = (counts.max(-1).values / truth.shape[0]).tolist()
        represented = tuple(s for s, a, c in zip(lags, accuracy, chance, strict=True) if a - c > 0.5 * (1 - c))
        return RepresentationalReport(lags, accuracy, chance, represented, site)

    def copier(self, layer: int = 0, from_patterns: bool = False) -> CopierReport:
        """Attention of each head of ``layer`` over lags 1..max_lag (``IHTransformer``'s copier: its weights,
        unless ``from_patterns``)."""
        self.adapter.check_layer(layer, "layer")
        return copier_report(self.adapter, self.clean.patterns[layer], self.max_lag, layer, from_patterns)

    def parents(self) -> ParentReport:
        """Which lags the prediction conditions on, with the evidence, the truth and the theory."""
        return self._parent_report

    @cached_property
    def _parent_report(self) -> ParentReport:
        parts = self.adapter.parts
        selector = selector_probe(parts) if parts is not None else None
        prediction, note = theory_prediction(self.adapter, self.data)
        behaviour = self.behaviour
        return ParentReport(
            behaviour.used_lags,
            self.data.parents,
            None if prediction is None else prediction.best,
            note,
            behaviour,
            self.representation,
            self.copier(0),
            selector,
            config=self.config.describe(),
            cost=self.cost,
            tied=() if prediction is None else prediction.lags[1:],
        )

    # ------------------------------------------------------------------------------------------------ heads

    def _lags(self, lags: tuple[int, ...] | None) -> tuple[int, ...]:
        if lags is None:
            return self.behaviour.used_lags or (1,)
        return self.data.check_lags(lags, "lags", self.max_lag)

    def _attention_roles(self, lags: tuple[int, ...]) -> pd.DataFrame:
        """Roles from attention alone (``roles.py``), on ``lags``; computed once per lag set."""
        if lags in self._roles:
            return self._roles[lags]
        adapter = self.adapter
        frame = offset_table(self.clean.patterns, self.max_offset, self.config.shared_lift)
        rows = induction_rows(self.tokens.shape[1], lags).to(self.tokens.device)
        match = history_matches(self.tokens, lags, rows, adapter.value_offset)
        scores, baselines = [], []
        for layer in range(adapter.n_layers):
            score, baseline, _ = induction_scores(self.clean.patterns[layer], match, rows, adapter.value_offset)
            scores += score.tolist()
            baselines += [baseline] * len(score)
        frame["induction_score"] = scores
        frame["induction_baseline"] = baselines
        frame["induction_lift"] = [(s - b) / (1 - b) if b < 1 else 0.0 for s, b in zip(scores, baselines, strict=True)]
        self._roles[lags] = assign_roles(frame, self.config)
        return self._roles[lags]

    def heads(self, lags: tuple[int, ...] | None = None) -> pd.DataFrame:
        """One row per (layer, head): dominant offset over the whole context, copier score and lift, induction
        score, baseline and lift on ``lags`` (default the found parents, else (1,)), ``role``, ``shared_with``,
        ``evidence`` and ``carries`` (what exact patching found; TransformerLens models whose prediction uses
        some lag). ``attrs``: lags, jobs (heads that share a job, in words), config, cost."""
        lags = self._lags(lags)
        if lags in self._heads:
            return self._heads[lags]
        frame = self._attention_roles(lags).copy()
        patching = self.path_patching(lags)
        causal, carries = _credit(patching, self.config)
        if causal:
            frame = assign_roles(frame.drop(columns=["role", "shared_with", "evidence"]), self.config, causal)
        frame["carries"] = [carries.get((int(r.layer), int(r.head)), "not patched") for r in frame.itertuples()]
        frame.attrs.update(lags=lags, jobs=_jobs(frame, patching), config=self.config.describe(), cost=self.cost)
        self._heads[lags] = frame
        return frame

    def path_patching(self, lags: tuple[int, ...] | None = None) -> pd.DataFrame:
        """Exact patching of the heads that may carry each lag, ranked by attribution patching (``causal.py``):
        one row per patched head or group, with its side, KL to the clean prediction, the induction heads'
        attention on the matching keys (key side), its ``share`` and its attribution estimate. Empty for
        ``IHTransformer`` (its parts are replaced directly) and when no lag is used or no head is an induction
        head."""
        lags = self._lags(lags)
        if lags in self._patching:
            return self._patching[lags]
        frame = self._attention_roles(lags)
        induction = [(int(r.layer), int(r.head)) for r in frame.itertuples() if r.role == "induction"]
        columns = ["heads", "side", "kl", "kl_stderr", "matching_attention", "share", "attribution", "offsets"]
        if self.adapter.parts is not None or not self.behaviour.used_lags or not induction:
            result = pd.DataFrame(columns=columns)
            self._patching[lags] = result
            return result
        layer_q = self.query_site[0]
        runs_lags, runs = self._lag_runs
        corrupted_z = {
            s: {layer: z[runs_lags.index(s)] for layer, z in runs.z.items()} for s in lags if s > 1 and s in runs_lags
        }
        attribution = attribute(self.adapter, self.tokens, self.clean, corrupted_z, self.meter)
        first_induction = min(layer for layer, _ in induction)
        match = history_matches(
            self.tokens, lags, torch.tensor([self.row], device=self.tokens.device), self.adapter.value_offset
        )[:, 0]
        tables = []
        before = frame[frame["layer"] < first_induction]
        key_groups = self._groups(before, list(lags), attribution.key)
        if key_groups:
            table = key_side(self.adapter, self.tokens, self.clean, key_groups, induction, match, self.meter)
            table["attribution"] = [sum(attribution.key[h] for h in g) for g in key_groups]
            table["offsets"] = [lags] * len(table)
            tables.append(table)
        effects = dict(zip(self.behaviour.lags, self.behaviour.query_effect, strict=True))
        for s, by_layer in corrupted_z.items():
            groups = self._groups(frame[frame["layer"] < layer_q], [s - 1], attribution.query[s])
            if groups:
                table = query_side_patching(
                    self.adapter, self.tokens, self.clean, s, by_layer, effects[s], groups, self.meter
                )
                table["attribution"] = [sum(attribution.query[s][h] for h in g) for g in groups]
                table["offsets"] = [(s - 1,)] * len(table)
                tables.append(table)
        result = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
        self._patching[lags] = result
        return result

    def _groups(self, frame: pd.DataFrame, offsets: list[int], attribution: dict[Head, float]) -> list[list[Head]]:
        """Heads to patch: attention candidates at ``offsets`` (every head that lists the offset among its
        ``offsets``, alone and together when several do), the ``top_k`` by |attribution|, or every head
        (``exhaustive``)."""
        heads = [(int(r.layer), int(r.head)) for r in frame.itertuples()]
        if self.config.exhaustive:
            chosen = heads
        else:
            chosen = sorted(heads, key=lambda h: -abs(attribution.get(h, 0.0)))[: self.config.top_k]
        groups: list[list[Head]] = [[h] for h in chosen]
        for offset in offsets:
            mates = [(int(r.layer), int(r.head)) for r in frame.itertuples() if offset in r.offsets]
            groups += [[h] for h in mates if [h] not in groups]
            if len(mates) > 1:
                groups.append(mates)
        return groups

    def head_parents(self) -> pd.DataFrame:
        """Per induction head (on the found parents), the lags its matching uses: the total variation of its
        query-row attention when lag s is corrupted on the query side only, mean and stderr per lag; ``lags``
        are those above ``pattern_floor``, ``threshold`` x the largest and ``n_stderr`` standard errors."""
        lags_tested, runs = self._lag_runs
        frame = self.heads()
        induction = [(int(r.layer), int(r.head)) for r in frame.itertuples() if r.role == "induction"]
        config, records = self.config, []
        for layer, head in induction:
            if layer not in runs.patterns:
                continue
            clean_row = self.clean.patterns[layer][:, :, self.row]
            mean, stderr = pattern_shift(clean_row, runs.patterns[layer])
            effect, error = mean[:, head].tolist(), stderr[:, head].tolist()
            largest = max(effect)
            used = tuple(
                s
                for s, m, e in zip(lags_tested, effect, error, strict=True)
                if m > config.pattern_floor and m > config.threshold * largest and m > config.n_stderr * e
            )
            record = {"layer": layer, "head": head, "lags": ",".join(map(str, used)) or "none"}
            for s, m, e in zip(lags_tested, effect, error, strict=True):
                record[f"lag {s}"] = m
                record[f"lag {s} stderr"] = e
            records.append(record)
        result = pd.DataFrame(records, columns=["layer", "head", "lags"] if not records else None)
        result.attrs.update(config=config.describe(), cost=self.cost, site=self.query_site[1])
        return result

    # ------------------------------------------------------------------------------------- decomposition

    def decomposition(self, lags: tuple[int, ...] | None = None) -> DecompositionReport:
        """Is the model a generalized induction head on its parents? (``decomposition.py``): ``lags`` default to
        the found parents; the heads replaced are those ``heads(lags)`` names."""
        if lags is not None:
            lags = self.data.check_lags(lags, "lags", self.max_lag)
        return decompose(
            self.adapter, self.tokens, self.data, self.config, self.parents(), lags, self.heads, self.clean, self.meter
        )

    def head_patching(self, lag: int) -> pd.DataFrame:
        """Each head's ``hook_z`` at the query row patched from the clean run into the lag-corrupted run, all heads
        in batched forwards (one copy of the batch per head: about one forward per head)."""
        return head_patching_table(self.adapter, self.tokens, lag, self.config.seed, self.meter)

    def classifier(self, lags: tuple[int, ...] | None = None, layer: int | None = None) -> ClassifierReport:
        """The query row's attention on the keys matching its history over ``lags`` in ``layer`` (default last)."""
        lags = self._lags(lags)
        layer = self.adapter.n_layers - 1 if layer is None else self.adapter.check_layer(layer, "layer")
        return classifier_report(self.adapter, self.tokens, self.clean.patterns[layer], lags, layer)

    def __repr__(self) -> str:
        return (
            f"ProbeSession({self.adapter.name}, {self.tokens.shape[0]} x {self.tokens.shape[1]} tokens, "
            f"{self.config.describe()}; {self.cost})"
        )


def _parse(name: str) -> Head:
    layer, head = name[1:].split("H")
    return int(layer), int(head)


def _credit(
    patching: pd.DataFrame, config: ProbeConfig
) -> tuple[dict[Head, tuple[float, tuple[int, ...]]], dict[Head, str]]:
    """Each patched head's share and the offsets its patch tested: the largest of its own patches, and of the
    joint patches of heads sharing its job when its own patch moved the prediction significantly (KL above
    ``n_stderr`` standard errors): a head that writes nothing is not credited with its partners' effect."""
    significant = {
        _parse(r.heads) for r in patching.itertuples() if " + " not in r.heads and r.kl > config.n_stderr * r.kl_stderr
    }
    causal: dict[Head, tuple[float, tuple[int, ...]]] = {}
    carries: dict[Head, str] = {}
    for record in patching.itertuples():
        members = [_parse(name) for name in record.heads.split(" + ")]
        for key in members:
            if len(members) > 1 and key not in significant:
                continue
            if record.share > causal.get(key, (-math.inf,))[0]:
                causal[key] = (record.share, tuple(record.offsets))
                carries[key] = f"{record.side}: share {record.share:.2f} ({record.heads})"
    return causal, carries


def _jobs(frame: pd.DataFrame, patching: pd.DataFrame) -> list[str]:
    """Heads that share a copier job, in words: their offset, summed attention and what patching them moved."""
    lines = []
    copiers = frame[(frame["role"] == "copier") & (frame["shared_with"] != "")]
    for offset, group in copiers.groupby("offset"):
        names = " + ".join(head_name(int(r.layer), int(r.head)) for r in group.itertuples())
        masses = " + ".join(f"{score:.2f}" for score in group["copier_score"])
        line = f"{names}: offset {offset}, {masses} of their attention"
        joint = patching[patching["heads"] == names] if len(patching) else patching
        for record in joint.itertuples():
            line += f", {record.side} share {record.share:.2f}"
        lines.append(line)
    return lines
