"""Cost and peak memory of forward+backward as the context T and the vocabulary d grow, for the last-position
and every-position objectives, against a plain dense every-position implementation measured in the same run.

Model: the paper's (H = 3, M = 3, D = 2, positional copier, random parameters). Every case runs in its own
forked process, so that each peak memory is its own (peak RSS of the process minus its RSS before the step),
and the parent never computes with torch (a fork after OpenMP threads have run can hang the child).
Prints, per case, the median of three timed steps (after one warm-up), the peak memory, the fitted exponent
of time in T, and the two targets of the scale work: every-position forward+backward at T = 100, batch 1000
against the dense implementation (median of interleaved pairs), the peak at T = 1000, batch 64, and the
peak of short CWa training runs at d = 20 and at T = 1000 (theory, Bayes baseline and evaluation included),
and the selection theory at d = 20 / window 5 and d = 50 / window 3.
Run: ``.venv/bin/python benchmarks/bench_scale.py [--quick] [--sections scans,targets,training,theory]``
(``make bench-scale``; about 5 minutes; ``--quick`` skips T = 2000 and d = 50).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_model import interleaved_timings, report

from ih_circuits import IHConfig, IHTransformer, NGramTask, train_preset
from ih_circuits.theory import selection_scores


def plain_dense_loss(model: IHTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Every-position NLL the straightforward way: per-head [T, T] copier patterns, per-head similarities
    [batch, T, T], their subset products, a masked softmax over the strict past, and the next-token one-hots."""
    cfg = model.config
    batch, n_pos = tokens.shape
    onehot = F.one_hot(tokens, cfg.d_vocab).to(model.copier.w_pos.dtype)
    w = model.copier.w_pos
    similarities = []
    for head in range(cfg.n_heads):
        logits = torch.full((n_pos, n_pos), float("-inf"), dtype=w.dtype)
        for m, lag in enumerate(cfg.lag_table[head]):
            rows = torch.arange(lag - 1, n_pos)
            logits[rows, rows + 1 - lag] = w[head, m]
        # Row t reads x_{t+1-s}; lags before the start read zeros (the row is normalised over the whole window).
        pattern = torch.exp(logits - torch.logsumexp(w[head], dim=0))
        copied = pattern @ onehot
        copied = copied / copied.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        similarities.append(copied @ copied.transpose(1, 2))
    kernel = torch.zeros(batch, n_pos, n_pos, dtype=w.dtype)
    for share, subset in zip(model.selector.shares(), cfg.subsets, strict=True):
        product = torch.ones_like(kernel)
        for head in subset:
            product = product * similarities[head]
        kernel = kernel + share * product
    positions = torch.arange(n_pos)
    past = positions[None, :] < positions[:, None]
    scores = (model.classifier.a * kernel).masked_fill(~past, float("-inf"))
    attention = torch.softmax(scores[:, 1:], dim=-1)  # row 0 has no keys (uniform); it predicts no target here
    following = F.pad(onehot[:, 1:], (0, 0, 0, 1))
    probs = attention @ following
    probs = (1 - cfg.prob_floor) * probs + cfg.prob_floor / cfg.d_vocab
    # Rows 1..T-2 predict tokens 2..T-1; row 0 (uniform) predicts token 1.
    nll = -probs[:, :-1].gather(-1, tokens[:, 2:, None]).log().sum() + math.log(cfg.d_vocab) * batch
    return nll / (batch * (n_pos - 1))


