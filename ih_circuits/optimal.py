"""The optimal selector: the lag-set shares that minimize the ideal model's population loss.

When the selector's degree D is below the number of parents, training spreads the selector's weight over several
lag sets (a mixture), which the argmax of I~ (``theory.task_prediction``) does not describe. This module computes
the mixture the paper's model should reach if training found the optimum: exact copiers, one head per lag
1..M of the window, and the selector's shares w_S over the lag sets S with |S| <= D, chosen (with the classifier
scale a) to minimize the paper's objective, the mean of -log p(x_T | x_{<T}) over sequences of the task:

    w* = argmin_{w in simplex} min_a E[-log p_{w, a}(x_T | x_{<T})].

The expectation over the last token is taken exactly, E[-log p(x_T)] = -sum_e pi(e | z*_T) log p(e | x_{<T}),
with each sequence's own kernel pi (``NGramTask.oracle_predictive``), so only the contexts are sampled. The
shares are w = softmax(theta) (all positive), and theta and log a follow Adam on Monte Carlo sequences of the
task; ``n_folds`` independent batches each give a solution, whose mean is the estimate and whose spread over
sqrt(n_folds) its standard error. The optimum depends on the task, the degree and the window only, and the
sequences are always drawn with ``seed``, so every seed of a sweep cell gets the same answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ih_circuits.checks import check_int, check_real
from ih_circuits.model import IHConfig, IHTransformer
from ih_circuits.seeds import derive_seed
from ih_circuits.task import NGramTask

STEPS, LEARNING_RATE, A_INIT = 200, 0.1, 5.0


@dataclass(frozen=True)
class OptimalSelector:
    """The optimal shares of the lag sets (``"1,2"`` -> share, summing to 1), their standard errors, the fitted
    classifier scale and the population loss (nats) the optimum reaches, each a mean over the folds."""

    shares: dict[str, float]
    stderr: dict[str, float]
    a: float
    loss: float

    def leading(self) -> str:
        """The lag set with the largest share."""
        return max(self.shares, key=self.shares.get)


def lag_set_text(lags: tuple[int, ...]) -> str:
    """``(1, 2)`` -> ``"1,2"``; ``()`` -> ``""``."""
    return ",".join(str(lag) for lag in lags)


def exact_copier_model(task: NGramTask, max_degree: int, window: int) -> IHTransformer:
    """The paper's model with one exact copier per lag 1..window (head h copies lag h + 1) and a selector of
    degree ``max_degree`` over those heads."""
    cfg = IHConfig(
        d_vocab=task.vocab_size,
        n_ctx=task.seq_len,
        n_heads=window,
        window=window,
        max_degree=min(max_degree, window),
        layout="shared",
    )
    model = IHTransformer(cfg)
    with torch.no_grad():
        model.copier.w_pos.zero_()
        model.copier.w_pos[torch.arange(window), torch.arange(window)] = 1e4
    return model


def optimal_shares(
    task: NGramTask,
    max_degree: int,
    window: int | None = None,
    *,
    n_sequences: int = 1024,
    n_folds: int = 4,
    steps: int = STEPS,
    seed: int = 0,
) -> OptimalSelector:
    """The shares over lag sets of size <= ``max_degree`` inside 1..window (default: the task's window) that
    minimize the exact-copier model's last-position loss on ``task`` (module docstring).

    Args:
        task: the n-gram task (its prior draws every sequence's kernel).
        max_degree: the selector's degree D (>= 1).
        window: the lags the copiers read, 1..window (>= the task's order).
        n_sequences: Monte Carlo sequences in all, split into ``n_folds`` folds (>= 2) of at least 16.
        steps: Adam steps per fold.
        seed: the sequences' seed (fixed by default, so the answer is a function of the task).

    >>> result = optimal_shares(NGramTask(3, (1, 2), 40), max_degree=2, window=2, n_sequences=256, steps=60)
    >>> result.leading()
    '1,2'
    """
    check_int(max_degree, "max_degree", 1)
    window = task.window if window is None else check_int(window, "window", max(task.order, 1))
    check_int(n_folds, "n_folds", 2)
    check_int(n_sequences, "n_sequences", 16 * n_folds, low_text=f"16 x n_folds = {16 * n_folds}")
    check_int(steps, "steps", 1)
    model = exact_copier_model(task, max_degree, window)
    head_lags = model.head_lags()
    names = [lag_set_text(tuple(sorted(head_lags[h] for h in subset))) for subset in model.config.subsets]
    batch = task.sample(n_sequences, seed=derive_seed(seed, "optimal selector"))
    targets = task.oracle_predictive(batch)[:, -2]
    query = _QueryRow(model)
    folds = [
        _fold_optimum(query, tokens, target, steps)
        for tokens, target in zip(batch.tokens.chunk(n_folds), targets.chunk(n_folds), strict=True)
    ]
    shares = torch.stack([fold[0] for fold in folds])
    mean, stderr = shares.mean(0), shares.std(0) / math.sqrt(n_folds)
    return OptimalSelector(
        shares=dict(zip(names, mean.tolist(), strict=True)),
        stderr=dict(zip(names, stderr.tolist(), strict=True)),
        a=float(sum(fold[1] for fold in folds) / n_folds),
        loss=float(sum(fold[2] for fold in folds) / n_folds),
    )


class _QueryRow(nn.Module):
    """The model's query-row log-probabilities as a module's forward, for ``functional_call``."""

    def __init__(self, model: IHTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model.query_log_probs(tokens)


def _fold_optimum(query: _QueryRow, tokens: Tensor, target: Tensor, steps: int) -> tuple[Tensor, float, float]:
    """(shares, a, loss) minimizing -sum_e target(e) log p(e) at the query row over softmax logits and log a."""
    dtype = query.model.copier.w_pos.dtype
    logits = torch.zeros(len(query.model.config.subsets), dtype=dtype, requires_grad=True)
    log_a = torch.tensor(math.log(A_INIT), dtype=dtype, requires_grad=True)
    optimizer = torch.optim.Adam([logits, log_a], lr=LEARNING_RATE)
    target = target.to(dtype)

    def loss() -> Tensor:
        parameters = {"model.blocks.0.mlp.c": torch.softmax(logits, 0).sqrt(), "model.blocks.1.attn.a": log_a.exp()}
        return -(target * functional_call(query, parameters, (tokens,))).sum(-1).mean()

    for _ in range(steps):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        return torch.softmax(logits, 0), float(log_a.exp()), float(loss())


def share_distance(first: dict[str, float], second: dict[str, float]) -> float:
    """Total-variation distance between two share tables: half the sum of |difference| over every lag set."""
    keys = set(first) | set(second)
    for name, table in (("first", first), ("second", second)):
        for key in table:
            check_real(table[key], f"{name}[{key!r}]", 0.0)
    return 0.5 * sum(abs(first.get(k, 0.0) - second.get(k, 0.0)) for k in keys)
