"""Training speed: the CWa preset's time to select the parents, and steps/s at batch 9000 vs the dense reference.

1. Wall time of ``train_preset("cwa")`` until the selector share of the heads tied to lags {1, 2} exceeds
   0.99 (checked after every step).
2. SGD steps per second at batch 9000 (fresh data each step) with the model's fast path, and with the
   dense reference loss of ``bench_model.py`` in its place, measured in the same run.
Run: ``.venv/bin/python benchmarks/bench_train.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ih_circuits import IHConfig, IHTransformer, NGramTask
from ih_circuits.presets import train_preset

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import dense_reference_loss  # noqa: E402


class Reached(Exception):
    pass


def time_to_selection(seed: int) -> float:
    start = time.perf_counter()

    def check(run):
        if run.model.selector_shares()[(0, 1)] > 0.99:
            raise Reached

    try:
        train_preset("cwa", seed=seed, quiet=True, callback=check, record_every=1000)
    except Reached:
        pass
    return time.perf_counter() - start


def steps_per_second(loss_fn, steps: int = 10) -> float:
    task = NGramTask(vocab_size=3, parents=(1, 2), seq_len=101, alpha=0.1)
    model = IHTransformer(IHConfig())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    start = time.perf_counter()
    for step in range(steps):
        tokens = task.sample(9000, seed=step).tokens
        optimizer.zero_grad()
        loss_fn(model, tokens).backward()
        optimizer.step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    times = [time_to_selection(seed) for seed in range(3)]
    fast = steps_per_second(lambda m, t: m(t, return_type="loss", loss_positions="last"))
    dense = steps_per_second(dense_reference_loss)
    print(f"threads: {torch.get_num_threads()}")
    print(f"CWa preset, time to share > 0.99 on lags {{1,2}}: {', '.join(f'{t:.1f}s' for t in times)} (seeds 0-2)")
    print(
        f"steps/s at batch 9000 (sampling included): model {fast:.2f}, dense reference {dense:.2f}, "
        f"ratio {fast / dense:.1f}x"
    )


if __name__ == "__main__":
    main()