def setup(d_vocab: int, n_pos: int, batch: int) -> tuple[IHTransformer, torch.Tensor]:
    model = IHTransformer(IHConfig(d_vocab=d_vocab, n_ctx=n_pos, n_heads=3, window=3, max_degree=2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    tokens = NGramTask(vocab_size=d_vocab, parents=(1, 2), seq_len=n_pos, alpha=0.3).sample(batch, seed=0).tokens
    return model, tokens


def step_function(kind: str, model: IHTransformer, tokens: torch.Tensor) -> Callable[[], torch.Tensor]:
    if kind == "dense":
        return lambda: plain_dense_loss(model, tokens)
    return lambda: model(tokens, return_type="loss", loss_positions=kind)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure(kind: str, d_vocab: int, n_pos: int, batch: int, queue: multiprocessing.Queue) -> None:
    """In a forked child: median seconds of three steps, and the peak memory of the first one."""
    torch.set_num_threads(torch.get_num_threads())
    model, tokens = setup(d_vocab, n_pos, batch)
    step = step_function(kind, model, tokens)
    before = rss_bytes()
    step().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(3):
        model.zero_grad()
        start = time.perf_counter()
        step().backward()
        times.append(time.perf_counter() - start)
    queue.put((statistics.median(times), peak))


def measure_pairs(d_vocab: int, n_pos: int, batch: int, queue: multiprocessing.Queue) -> None:
    """In a forked child: every-position forward+backward against the dense implementation, interleaved."""
    model, tokens = setup(d_vocab, n_pos, batch)
    ours = model(tokens, return_type="loss", loss_positions="all")
    reference = plain_dense_loss(model, tokens)
    if not torch.allclose(ours, reference, rtol=1e-4):
        raise SystemExit(f"losses differ: ours {ours.item()} dense {reference.item()}")
    times = interleaved_timings(step_function("all", model, tokens), step_function("dense", model, tokens), model, 5)
    report(f"every-position forward+backward, T = {n_pos - 1}, batch {batch}", *times)
    queue.put((statistics.median(times[0]), math.nan))


def measure_training(vocab_size: int, seq_len: int, steps: int, queue: multiprocessing.Queue) -> None:
    """In a forked child: a short CWa run (theory prediction, Bayes baseline, evaluation included)."""
    before = rss_bytes()
    start = time.perf_counter()
    train_preset("cwa", vocab_size=vocab_size, seq_len=seq_len, steps=steps, record_every=steps, quiet=True)
    queue.put((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before))


def measure_theory(vocab_size: int, window: int, queue: multiprocessing.Queue) -> None:
    """In a forked child: the selection theory with its defaults (Monte Carlo at these sizes)."""
    before = rss_bytes()
    start = time.perf_counter()
    scores = selection_scores(vocab_size, (1, 2), 0.1, window=window)
    seconds = time.perf_counter() - start
    top = sorted(scores.modified, key=scores.modified.get, reverse=True)[:3]
    summary = ", ".join(f"{s}: {scores.modified[s]:.4g} +- {scores.modified_stderr[s]:.1g}" for s in top)
    print(f"  {scores.method}, {scores.n_kernels} kernels x {scores.n_samples} windows; top: {summary}")
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before))


def in_child(target: Callable[..., None], *args: int | str) -> tuple[float, float]:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    child.join()
    if child.exitcode != 0:
        return math.nan, math.nan
    return queue.get()


def exponent(sizes: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in seconds]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)


def scan(label: str, cases: list[tuple[int, int, int]], size_of: Callable[[tuple[int, int, int]], int]) -> None:
    print(f"\n{label}")
    print(f"{'d':>4} {'T':>5} {'batch':>6} | {'kind':>5} {'ms':>9} {'peak MB':>9} | dense/ours")
    results: dict[str, list[float]] = {"last": [], "all": [], "dense": []}
    for d_vocab, n_pos, batch in cases:
        for kind in ("last", "all", "dense"):
            results[kind].append(in_child(measure, kind, d_vocab, n_pos, batch))
            seconds, peak = results[kind][-1]
            ratio = results["dense"][-1][0] / results["all"][-1][0] if kind == "dense" else math.nan
            print(
                f"{d_vocab:>4} {n_pos:>5} {batch:>6} | {kind:>5} {seconds * 1e3:9.1f} {peak / 2**20:9.0f} | "
                + (f"{ratio:.1f}x (every-position)" if kind == "dense" else "")
            )
    sizes = [size_of(case) for case in cases]
    for kind, values in results.items():
        print(f"fitted exponent of time, {kind:>5}: {exponent(sizes, [t for t, _ in values]):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip T = 2000 and d = 50")
    parser.add_argument(
        "--sections", default="scans,targets,training,theory", help="comma-separated subset of the default"
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    print(f"threads: {torch.get_num_threads()}")
    if "scans" in sections:
        lengths = [100, 400, 1000] + ([] if args.quick else [2000])
        scan("T grows (d = 3, batch 32)", [(3, n_pos, 32) for n_pos in lengths], lambda case: case[1])
        vocabularies = [3, 10, 20] + ([] if args.quick else [50])
        scan("d grows (T = 100, batch 64)", [(d, 100, 64) for d in vocabularies], lambda case: case[0])
    if "targets" in sections:
        print("\ntargets")
        in_child(measure_pairs, 3, 101, 1000)
        seconds, peak = in_child(measure, "all", 3, 1000, 64)
        print(
            f"every-position forward+backward, T = 1000, batch 64: {seconds * 1e3:.0f} ms, peak {peak / 2**20:.0f} MB"
        )
    if "training" in sections:
        print("\ntraining")
        for vocab_size, seq_len, steps in ((20, 101, 5), (3, 1001, 5)):
            seconds, peak = in_child(measure_training, vocab_size, seq_len, steps)
            print(
                f"CWa, {steps} steps at d = {vocab_size}, seq_len {seq_len}: {seconds:.0f} s,"
                f" peak {peak / 2**20:.0f} MB"
            )
    if "theory" in sections:
        print("\ntheory (parents (1, 2), alpha 0.1, defaults)")
        for vocab_size, window in ((20, 5), (50, 3)):
            seconds, peak = in_child(measure_theory, vocab_size, window)
            print(f"d = {vocab_size}, window {window}: {seconds:.1f} s, peak {peak / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
