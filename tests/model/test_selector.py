"""The selector (ih_circuits/model/selector.py, PAPER.md §2.2) against a loop over head subsets.

For every head subset S with |S| <= D (the empty one included) the feature of position i is
c_S * kron_{h in S} v_h(i), concatenated and normalised, so

    K(i, j) = sum_S c_S^2 prod_{h in S} <v_h(i), v_h(j)> / sum_S c_S^2.

The references enumerate the subsets from bit masks, pair them with c in the order IHConfig.subsets documents
("by size then lexicographically", checked in test_config.py), and loop over positions and heads.

Tolerance: float64. K sums at most 2^H = 16 products of at most H dot products of d = 3 terms, all of size
<= ~10; the loop and the module group these sums differently, so they agree to ~1e-15 relative. ATOL = 1e-12
leaves a wide margin; a wrong subset, coefficient or product moves K by far more than that."""

import itertools
import math

import pytest
import torch

import ih_circuits.model.selector as selector_module
from ih_circuits.memory import MemoryBudgetError, set_memory_limit
from ih_circuits.model.selector import Selector
from tests.model.helpers import tiny_config

ATOL = 1e-12


def subsets_by_mask(n_heads: int, max_degree: int) -> list[tuple[int, ...]]:
    subsets = [tuple(h for h in range(n_heads) if mask >> h & 1) for mask in range(2**n_heads)]
    return sorted((s for s in subsets if len(s) <= max_degree), key=lambda s: (len(s), s))


def make_selector(n_heads: int = 3, max_degree: int = 2, seed: int = 0, c: list[float] | None = None) -> Selector:
    """A float64 selector with distinct coefficients of both signs (so that every share differs)."""
    selector = Selector(tiny_config(n_heads=n_heads, max_degree=max_degree, dtype="float64"))
    n = len(selector.subsets)
    if c is None:
        generator = torch.Generator().manual_seed(seed)
        c = (torch.randn(n, generator=generator, dtype=torch.float64) + 0.1 * torch.arange(n)).tolist()
    with torch.no_grad():
        selector.c.copy_(torch.tensor(c, dtype=torch.float64))
    return selector


