"""Naive loop references for tiny inputs: the definitions written out one position at a time."""

from __future__ import annotations

import math

import torch


def history(seq: list[int], position: int, lags: tuple[int, ...]) -> tuple[int, ...] | None:
    """(x_{p-s})_{s in lags}, or None when a lag reaches before the start."""
    if any(position - s < 0 for s in lags):
        return None
    return tuple(seq[position - s] for s in lags)


def bayes_loop(tokens: torch.Tensor, parents: tuple[int, ...], alpha: float, d: int) -> torch.Tensor:
    out = torch.zeros(*tokens.shape, d, dtype=torch.float64)
    for b, row in enumerate(tokens.tolist()):
        for t in range(len(row)):
            query = history(row + [None], t + 1, parents)
            counts = [0.0] * d
            if query is not None:
                for target in range(0, t + 1):
                    if history(row, target, parents) == query:
                        counts[row[target]] += 1
            total = sum(counts)
            out[b, t] = torch.tensor([(c + alpha) / (total + d * alpha) for c in counts])
    return out


def gih_loop(tokens: torch.Tensor, lags: tuple[int, ...], a: float, d: int) -> torch.Tensor:
    """Attention of the query (row t) over keys j < t with value x_{j+1}: logit a if histories match."""
    out = torch.zeros(*tokens.shape, d, dtype=torch.float64)
    for b, row in enumerate(tokens.tolist()):
        for t in range(len(row)):
            query = history(row + [None], t + 1, lags)
            targets = list(range(1, t + 1))
            if not targets:
                out[b, t] = 1.0 / d
                continue
            match = [query is not None and history(row, target, lags) == query for target in targets]
            if a == math.inf:
                chosen = [tg for tg, m in zip(targets, match, strict=True) if m] or targets
                weights = [1.0] * len(chosen)
            else:
                chosen = targets
                weights = [math.exp(a) if m else 1.0 for m in match]
            total = sum(weights)
            for tg, w in zip(chosen, weights, strict=True):
                out[b, t, row[tg]] += w / total
    return out


def modified_mi_single(joint: torch.Tensor) -> float:
    """I~ for one law mu(z, e) given as a [n_z, d] table: sum_z mu(z)^2 (sum_e mu(e|z)^2/mu(e) - 1)."""
    mu_z = joint.sum(1)
    mu_e = joint.sum(0)
    total = 0.0
    for z in range(joint.shape[0]):
        if mu_z[z] == 0:
            continue
        inner = sum((joint[z, e] / mu_z[z]) ** 2 / mu_e[e] for e in range(joint.shape[1]))
        total += float(mu_z[z] ** 2 * (inner - 1))
    return total
