"""The classifier (ih_circuits/model/classifier.py, PAPER.md §2.3 and §4) against a loop over query rows and keys.

Row t (the query slot for token t+1) attends to the keys j < t with logit a K(t, j); key j offers the one-hot of
x_{j+1}; row 0 has no keys and predicts the uniform distribution; the output is log((1 - eps) p + eps / d). Every
route (``forward`` on a given K, dense or not; ``attend`` on feature inner products; ``from_window_row`` and
``from_window_blocks`` on a table of K over window codes) is compared with the same loop.

Tolerance: float64. Each probability is a ratio of sums of at most ~10 exponentials, computed by the loop and by
the module with different shifts and summation orders; they agree to a few ulps (~1e-15 relative, times |a K|
<= ~40 in the exponent). ATOL = 1e-12 on log-probabilities of size <= ~15 leaves a wide margin; a wrong key
set, value or scale moves them by 1e-3 or more."""

import math

import pytest
import torch
import torch.nn.functional as F

from ih_circuits.model.classifier import Classifier
from tests.model.helpers import random_tokens, tiny_config

ATOL = 1e-12
D = 3


def make_classifier(a: float, prob_floor: float = 1e-6, n_heads: int = 3) -> Classifier:
    classifier = Classifier(tiny_config(n_heads=n_heads, prob_floor=prob_floor, dtype="float64"))
    with torch.no_grad():
        classifier.a.fill_(a)
    return classifier


def embed(tokens: torch.Tensor) -> torch.Tensor:
    return F.one_hot(tokens, D).to(torch.float64)