def random_features(batch: int, pos: int, n_heads: int, seed: int, d: int = 3) -> torch.Tensor:
    """Copier-like outputs, not normalised: the selector must not assume unit vectors."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, pos, n_heads, d, generator=generator, dtype=torch.float64)


def reference_kernel(queries: torch.Tensor, keys: torch.Tensor, c: list, n_heads: int, max_degree: int):
    """K(i, j) one position pair at a time; ``c`` may hold floats or 0-dim tensors (for autograd)."""
    subsets = subsets_by_mask(n_heads, max_degree)
    total = sum(c[index] ** 2 for index in range(len(subsets)))
    batch, n_queries, n_keys = queries.shape[0], queries.shape[1], keys.shape[1]
    rows = []
    for b in range(batch):
        for i in range(n_queries):
            for j in range(n_keys):
                value = 0.0
                for index, subset in enumerate(subsets):
                    product = 1.0
                    for h in subset:
                        product = product * sum(queries[b, i, h, e] * keys[b, j, h, e] for e in range(queries.shape[3]))
                    value = value + c[index] ** 2 * product
                rows.append(value / total)
    return torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in rows]).reshape(batch, n_queries, n_keys)


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "fast"])
@pytest.mark.parametrize(("n_heads", "max_degree"), [(3, 0), (3, 1), (3, 2), (3, 3), (4, 2)])
def test_kernel_equals_the_loop_over_subsets(n_heads, max_degree, dense):
    selector = make_selector(n_heads, max_degree, seed=n_heads + max_degree)
    assert selector.subsets == subsets_by_mask(n_heads, max_degree)
    queries, keys = random_features(2, 2, n_heads, seed=1), random_features(2, 5, n_heads, seed=2)
    got = selector(queries, keys, dense)
    assert got.shape == (2, 2, 5)
    expected = reference_kernel(queries, keys, selector.c.detach().tolist(), n_heads, max_degree)
    assert torch.allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("route", ["dense", "fast", "chunked"])
def test_kernel_gradients_equal_the_loops_gradients(route, monkeypatch):
    """d/dc and d/dfeatures of a random linear functional of K, on the dense stack, the one-shot sum and the
    chunked sum whose backward recomputes the products (forced by chunks of 2 of the 7 subsets)."""
    if route == "chunked":
        monkeypatch.setattr(selector_module, "items_per_chunk", lambda n_items, bytes_per_item: 2)
    selector = make_selector(3, 2, seed=3)
    queries = random_features(2, 3, 3, seed=3).requires_grad_()
    keys = random_features(2, 4, 3, seed=4).requires_grad_()
    weights = random_features(2, 3, 4, seed=5, d=1)[..., 0]
    (selector(queries, keys, route == "dense") * weights).sum().backward()

    c = selector.c.detach().clone().requires_grad_()
    q, k = queries.detach().clone().requires_grad_(), keys.detach().clone().requires_grad_()
    (reference_kernel(q, k, list(c), 3, 2) * weights).sum().backward()
    assert torch.allclose(selector.c.grad, c.grad, rtol=0, atol=ATOL)
    assert torch.allclose(queries.grad, q.grad, rtol=0, atol=ATOL)
    assert torch.allclose(keys.grad, k.grad, rtol=0, atol=ATOL)


def test_chunked_route_is_the_one_taken_when_chunks_are_small(monkeypatch):
    """Guards the gradient test above: with 2 subsets per chunk the fast path goes through ChunkedSubsetSum."""
    calls = []
    original = selector_module.ChunkedSubsetSum.apply
    monkeypatch.setattr(selector_module, "items_per_chunk", lambda n_items, bytes_per_item: 2)
    monkeypatch.setattr(selector_module.ChunkedSubsetSum, "apply", lambda *args: calls.append(1) or original(*args))
    features = random_features(1, 3, 3, seed=6)
    make_selector(3, 2, seed=6)(features, features, False)
    assert calls == [1]


def test_shares_are_squared_coefficients_over_their_sum():
    c = [0.3, -1.2, 0.0, 2.0, -0.5, 0.7, 1e-3]
    selector = make_selector(3, 2, c=c)
    total = sum(x * x for x in c)
    expected = torch.tensor([x * x / total for x in c], dtype=torch.float64)
    assert torch.allclose(selector.shares(), expected, rtol=0, atol=ATOL)
    coefficients = torch.tensor([x / math.sqrt(total) for x in c], dtype=torch.float64)
    assert torch.allclose(selector.coefficients(), coefficients, rtol=0, atol=ATOL)
    assert float(selector.shares().detach().sum()) == pytest.approx(1.0, abs=ATOL)


def test_shares_are_scale_invariant_even_where_c_squared_overflows():
    """c^2 overflows float64 beyond 1.3e154; the shares are the same as for c / 1e200, and finite."""
    c = [0.3, -1.2, 0.0, 2.0, -0.5, 0.7, 1e-3]
    huge = make_selector(3, 2, c=[x * 1e200 for x in c])
    small = make_selector(3, 2, c=c)
    assert torch.isfinite(huge.shares()).all() and torch.isfinite(huge.coefficients()).all()
    assert torch.allclose(huge.shares(), small.shares(), rtol=0, atol=ATOL)
    assert torch.allclose(huge.coefficients(), small.coefficients(), rtol=0, atol=ATOL)


def test_all_zero_coefficients_give_zero_shares_and_a_zero_kernel():
    selector = make_selector(3, 2, c=[0.0] * 7)
    assert torch.equal(selector.shares(), torch.zeros(7, dtype=torch.float64))
    features = random_features(1, 4, 3, seed=7)
    for dense in (True, False):
        assert torch.equal(selector(features, features, dense), torch.zeros(1, 4, 4, dtype=torch.float64))


def test_feature_map_is_the_concatenation_of_scaled_kronecker_products():
    """phi(i) = concat_S (c_S / ||c||) kron_{h in S} v_h(i), the first head of S the most significant index; its
    width is sum_S d^|S| = 1 + 3 * 3 + 3 * 9 = 37, and <phi(i), phi(j)> = K(i, j)."""
    selector = make_selector(3, 2, seed=8)
    features = random_features(2, 4, 3, seed=8)
    phi = selector.feature_map(features)
    assert phi.shape == (2, 4, 37)
    c = selector.c.detach().tolist()
    norm = math.sqrt(sum(x * x for x in c))
    for b in range(2):
        for i in range(4):
            expected = []
            for index, subset in enumerate(subsets_by_mask(3, 2)):
                for letters in itertools.product(range(3), repeat=len(subset)):
                    entry = c[index] / norm
                    for head, letter in zip(subset, letters, strict=True):
                        entry *= float(features[b, i, head, letter])
                    expected.append(entry)
            assert torch.allclose(phi[b, i], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=ATOL)
    inner = torch.einsum("bif,bjf->bij", phi, phi)
    assert torch.allclose(inner, reference_kernel(features, features, c, 3, 2), rtol=0, atol=ATOL)


def test_feature_map_that_would_not_fit_in_memory_is_refused_before_it_is_built():
    previous = set_memory_limit(1000)
    try:
        with pytest.raises(MemoryBudgetError, match="feature map of width 37 over 2 x 4 positions"):
            make_selector(3, 2).feature_map(random_features(2, 4, 3, seed=9))
    finally:
        set_memory_limit(previous)


def test_dense_hooks_hold_head_similarities_and_subset_products():
    """hook_head_similarity[b, h, i, j] = <v_h(i), v_h(j)> and hook_subset_similarity[b, S, i, j] the product of
    those over h in S (1 for the empty subset), computed here by loops."""
    selector = make_selector(3, 2, seed=10)
    seen = {}
    for name in ("hook_head_similarity", "hook_subset_similarity", "hook_kernel"):
        getattr(selector, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.detach()))
    queries, keys = random_features(2, 3, 3, seed=10), random_features(2, 4, 3, seed=11)
    kernel = selector(queries, keys, True)
    assert seen["hook_head_similarity"].shape == (2, 3, 3, 4)
    assert seen["hook_subset_similarity"].shape == (2, 7, 3, 4)
    assert torch.equal(seen["hook_kernel"], kernel)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                similarity = [float(queries[b, i, h] @ keys[b, j, h]) for h in range(3)]
                assert seen["hook_head_similarity"][b, :, i, j].tolist() == pytest.approx(similarity, abs=ATOL)
                for index, subset in enumerate(subsets_by_mask(3, 2)):
                    product = math.prod(similarity[h] for h in subset)
                    assert float(seen["hook_subset_similarity"][b, index, i, j]) == pytest.approx(product, abs=ATOL)


def test_all_weight_on_one_subset_gives_the_history_match_of_its_heads():
    """PAPER.md §4: with one-hot head outputs and c on S* alone, K(i, j) = 1 exactly when every head of S*
    copies the same token at i and j, else 0. Exact in any float format: products and sums of 0s and 1s."""
    generator = torch.Generator().manual_seed(12)
    letters = torch.randint(0, 3, (2, 6, 3), generator=generator)
    features = torch.nn.functional.one_hot(letters, 3).to(torch.float64)
    for index, chosen in enumerate(subsets_by_mask(3, 2)):
        c = [0.0] * 7
        c[index] = -0.25  # the sign and size of c_S do not matter
        kernel = make_selector(3, 2, c=c)(features, features, False).detach()
        for b in range(2):
            for i in range(6):
                for j in range(6):
                    match = all(letters[b, i, h] == letters[b, j, h] for h in chosen)
                    assert float(kernel[b, i, j]) == float(match), (chosen, b, i, j)


def test_max_degree_zero_keeps_only_the_empty_subset_a_constant_kernel():
    selector = make_selector(3, 0, c=[0.7])
    features = random_features(1, 3, 3, seed=13)
    assert selector.subsets == [()]
    assert torch.equal(selector(features, features, True), torch.ones(1, 3, 3, dtype=torch.float64))
