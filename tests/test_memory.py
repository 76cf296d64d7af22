"""Memory budgets: large steps are estimated and refused before allocating; chunked work equals unchunked work."""

import subprocess
import sys
from itertools import combinations

import pytest
import torch

import ih_circuits as ih
from ih_circuits import memory
from ih_circuits.chain import stationary_window_law
from ih_circuits.model.selector import ChunkedSubsetSum, _weighted_products
from ih_circuits.predictors import _counts_by_cumsum, _counts_by_matches, history_codes, history_counts
from ih_circuits.task import NGramTask
from ih_circuits.theory import selection_scores
from ih_circuits.training import chunked_loss, objective_loss


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 KB, so every chunked loop takes many turns even on tiny inputs."""
    monkeypatch.setattr(memory, "CHUNK_BYTES", 4096)


@pytest.fixture
def limit():
    """Set a memory limit for one test and restore the previous setting."""
    previous = []

    def set_limit(value):
        previous.append(ih.set_memory_limit(value))

    yield set_limit
    ih.set_memory_limit(previous[0] if previous else None)


def test_parse_and_set_the_limit(monkeypatch, limit):
    assert memory.parse_bytes("2GB") == 2 * 10**9
    assert memory.parse_bytes("512 MiB") == 512 * 2**20
    assert memory.parse_bytes(1e6) == 10**6
    for bad in ("lots", "-1GB", 0, float("nan"), "2 parsecs"):
        with pytest.raises(ValueError, match="byte count"):
            memory.parse_bytes(bad)
    monkeypatch.setenv(memory.ENVIRONMENT_VARIABLE, "3GB")
    assert ih.memory_limit() == 3 * 10**9
    limit("1GB")
    assert ih.memory_limit() == 10**9  # an explicit setting wins over the environment
    monkeypatch.delenv(memory.ENVIRONMENT_VARIABLE)
    ih.set_memory_limit(None)
    assert ih.memory_limit() == int(memory.DEFAULT_FRACTION * memory.machine_memory())


def test_sampling_a_huge_kernel_table_is_refused_before_allocating(limit):
    """Vocabulary 1000 with one parent: 2048 kernels of 1000 x 1000 floats = 8.2 GB for the table alone."""
    limit("4GB")
    task = NGramTask(vocab_size=1000, parents=(1,), seq_len=101)
    with pytest.raises(ih.MemoryBudgetError, match=r"sampling 2048 kernels of 1000 rows x 1000 tokens.*batch_size"):
        task.sample(2048, seed=0)
    assert task.sample(2, seed=0).tokens.shape == (2, 101)  # a small batch of the same task is fine


def test_limit_names_what_to_change(limit):
    limit("1MB")
    with pytest.raises(ValueError, match=r"above the memory limit of 1\.0 MB; lower vocab_size or window"):
        selection_scores(10, (1, 2), n_kernels=10, window=3)
    model = ih.IHTransformer(ih.IHConfig(d_vocab=3, n_ctx=101, n_heads=3, window=3, max_degree=2))
    with pytest.raises(ValueError, match="lower the batch size or the sequence length, or hook fewer layers"):
        model.run_with_cache(torch.zeros(64, 101, dtype=torch.long))


@pytest.mark.parametrize(
    ("names", "maps"),
    [(None, 19), ("blocks.0.attn.hook_pattern", 6), ("blocks.0.mlp.hook_kernel", 11), ("blocks.1.attn.hook_z", 6)],
)
def test_a_hooked_forward_estimates_its_dense_maps_first(limit, names, maps):
    """n_ctx 4000 at batch 64: each [batch, pos, pos] float32 map is 4.1 GB; a cache keeps every one that its
    hooked layers build (layer 1: 2 per head; the selector: a similarity per head, the kernel and, when hooked,
    one per subset; layer 2: 2). Refused before anything is allocated; the unhooked forward needs no such map."""
    limit("4GB")
    model = ih.IHTransformer(ih.IHConfig(d_vocab=3, n_ctx=4000, n_heads=3, window=3, max_degree=2))
    tokens = torch.zeros(64, 4000, dtype=torch.long)
    needed = maps * 64 * 4000**2 * 4 / 1e9
    refusal = rf"builds {maps} \[batch, pos, pos\] maps and needs about {needed:.1f}"
    with pytest.raises(ih.MemoryBudgetError, match=refusal):
        model.run_with_cache(tokens, names_filter=names)
    assert model(tokens[:, :200], return_type="loss").isfinite()


def test_sampling_long_sequences_counts_the_tokens(limit):
    """10^7 positions x 64 sequences: the uniforms, the rolled int8 tokens and the int64 result (9 GB)."""
    limit("4GB")
    with pytest.raises(ih.MemoryBudgetError, match=r"64 sequences of 10000000 tokens needs about 9\.0 GB.*seq_len"):
        NGramTask(3, (1,), 10**7).sample(64, seed=0)


def test_exact_theory_at_a_large_window_is_refused():
    """Vocabulary 50, window 5: 50^6 = 1.6e10 windows per kernel (125 GB in float64). ``method="auto"`` samples
    instead (tests/test_theory.py); asking for the enumeration is refused before anything is allocated."""
    with pytest.raises(ih.MemoryBudgetError, match=r"50\^6 = 15625000000 windows"):
        selection_scores(50, (1, 2), window=5, method="exact")


def test_chunked_theory_equals_one_batch(small_chunks, monkeypatch):
    chunked = selection_scores(3, (1, 2), 0.3, n_kernels=40, window=3, seed=1)
    monkeypatch.setattr(memory, "CHUNK_BYTES", 2**40)
    whole = selection_scores(3, (1, 2), 0.3, n_kernels=40, window=3, seed=1)
    for subset, value in whole.modified.items():
        # float64 sums in another order: measured relative difference 3e-16 (abs for the empty set's exact 0).
        assert chunked.modified[subset] == pytest.approx(value, rel=1e-12, abs=1e-15)
        assert chunked.chi2[subset] == pytest.approx(whole.chi2[subset], rel=1e-12, abs=1e-15)


def test_chunked_stationary_law_equals_one_batch(small_chunks, monkeypatch):
    kernels = ih.DirichletPrior(0.5).sample_rows(9, 9, 3, torch.Generator().manual_seed(0), torch.float64)
    chunked = stationary_window_law(kernels, (1, 2), 3, 4)
    monkeypatch.setattr(memory, "CHUNK_BYTES", 2**40)
    # float64, same operations per kernel: measured bit-equal; 1e-14 allows reordered sums.
    torch.testing.assert_close(chunked, stationary_window_law(kernels, (1, 2), 3, 4), rtol=0, atol=1e-14)


@pytest.mark.parametrize(("d_vocab", "lags", "first"), [(3, (1, 2), None), (5, (1,), 1), (2, (), None), (4, (1, 3), 5)])
def test_both_ways_of_counting_histories_agree_exactly(d_vocab, lags, first):
    tokens = NGramTask(vocab_size=d_vocab, parents=(1, 2), seq_len=60, alpha=0.3).sample(16, seed=2).tokens
    codes = history_codes(tokens, lags, d_vocab)
    start = max(lags, default=0) if first is None else max(first, max(lags, default=0))
    n_codes = d_vocab ** len(lags) * d_vocab
    by_cumsum = _counts_by_cumsum(tokens, codes, d_vocab, n_codes, start)
    assert torch.equal(by_cumsum, _counts_by_matches(tokens, codes, d_vocab, n_codes, start))
    assert by_cumsum.sum() > 0  # not vacuous: some histories were counted


def test_history_counts_in_chunks_equal_one_batch(small_chunks, monkeypatch):
    tokens = NGramTask(vocab_size=4, parents=(1, 2), seq_len=50).sample(33, seed=0).tokens
    chunked = history_counts(tokens, (1, 2), 4)
    monkeypatch.setattr(memory, "CHUNK_BYTES", 2**40)
    assert torch.equal(chunked, history_counts(tokens, (1, 2), 4))


def test_chunked_subset_sum_matches_the_direct_sum_and_its_gradient():
    generator = torch.Generator().manual_seed(0)
    similarity = torch.rand(2, 4, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    shares = torch.rand(11, dtype=torch.float64, generator=generator, requires_grad=True)
    subsets = [s for size in range(3) for s in combinations(range(4), size)]
    assert torch.autograd.gradcheck(lambda g, w: ChunkedSubsetSum.apply(g, w, subsets, 3), (similarity, shares))
    # float64 defaults of assert_close (rtol 1e-7, atol 1e-7): the same products summed in another order.
    torch.testing.assert_close(
        ChunkedSubsetSum.apply(similarity, shares, subsets, 3), _weighted_products(similarity, shares, subsets)
    )


def test_model_loss_and_gradients_do_not_depend_on_the_chunking(small_chunks, monkeypatch):
    cfg = ih.IHConfig(d_vocab=3, n_ctx=30, n_heads=4, window=4, max_degree=4, dtype="float64", w_plus=2.0)
    tokens = NGramTask(vocab_size=3, parents=(1, 2), seq_len=30).sample(6, seed=0).tokens

    def loss_and_grads(model):
        loss = model(tokens, return_type="loss", loss_positions="all")
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    chunked = loss_and_grads(ih.IHTransformer(cfg))
    monkeypatch.setattr(memory, "CHUNK_BYTES", 2**40)
    whole = loss_and_grads(ih.IHTransformer(cfg))
    # float64 sums in another order: measured loss bit-equal, gradients within 3e-14 relative (4e-18 absolute).
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-12, atol=0)
    for a, b in zip(chunked[1], whole[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_evaluation_in_chunks_equals_one_batch(small_chunks, paper_task):
    model = ih.ideal_model(ih.IHConfig(d_vocab=3, n_ctx=101), lags=(1, 2))
    tokens = paper_task.sample(37, seed=0).tokens
    for objective in ("last", "all"):
        with torch.no_grad():
            whole = float(objective_loss(model, tokens, objective, "log"))
        # float32 means over chunks vs one batch: measured relative difference 3e-8 (last), 8e-8 (all).
        assert chunked_loss(model, tokens, objective) == pytest.approx(whole, rel=1e-6)


def peak_bytes_of(statements: str) -> int:
    """Run ``statements`` in a fresh Python and return its peak resident memory in bytes."""
    code = (
        f"import resource, ih_circuits as ih\n{statements}\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) * 1024  # Linux reports kilobytes


@pytest.mark.slow
@pytest.mark.parametrize(
    "statements",
    [
        # The case: vocab 20 needed 6.6 GB in the evaluation step (one-hot counts of 20^3 codes).
        "run = ih.train_preset('cwa', vocab_size=20, steps=2, quiet=True)",
        # 4096 selector subsets: products summed and differentiated in chunks (ChunkedSubsetSum).
        "run = ih.train_preset('cwa', n_heads=12, max_degree=12, steps=1, batch_size=256, eval_size=256, quiet=True)",
    ],
    ids=["vocabulary 20", "12 heads at degree 12"],
)
def test_large_configurations_train_under_2_gb(statements):
    peak = peak_bytes_of(f"{statements}\nassert run.finished and run.history['eval_loss'].notna().all()")
    # The budget (the vocab-20 case needed 6.6 GB before chunking); measured peaks 1.07 GB and 0.60 GB,
    # including the Python, torch and ih_circuits imports.
    assert peak < 2 * 10**9