def uniform_in(shape: tuple, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_probs(kernel_at, tokens: torch.Tensor, rows: list[int], a) -> list[list[list]]:
    """p[b][r][e] for query row t = rows[r]: softmax over keys j < t of a K(t, j), summed per next token x_{j+1}.

    ``kernel_at(b, r, j)`` and ``a`` may be floats or 0-dim tensors (then the result carries their gradient)."""
    out = []
    for b, seq in enumerate(tokens.tolist()):
        per_row = []
        for r, t in enumerate(rows):
            if t == 0:
                per_row.append([1.0 / D] * D)
                continue
            logits = [a * kernel_at(b, r, j) for j in range(t)]
            top = max(float(torch.as_tensor(logit).detach()) for logit in logits)
            weights = [torch.exp(torch.as_tensor(logit - top, dtype=torch.float64)) for logit in logits]
            total = sum(weights)
            per_row.append([sum(w for j, w in enumerate(weights) if seq[j + 1] == e) / total for e in range(D)])
        out.append(per_row)
    return out


def floored_log(probs: list, eps: float) -> torch.Tensor:
    """log((1 - eps) p + eps / d) as a [batch, row, d] tensor (keeps the gradient of tensor entries)."""
    entries = [
        [torch.stack([torch.as_tensor((1 - eps) * p + eps / D, dtype=torch.float64) for p in row]) for row in seq]
        for seq in probs
    ]
    return torch.stack([torch.stack(seq) for seq in entries]).log()


def frequencies_among_best_keys(kernel_at, tokens: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The a -> +inf limit: the frequency of each next token among the keys j < t of largest K(t, j)."""
    out = torch.zeros(tokens.shape[0], len(rows), D, dtype=torch.float64)
    for b, seq in enumerate(tokens.tolist()):
        for r, t in enumerate(rows):
            if t == 0:
                out[b, r] = 1.0 / D
                continue
            best = max(kernel_at(b, r, j) for j in range(t))
            chosen = [seq[j + 1] for j in range(t) if kernel_at(b, r, j) == best]
            out[b, r] = torch.tensor([chosen.count(e) / len(chosen) for e in range(D)], dtype=torch.float64)
    return out


def gih_closed_form(history: list[list[int]], tokens: torch.Tensor, a: float) -> torch.Tensor:
    """PAPER.md §4 at every row t with T' = t keys: p(e) = [e^a N(z*, e) + N(e) - N(z*, e)] / [e^a N(z*) + T' - N(z*)],
    counting keys j < t by their history z_j and next token x_{j+1}."""
    out = torch.zeros(*tokens.shape, D, dtype=torch.float64)
    for b, seq in enumerate(tokens.tolist()):
        for t in range(len(seq)):
            if t == 0:
                out[b, t] = 1.0 / D
                continue
            n_z = sum(history[b][j] == history[b][t] for j in range(t))
            for e in range(D):
                n_ze = sum(history[b][j] == history[b][t] and seq[j + 1] == e for j in range(t))
                n_e = sum(seq[j + 1] == e for j in range(t))
                out[b, t, e] = (math.exp(a) * n_ze + n_e - n_ze) / (math.exp(a) * n_z + t - n_z)
    return out


ROWS = {"every row": list(range(8)), "some rows": [0, 1, 4, 7], "query row": [6]}


@pytest.mark.parametrize("dense", [False, True], ids=["fast", "dense"])
@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
@pytest.mark.parametrize("a", [0.7, -3.0, 40.0])
def test_forward_equals_the_attention_loop(a, rows, dense):
    classifier = make_classifier(a)
    tokens = random_tokens(2, 8, seed=1)
    kernel = uniform_in((2, len(rows), 8), seed=1)
    got = classifier(kernel, embed(tokens), torch.tensor(rows), dense)
    assert got.shape == (2, len(rows), D)
    expected = floored_log(reference_probs(lambda b, r, j: float(kernel[b, r, j]), tokens, rows, a), 1e-6)
    assert torch.allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("prob_floor", [0.0, 0.2])
def test_probability_floor_mixes_in_the_uniform_distribution(prob_floor):
    """eps = 0 leaves log p itself (-inf for a token no key offers); eps = 0.2 gives log(0.8 p + 0.2 / 3)."""
    classifier = make_classifier(2.0, prob_floor=prob_floor)
    tokens = torch.tensor([[0, 1, 1, 1, 2, 1]])  # row 1 sees one key, which offers token 1: p = (0, 1, 0)
    kernel = uniform_in((1, 6, 6), seed=2)
    got = classifier(kernel, embed(tokens), torch.arange(6), False)
    expected = floored_log(reference_probs(lambda b, r, j: float(kernel[b, r, j]), tokens, list(range(6)), 2.0), 0.0)
    expected = torch.log((1 - prob_floor) * expected.exp() + prob_floor / D)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got[torch.isfinite(got)], expected[torch.isfinite(expected)], rtol=0, atol=ATOL)
    assert got[0, 1].tolist()[1] == pytest.approx(math.log(1 - prob_floor + prob_floor / D), abs=ATOL)
    assert torch.allclose(got[0, 0].exp(), torch.full((D,), 1 / D, dtype=torch.float64), rtol=0, atol=ATOL)


@pytest.mark.parametrize("dense", [False, True], ids=["fast", "dense"])
def test_forward_gradients_equal_the_loops_gradients(dense):
    classifier = make_classifier(1.5)
    tokens = random_tokens(2, 7, seed=3)
    kernel = uniform_in((2, 7, 7), seed=3).requires_grad_()
    weights = uniform_in((2, 7, D), seed=4)
    (classifier(kernel, embed(tokens), torch.arange(7), dense) * weights).sum().backward()

    a = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    k = kernel.detach().clone().requires_grad_()
    (
        floored_log(reference_probs(lambda b, r, j: k[b, r, j], tokens, list(range(7)), a), 1e-6) * weights
    ).sum().backward()
    assert torch.allclose(classifier.a.grad, a.grad, rtol=0, atol=ATOL)
    assert torch.allclose(kernel.grad, k.grad, rtol=0, atol=ATOL)


@pytest.mark.parametrize("a", [0.7, -3.0, 12.0])
def test_attend_equals_the_loop_on_feature_inner_products(a):
    """attend: K(t, j) = <phi(t), phi(j)>, every row; features wider and narrower than the vocabulary."""
    tokens = random_tokens(2, 8, seed=5)
    for width in (2, 5):
        classifier = make_classifier(a)
        features = uniform_in((2, 8, width), seed=5 + width).requires_grad_()
        weights = uniform_in((2, 8, D), seed=6)
        got = classifier.attend(features, embed(tokens))
        (got * weights).sum().backward()

        a_ref = torch.tensor(a, dtype=torch.float64, requires_grad=True)
        phi = features.detach().clone().requires_grad_()
        probs = reference_probs(lambda b, r, j, phi=phi: phi[b, r] @ phi[b, j], tokens, list(range(8)), a_ref)
        expected = floored_log(probs, 1e-6)
        (expected * weights).sum().backward()
        assert torch.allclose(got, expected, rtol=0, atol=ATOL), width
        assert torch.allclose(classifier.a.grad, a_ref.grad, rtol=0, atol=ATOL), width
        assert torch.allclose(features.grad, phi.grad, rtol=0, atol=ATOL), width


def window_inputs(seed: int, n_pos: int = 9, n_codes: int = 6):
    """A kernel table over window codes (a leaf that records its gradient), codes and tokens for 2 sequences."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.rand(n_codes, n_codes, generator=generator, dtype=torch.float64).requires_grad_()
    codes = torch.randint(0, n_codes, (2, n_pos), generator=generator)
    return table, codes, random_tokens(2, n_pos, seed=seed)


@pytest.mark.parametrize("row", [0, 1, 4, 7, 8])
@pytest.mark.parametrize("a", [0.7, -3.0, 40.0])
def test_from_window_row_equals_the_loop_and_its_gradient(a, row):
    """One query row, K(row, j) = table[code_row, code_j]; the table's gradient is summed per code pair."""
    table, codes, tokens = window_inputs(seed=7)
    classifier = make_classifier(a)
    got = classifier.from_window_row(table, codes, tokens, row)
    assert got.shape == (2, 1, D)
    a_ref = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    t_ref = table.detach().clone().requires_grad_()
    probs = reference_probs(lambda b, r, j: t_ref[codes[b, row], codes[b, j]], tokens, [row], a_ref)
    expected = floored_log(probs, 1e-6)
    assert torch.allclose(got, expected, rtol=0, atol=ATOL)
    if row >= 1:  # row 0 has no key: the uniform distribution, a constant
        weights = uniform_in((2, 1, D), seed=8)
        (got * weights).sum().backward()
        expected.mul(weights).sum().backward()
        assert torch.allclose(classifier.a.grad, a_ref.grad, rtol=0, atol=ATOL)
        assert torch.allclose(table.grad, t_ref.grad, rtol=0, atol=ATOL)


@pytest.mark.parametrize("block", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("a", [0.7, -3.0, 12.0])
def test_from_window_blocks_equals_the_loop_at_every_row_for_any_block_length(a, block):
    table, codes, tokens = window_inputs(seed=9)
    classifier = make_classifier(a)
    got = classifier.from_window_blocks(table, codes, embed(tokens), block)
    assert got.shape == (2, 9, D)
    weights = uniform_in((2, 9, D), seed=10)
    (got * weights).sum().backward()

    a_ref = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    t_ref = table.detach().clone().requires_grad_()
    probs = reference_probs(lambda b, r, j: t_ref[codes[b, r], codes[b, j]], tokens, list(range(9)), a_ref)
    expected = floored_log(probs, 1e-6)
    expected.mul(weights).sum().backward()
    assert torch.allclose(got, expected, rtol=0, atol=ATOL)
    assert torch.allclose(classifier.a.grad, a_ref.grad, rtol=0, atol=ATOL)
    assert torch.allclose(table.grad, t_ref.grad, rtol=0, atol=ATOL)


@pytest.mark.parametrize("a", [1.0, 4.0])
def test_a_history_match_kernel_gives_the_gih_closed_form(a):
    """PAPER.md §4: with K(t, j) = [z_t = z_j] (all weight on one subset of exact copiers) every route gives
    p(e) = [e^a N(z*, e) + N(e) - N(z*, e)] / [e^a N(z*) + T' - N(z*)], here counted directly (prob_floor = 0)."""
    generator = torch.Generator().manual_seed(11)
    history = torch.randint(0, 3, (2, 10), generator=generator)
    tokens = random_tokens(2, 10, seed=11)
    expected = gih_closed_form(history.tolist(), tokens, a)
    classifier = make_classifier(a, prob_floor=0.0)
    match = (history[:, :, None] == history[:, None, :]).to(torch.float64)
    identity = torch.eye(3, dtype=torch.float64)  # K over history codes
    routes = {
        "forward": classifier(match, embed(tokens), torch.arange(10), False),
        "attend": classifier.attend(F.one_hot(history, 3).to(torch.float64), embed(tokens)),
        "blocks": classifier.from_window_blocks(identity, history, embed(tokens), 4),
        "row": torch.cat([classifier.from_window_row(identity, history, tokens, t) for t in range(10)], dim=1),
    }
    for name, log_probs in routes.items():
        assert torch.allclose(log_probs.exp(), expected, rtol=0, atol=ATOL), name


@pytest.mark.parametrize("a", [1e4, 1e8])
def test_large_a_gives_the_frequency_among_the_best_matching_keys(a):
    """The a -> inf limit (the module has no separate limit, so a = 1e4 and 1e8 stand for it): the routes that
    shift each row by its largest present score (forward, attend, from_window_row) put all weight on the keys of
    largest K, exactly: K takes values in {0, 0.5, 1}, so a non-best key's weight is at most exp(-5e3) = 0 in
    float64 and the result is a ratio of small integers."""
    generator = torch.Generator().manual_seed(12)
    table = torch.randint(0, 3, (4, 4), generator=generator).to(torch.float64) / 2
    codes = torch.randint(0, 4, (2, 10), generator=generator)
    tokens = random_tokens(2, 10, seed=12)
    classifier = make_classifier(a, prob_floor=0.0)
    rows = list(range(10))
    expected = frequencies_among_best_keys(lambda b, r, j: float(table[codes[b, r], codes[b, j]]), tokens, rows)
    kernel = table[codes[:, :, None], codes[:, None, :]]
    forward = classifier(kernel, embed(tokens), torch.arange(10), False)
    assert torch.allclose(forward.exp(), expected, rtol=0, atol=ATOL)
    by_row = torch.cat([classifier.from_window_row(table, codes, tokens, t) for t in rows], dim=1)
    assert torch.allclose(by_row.exp(), expected, rtol=0, atol=ATOL)
    # attend needs K as an inner product: one-hot features of the codes give K = [c_t = c_j].
    one_hot = F.one_hot(codes, 4).to(torch.float64)
    match = frequencies_among_best_keys(lambda b, r, j: float(codes[b, r] == codes[b, j]), tokens, rows)
    assert torch.allclose(classifier.attend(one_hot, embed(tokens)).exp(), match, rtol=0, atol=ATOL)


def test_dense_head_slots_are_the_classifier_and_inert_heads():
    """With hooks TransformerLens sees H = 3 head slots: slot 0 is the classifier; slots 1-2 attend uniformly to
    the strict past with zero values and contribute nothing; row 0 has no keys (zero pattern, uniform output)."""
    a, n_pos = 2.0, 6
    classifier = make_classifier(a)
    seen = {}
    for name in ("hook_attn_scores", "hook_pattern", "hook_v", "hook_z"):
        getattr(classifier, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.detach()))
    tokens = random_tokens(2, n_pos, seed=13)
    kernel = uniform_in((2, n_pos, n_pos), seed=13)
    classifier(kernel, embed(tokens), torch.arange(n_pos), True)
    pattern, values, z = seen["hook_pattern"], seen["hook_v"], seen["hook_z"]
    assert seen["hook_attn_scores"].shape == pattern.shape == (2, 3, n_pos, n_pos)
    assert values.shape == z.shape == (2, n_pos, 3, D)
    probs = reference_probs(lambda b, r, j: float(kernel[b, r, j]), tokens, list(range(n_pos)), a)
    for b, seq in enumerate(tokens.tolist()):
        for t in range(n_pos):
            logits = [a * float(kernel[b, t, j]) for j in range(t)]
            total = sum(math.exp(x) for x in logits)
            for j in range(n_pos):
                attended = math.exp(logits[j]) / total if j < t else 0.0
                assert float(pattern[b, 0, t, j]) == pytest.approx(attended, abs=ATOL), (b, t, j)
                assert pattern[b, 1:, t, j].tolist() == pytest.approx([1 / t if j < t else 0.0] * 2, abs=ATOL)
                offered = [float(j + 1 < n_pos and seq[j + 1] == e) for e in range(D)]
                assert values[b, j].tolist() == [offered, [0.0] * D, [0.0] * D]
            assert z[b, t, 0].tolist() == pytest.approx([float(p) for p in probs[b][t]], abs=ATOL)
            assert z[b, t, 1:].tolist() == [[0.0] * D] * 2


def test_an_edit_of_an_inert_slot_reaches_the_output():
    """The output sums the slots' hook_z: halving slot 0 and writing half a one-hot of token 0 into slot 1 gives
    p_out = 0.5 p + 0.5 onehot(0) (prob_floor = 0 so that the mixture is exact)."""
    classifier = make_classifier(2.0, prob_floor=0.0)
    tokens = random_tokens(2, 6, seed=14)
    kernel = uniform_in((2, 6, 6), seed=14)

    def edit(module, inputs, z):
        z = z.clone()
        z[:, :, 0] *= 0.5
        z[:, :, 1] = 0.5 * F.one_hot(torch.tensor(0), D).to(z.dtype)
        return z

    classifier.hook_z.register_forward_hook(edit)
    got = classifier(kernel, embed(tokens), torch.arange(6), True).exp()
    probs = torch.tensor(reference_probs(lambda b, r, j: float(kernel[b, r, j]), tokens, list(range(6)), 2.0))
    expected = 0.5 * probs.to(torch.float64) + 0.5 * F.one_hot(torch.tensor(0), D).to(torch.float64)
    assert torch.allclose(got, expected, rtol=0, atol=ATOL)
