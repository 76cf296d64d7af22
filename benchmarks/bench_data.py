"""Sequences per second of NGramTask.sample against a naive per-token sampler, measured in one run.

Setting: d = 3, seq_len = 101, parents {1, 2}, alpha = 0.1 (the paper's task). The naive references draw
one categorical per token in Python, the way a straightforward implementation does: with torch
(``torch.distributions``, the package's own framework) and, for comparison, with NumPy's ``Generator``.
Run: ``.venv/bin/python benchmarks/bench_data.py [--batch 100000] [--naive 200]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ih_circuits import NGramTask

D, SEQ_LEN, PARENTS, ALPHA = 3, 101, (1, 2), 0.1


def naive_torch(n_sequences: int, seed: int) -> list[list[int]]:
    torch.manual_seed(seed)
    prior = torch.distributions.Dirichlet(torch.full((D,), ALPHA))
    sequences = []
    for _ in range(n_sequences):
        kernel = prior.sample((D ** len(PARENTS),))
        seq = [int(torch.randint(D, ())) for _ in range(max(PARENTS))]
        for t in range(max(PARENTS), SEQ_LEN):
            z = 0
            for lag in PARENTS:
                z = z * D + seq[t - lag]
            seq.append(int(torch.distributions.Categorical(probs=kernel[z]).sample()))
        sequences.append(seq)
    return sequences


def naive_numpy(n_sequences: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(n_sequences):
        kernel = rng.dirichlet([ALPHA] * D, size=D ** len(PARENTS))
        seq = [int(rng.integers(D)) for _ in range(max(PARENTS))]
        for t in range(max(PARENTS), SEQ_LEN):
            z = 0
            for lag in PARENTS:
                z = z * D + seq[t - lag]
            seq.append(int(rng.choice(D, p=kernel[z])))
        sequences.append(seq)
    return sequences


def rate(fn, n: int, repeats: int) -> float:
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        fn(n, r)
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100_000, help="sequences per vectorised call")
    parser.add_argument("--naive", type=int, default=200, help="sequences for each naive reference")
    args = parser.parse_args()
    task = NGramTask(vocab_size=D, parents=PARENTS, seq_len=SEQ_LEN, alpha=ALPHA)
    task.sample(1000, seed=0)
    fast = rate(lambda n, r: task.sample(n, seed=r), args.batch, repeats=3)
    slow_torch = rate(naive_torch, args.naive, repeats=1)
    slow_numpy = rate(naive_numpy, args.naive, repeats=1)
    print(f"threads: {torch.get_num_threads()}, batch {args.batch}")
    print(f"NGramTask.sample:         {fast:12,.0f} sequences/s")
    print(f"naive torch (per token):  {slow_torch:12,.0f} sequences/s   ratio {fast / slow_torch:8.0f}x")
    print(f"naive numpy (per token):  {slow_numpy:12,.0f} sequences/s   ratio {fast / slow_numpy:8.0f}x")


if __name__ == "__main__":
    main()
