"""Cost of the probes on a model researchers bring: a GPT-2-small-shaped TransformerBridge (12 layers x 12 heads,
d_model 768, vocabulary 50257, random weights) on 8 repeated-token sequences of 128 tokens.

Prints, for ``find_parents`` + ``scan_heads`` + ``decomposition_test`` called in a row (as a user would), the cost
in forwards of the batch (the session's meter, and an independent count of the rows every block ran, read from a
hook on each block's input) and the peak memory they add, against one plain forward of the same batch measured
in the same run. Each measurement runs in a fresh forked child, its peak resident memory reset after the model is
built (Linux: /proc/self/clear_refs), so the added peak counts only the work measured. Targets:
<= 12 forwards and <= 2x one forward's added peak; a line starting with FAIL says which is missed.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from ih_circuits import RepeatedTokens
from ih_circuits.probes import decomposition_test, find_parents, scan_heads

BATCH, SEQ_LEN = 8, 128
MAX_FORWARDS, MAX_PEAK_RATIO = 12, 2.0


def gpt2_small_shape() -> TransformerBridge:
    config = TransformerBridgeConfig(
        d_model=768,
        d_head=64,
        n_layers=12,
        n_heads=12,
        d_mlp=3072,
        d_vocab=50257,
        n_ctx=SEQ_LEN,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        seed=0,
    )
    return TransformerBridge.boot_native(config).eval()


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak() -> int:
    """Return the heap's unused pages to the system, reset the peak resident size (VmHWM) to the current one
    (Linux's /proc/self/clear_refs) and return it, so that the next peak counts only what comes after."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return status_bytes("VmRSS")


def in_child(work) -> tuple:
    """Run ``work(model, source, tokens)`` in a forked child after building the model; return (added peak bytes,
    seconds, result)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        model = gpt2_small_shape()
        source = RepeatedTokens(vocab_size=50257, seq_len=SEQ_LEN, min_period=8, max_period=48)
        tokens = source.sample(BATCH, seed=0)
        before = reset_peak()
        start = time.perf_counter()
        result = work(model, source, tokens)
        elapsed = time.perf_counter() - start
        os.write(write, repr((status_bytes("VmHWM") - before, elapsed, result)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    return eval(payload)  # noqa: S307 - our own child's repr of numbers and strings


def one_forward(model, source, tokens):
    with torch.no_grad():
        model(tokens)
    return None


def three_probes(model, source, tokens):
    rows = {"count": 0}

    def count(activation, hook):
        rows["count"] += activation.shape[0]

    for layer in range(model.cfg.n_layers):
        model.blocks[layer].hook_out.add_hook(count)
    parents = find_parents(model, source, n_sequences=BATCH)
    heads = scan_heads(model, source, n_sequences=BATCH)
    verdict = decomposition_test(model, source, n_sequences=BATCH)
    model.reset_hooks()
    counted = rows["count"] / (BATCH * model.cfg.n_layers)
    return (parents.lags, int((heads["role"] != "other").sum()), verdict.verdict, verdict.cost, counted)


def main() -> int:
    forward_peak, forward_time, _ = in_child(one_forward)
    probe_peak, probe_time, (lags, roles, verdict, cost, counted) = in_child(three_probes)
    metered = float(cost.split(" forwards")[0])
    ratio = probe_peak / max(forward_peak, 1)
    print(f"GPT-2-small shape, random weights, {BATCH} x {SEQ_LEN} tokens, {torch.get_num_threads()} threads")
    print(f"one forward: {forward_time:.2f} s, added peak {forward_peak / 1e6:.0f} MB")
    print(
        f"find_parents + scan_heads + decomposition_test: {probe_time:.2f} s "
        f"({probe_time / forward_time:.1f} forwards of wall time)"
    )
    print(f"  cost (session meter): {cost}")
    print(f"  blocks run, counted by hooks: {counted:.2f} forwards of the batch")
    print(f"  added peak {probe_peak / 1e6:.0f} MB = {ratio:.2f}x one forward's")
    print(f"  found lags {lags}, {roles} heads with a role, verdict {verdict!r}")
    failed = False
    if max(metered, counted) > MAX_FORWARDS:
        print(f"FAIL: {max(metered, counted):.2f} forwards > {MAX_FORWARDS}")
        failed = True
    if ratio > MAX_PEAK_RATIO:
        print(f"FAIL: peak {ratio:.2f}x one forward's > {MAX_PEAK_RATIO}x")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
