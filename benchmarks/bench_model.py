"""Forward+backward of the paper's objective at the paper's size, against a dense reference, in one run.

Size: batch 9000, T = 100 context tokens (+ target), d = 3, H = 3, M = 3, D = 2, positional copier,
last-position loss. The dense reference is the straightforward implementation: per-head (T+1)x(T+1)
position-logit matrices built with a Python loop over heads (and lags), softmax, a matrix product with
the one-hot tokens, then layer 2 at the query row only. Both compute the same function; the script
checks that the losses agree before timing. Timings alternate (ours, reference, ours, ...) so that both see
the same machine state, and the speed-up reported is the median of the per-pair ratios.
Run: ``.venv/bin/python benchmarks/bench_model.py [--batch 9000] [--pairs 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ih_circuits import IHConfig, IHTransformer, NGramTask


def dense_reference_loss(model: IHTransformer, tokens: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    context, target = tokens[:, :-1], tokens[:, -1]
    n_slots = context.shape[1] + 1  # x_0..x_{T-1} plus the empty query slot
    onehot = F.one_hot(context, cfg.d_vocab).to(model.copier.w_pos.dtype)
    onehot = F.pad(onehot, (0, 0, 0, 1))  # the query slot holds no token
    w = model.copier.w_pos
    features = []
    for head in range(cfg.n_heads):
        logits = torch.full((n_slots, n_slots), float("-inf"), dtype=w.dtype)
        for m, lag in enumerate(cfg.lag_table[head]):
            rows = torch.arange(lag, n_slots)
            logits[rows, rows - lag] = w[head, m]
        # Rows are normalised over the whole window: lags before the start read zeros (PAPER.md §2.1).
        pattern = torch.exp(logits - torch.logsumexp(w[head], dim=0))
        copied = pattern @ onehot
        features.append(copied / copied.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    query = [f[:, -1] for f in features]
    shares = model.selector.shares()
    kernel = torch.zeros(context.shape[0], n_slots - 2, dtype=w.dtype)
    for share, subset in zip(shares, cfg.subsets, strict=True):
        product = torch.ones_like(kernel)
        for head in subset:
            product = product * (features[head][:, 1:-1] * query[head][:, None]).sum(-1)
        kernel = kernel + share * product
    attention = torch.softmax(model.classifier.a * kernel, dim=-1)
    probs = torch.einsum("bk,bke->be", attention, onehot[:, 1:-1])
    probs = (1 - cfg.prob_floor) * probs + cfg.prob_floor / cfg.d_vocab
    return -probs.gather(1, target[:, None]).log().mean()


def interleaved_timings(
    ours: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor], model: torch.nn.Module, pairs: int
) -> tuple[list[float], list[float]]:
    """Seconds per forward+backward of each, alternating ours / reference for ``pairs`` pairs (after one warm-up)."""
    times: tuple[list[float], list[float]] = ([], [])
    for pair in range(pairs + 1):
        for loss_fn, record in ((ours, times[0]), (reference, times[1])):
            model.zero_grad()
            start = time.perf_counter()
            loss_fn().backward()
            if pair:
                record.append(time.perf_counter() - start)
    return times


def report(name: str, ours: list[float], reference: list[float]) -> None:
    ratios = [r / o for o, r in zip(ours, reference, strict=True)]
    print(
        f"{name}: ours {statistics.median(ours) * 1e3:8.1f} ms, reference {statistics.median(reference) * 1e3:8.1f} ms"
        f" (medians); speed-up {statistics.median(ratios):.1f}x (median of {len(ratios)} interleaved pairs,"
        f" range {min(ratios):.1f}-{max(ratios):.1f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=9000)
    parser.add_argument("--pairs", type=int, default=7)
    args = parser.parse_args()
    task = NGramTask(vocab_size=3, parents=(1, 2), seq_len=101, alpha=0.1)
    tokens = task.sample(args.batch, seed=0).tokens
    model = IHTransformer(IHConfig(d_vocab=3, n_ctx=101, n_heads=3, window=3, max_degree=2))
    ours = model(tokens, return_type="loss", loss_positions="last")
    reference = dense_reference_loss(model, tokens)
    if not torch.allclose(ours, reference, rtol=1e-4):
        raise SystemExit(f"losses differ: ours {ours.item()} reference {reference.item()}")
    print(f"threads: {torch.get_num_threads()}, batch {args.batch}, loss {ours.item():.5f} (both)")
    times = interleaved_timings(
        lambda: model(tokens, return_type="loss", loss_positions="last"),
        lambda: dense_reference_loss(model, tokens),
        model,
        args.pairs,
    )
    report("last-position forward+backward", *times)


if __name__ == "__main__":
    main()
