"""Wall time of find_parents + decomposition_test on a trained paper-size model (d=3, T=100, H=3, M=3, D=2).

The model is trained with the CWa preset first (not timed). Target: under 30 s on 2 CPU cores.
Run: ``.venv/bin/python benchmarks/bench_probes.py``.
"""

from __future__ import annotations

import time

import torch

from ih_circuits import train_preset
from ih_circuits.probes import decomposition_test, find_parents


def main() -> None:
    run = train_preset("cwa", seed=0, quiet=True)
    start = time.perf_counter()
    parents = find_parents(run.model, run.task)
    middle = time.perf_counter()
    decomposition = decomposition_test(run.model, run.task)
    end = time.perf_counter()
    print(f"threads: {torch.get_num_threads()}")
    print(parents)
    print(decomposition)
    print(
        f"find_parents {middle - start:.2f} s, decomposition_test {end - middle:.2f} s, "
        f"total {end - start:.2f} s (target < 30 s)"
    )


if __name__ == "__main__":
    main()
