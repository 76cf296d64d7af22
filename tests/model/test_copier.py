"""The copier (ih_circuits/model/copier.py, PAPER.md §2.1) against a loop over positions, heads and lags.

Position t is the query slot for token t+1, so lag s reads x_{t+1-s}; a lag before the start reads a zero vector
and is not renormalised away. Positional copier: v_h(t) = u / ||u||, u = sum_m softmax(w_h)[m] onehot(x_{t+1-s}).
Full copier: logits w_h[m] + W_QK[h, x_t, x_{t+1-s}] (a zero key before the start adds 0), values
onehot(x_j) @ W_V[h] (TransformerLens's x @ W_V convention), and LayerNorm(u) / sqrt(d).

Tolerance: float64 throughout. The loop and the module sum the same few (<= 10) terms of size <= 1 in a different
order, so they differ by a few ulps (~1e-16); ATOL = 1e-12 leaves a wide margin while any wrong lag, weight or
normalisation changes entries by more than 1e-3."""

import math

import pytest
import torch
import torch.nn.functional as F

from ih_circuits.model.copier import Copier, Lookup, all_windows, lag_windows, window_codes
from tests.model.helpers import random_tokens, tiny_config

ATOL = 1e-12
LAYOUTS = ["shared", "staggered"]
LAYER_NORM_EPS = 1e-5  # the LayerNorm's epsilon, torch.nn.LayerNorm's default


def config(copier: str = "positional", layout: str = "shared", **overrides):
    return tiny_config(copier=copier, layout=layout, dtype="float64", n_ctx=12, **overrides)


def randomized_copier(cfg, seed: int) -> Copier:
    """Random position logits (and token logits / value maps for the full copier), large enough to matter."""
    copier = Copier(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in copier.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return copier


def embed(tokens: torch.Tensor, d_vocab: int = 3) -> torch.Tensor:
    return F.one_hot(tokens, d_vocab).to(torch.float64)


def reference_copier(copier: Copier, tokens: torch.Tensor) -> torch.Tensor:
    """v_h(t) for every sequence, position and head, one scalar at a time from PAPER.md §2.1 and the docstring."""
    cfg = copier.cfg
    d, full = cfg.d_vocab, cfg.copier == "full"
    w = copier.w_pos.detach().tolist()
    qk = copier.W_QK.detach().tolist() if full else None
    wv = copier.W_V.detach().tolist() if full else None
    out = torch.zeros(*tokens.shape, cfg.n_heads, d, dtype=torch.float64)
    for b, seq in enumerate(tokens.tolist()):
        for t in range(len(seq)):
            for h in range(cfg.n_heads):
                lags = cfg.lag_table[h]
                logits = []
                for m, s in enumerate(lags):
                    key = t + 1 - s
                    token_part = qk[h][seq[t]][seq[key]] if full and key >= 0 else 0.0
                    logits.append(w[h][m] + token_part)
                top = max(logits)
                exps = [math.exp(logit - top) for logit in logits]
                weights = [e / sum(exps) for e in exps]
                u = [0.0] * d
                for m, s in enumerate(lags):
                    key = t + 1 - s
                    if key < 0:
                        continue  # before the start: a zero vector, its weight is simply lost
                    for f in range(d):
                        value = wv[h][seq[key]][f] if full else float(seq[key] == f)
                        u[f] += weights[m] * value
                if full:
                    mean = sum(u) / d
                    centred = [x - mean for x in u]
                    variance = sum(x * x for x in centred) / d
                    v = [x / math.sqrt(variance + LAYER_NORM_EPS) / math.sqrt(d) for x in centred]
                else:
                    norm = math.sqrt(sum(x * x for x in u))
                    v = [x / norm if norm > 0 else 0.0 for x in u]
                out[b, t, h] = torch.tensor(v, dtype=torch.float64)
    return out


def captured(hook_point) -> list:
    """Record what passes through a hook point."""
    seen = []
    hook_point.register_forward_hook(lambda module, inputs, output: seen.append(output.detach().clone()))
    return seen


@pytest.mark.parametrize("dense", [False, True], ids=["fast", "dense"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["positional", "full"])
def test_copier_equals_the_loop_over_positions_heads_and_lags(kind, layout, dense):
    copier = randomized_copier(config(kind, layout), seed=1)
    tokens = random_tokens(3, 9, seed=1)
    got = copier(embed(tokens), dense)
    assert got.shape == (3, 9, 3, 3) and got.dtype == torch.float64
    assert torch.allclose(got, reference_copier(copier, tokens), rtol=0, atol=ATOL)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["positional", "full"])
def test_window_features_equal_the_loop_at_the_last_position_of_each_window(kind, layout):
    """window_features reads only the lag windows: for a sequence of max_lag tokens, the window of its last
    position is the whole sequence, so the loop's output there is the window's feature."""
    copier = randomized_copier(config(kind, layout), seed=2)
    tokens = random_tokens(5, copier.cfg.max_lag, seed=2)
    windows = lag_windows(embed(tokens), copier.cfg.max_lag)[:, -1:]
    expected = reference_copier(copier, tokens)[:, -1:]
    assert torch.allclose(copier.window_features(windows), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("dense", [False, True], ids=["fast", "dense"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_sharp_positional_head_copies_exactly_its_lag_and_nothing_before_the_start(layout, dense):
    """With one lag logit at 1e4 the softmax is exactly one-hot in float64 (exp(-1e4) = 0): head h then outputs
    exactly onehot(x_{t+1-s}) for its lag s, and exactly zero while t+1-s < 0 (PAPER.md §2.1)."""
    cfg = config(layout=layout)
    tokens = random_tokens(2, 10, seed=3)
    for slot in range(cfg.window):
        copier = Copier(cfg)
        with torch.no_grad():
            copier.w_pos.zero_()
            copier.w_pos[:, slot] = 1e4
        got = copier(embed(tokens), dense)
        for head in range(cfg.n_heads):
            lag = cfg.lag_table[head][slot]
            for t in range(10):
                expected = embed(tokens[:, t + 1 - lag]) if t + 1 - lag >= 0 else torch.zeros(2, 3, dtype=torch.float64)
                assert torch.equal(got[:, t, head], expected), (head, lag, t)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_sharp_full_head_copies_its_lag_through_the_value_map_and_layer_norm(layout):
    """The full copier with a dominant lag logit: its output is LayerNorm(onehot(x_{t+1-s}) @ W_V) / sqrt(d), with
    the identity W_V of the initialisation its largest entry is the copied token, and before the start it is 0."""
    cfg = config("full", layout)
    copier = Copier(cfg)
    with torch.no_grad():
        copier.w_pos.zero_()
        copier.w_pos[:, 1] = 1e4  # the token logits are ~0.02: negligible next to 1e4
    tokens = random_tokens(2, 10, seed=4)
    got = copier(embed(tokens), False)
    d = cfg.d_vocab
    # LayerNorm of a one-hot e: (e - 1/d) / sqrt(var + eps) / sqrt(d) with var = (d - 1) / d^2.
    scale = 1 / math.sqrt((d - 1) / d**2 + LAYER_NORM_EPS) / math.sqrt(d)
    for head in range(cfg.n_heads):
        lag = cfg.lag_table[head][1]
        for t in range(10):
            if t + 1 - lag < 0:
                assert torch.equal(got[:, t, head], torch.zeros(2, d, dtype=torch.float64))
            else:
                expected = (embed(tokens[:, t + 1 - lag]) - 1 / d) * scale
                assert torch.allclose(got[:, t, head], expected, rtol=0, atol=ATOL)


def test_initial_weights_favour_lag_h_for_head_h():
    """PAPER.md §3: head h (1-based) starts at w_plus on lag h, w_minus elsewhere; in the shared layout a head
    beyond the window has no such lag and starts uniform."""
    for layout in LAYOUTS:
        cfg = config(layout=layout, n_heads=4, max_degree=2, w_plus=2.5, w_minus=-0.5)
        weights = Copier(cfg).weights()
        assert weights.shape == (4, 3)
        for head in range(4):
            logits = [2.5 if lag == head + 1 else -0.5 for lag in cfg.lag_table[head]]
            expected = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
            assert torch.allclose(weights[head], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=ATOL)
        if layout == "shared":
            assert torch.allclose(weights[3], torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=ATOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_positional_pattern_is_the_lag_weight_at_every_position_of_every_sequence(layout):
    """hook_pattern[b, h, t, j] = softmax(w_h)[m] where j = t+1-s_{h,m}, 0 elsewhere: the same for every sequence
    (the positional copier's logits do not depend on the tokens); a row loses the weight of lags before the start."""
    copier = randomized_copier(config(layout=layout), seed=5)
    pattern = captured(copier.hook_pattern)
    tokens = random_tokens(4, 8, seed=5)
    copier(embed(tokens), True)
    (got,) = pattern
    assert got.shape == (4, 3, 8, 8)
    w = copier.w_pos.detach().tolist()
    expected = torch.zeros(3, 8, 8, dtype=torch.float64)
    for h in range(3):
        total = sum(math.exp(x) for x in w[h])
        for t in range(8):
            for m, s in enumerate(copier.cfg.lag_table[h]):
                if t + 1 - s >= 0:
                    expected[h, t, t + 1 - s] = math.exp(w[h][m]) / total
    for b in range(4):
        assert torch.allclose(got[b], expected, rtol=0, atol=ATOL), b


def test_full_pattern_depends_on_the_tokens():
    """The contrast: the full copier's token logits make two different sequences attend differently."""
    copier = randomized_copier(config("full"), seed=6)
    pattern = captured(copier.hook_pattern)
    copier(embed(torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])), True)
    (got,) = pattern
    assert (got[0] - got[1]).abs().max() > 1e-2


@pytest.mark.parametrize("dense", [False, True], ids=["fast", "dense"])
@pytest.mark.parametrize("kind", ["positional", "full"])
def test_each_sequence_is_copied_independently_of_the_rest_of_the_batch(kind, dense):
    """A sequence's copies are the same alone, in a batch, or in a shuffled batch. The batched and single
    contractions may group the same float64 sums differently: 1e-14 instead of equality."""
    copier = randomized_copier(config(kind), seed=7)
    tokens = random_tokens(4, 8, seed=7)
    batched = copier(embed(tokens), dense)
    order = torch.tensor([2, 0, 3, 1])
    assert torch.allclose(copier(embed(tokens[order]), dense), batched[order], rtol=0, atol=1e-14)
    for b in range(4):
        assert torch.allclose(copier(embed(tokens[b : b + 1]), dense)[0], batched[b], rtol=0, atol=1e-14)


def test_hook_shapes_and_parameters_follow_the_config():
    cfg = config("full", "staggered", n_heads=2, window=4, max_degree=1)
    copier = randomized_copier(cfg, seed=8)
    shapes = {}
    for name in ("hook_attn_scores", "hook_pattern", "hook_v", "hook_z", "hook_result"):
        getattr(copier, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    copier(embed(random_tokens(3, 7, seed=8)), True)
    assert shapes == {
        "hook_attn_scores": (3, 2, 7, 7),
        "hook_pattern": (3, 2, 7, 7),
        "hook_v": (3, 7, 2, 3),
        "hook_z": (3, 7, 2, 3),
        "hook_result": (3, 7, 2, 3),
    }
    assert {n: tuple(p.shape) for n, p in copier.named_parameters()} == {
        "w_pos": (2, 4),
        "W_QK": (2, 3, 3),
        "W_V": (2, 3, 3),
    }
    assert [n for n, _ in Copier(config()).named_parameters()] == ["w_pos"]


def test_lag_windows_hold_the_token_at_each_lag_and_zeros_before_the_start():
    tokens = random_tokens(2, 6, seed=9)
    windows = lag_windows(embed(tokens), 4)
    assert windows.shape == (2, 6, 4, 3)
    for b, seq in enumerate(tokens.tolist()):
        for t in range(6):
            for s in range(1, 5):
                expected = [float(t + 1 - s >= 0 and seq[t + 1 - s] == e) for e in range(3)]
                assert windows[b, t, s - 1].tolist() == expected, (b, t, s)


def test_window_codes_are_base_d_plus_1_numbers_of_the_lag_windows():
    """code(t) = sum_m x_{t-m} (d+1)^m over m = 0..max_lag-1, the symbol d standing for "before the start"; and
    all_windows(code) is that window as embedded tokens."""
    d, max_lag = 3, 3
    tokens = random_tokens(3, 9, seed=10)
    codes = window_codes(tokens, max_lag, d)
    table = all_windows(max_lag, d, torch.float64, "cpu")
    assert table.shape == ((d + 1) ** max_lag, 1, max_lag, d)
    windows = lag_windows(embed(tokens), max_lag)
    for b, seq in enumerate(tokens.tolist()):
        for t in range(9):
            digits = [seq[t - m] if t - m >= 0 else d for m in range(max_lag)]
            assert codes[b, t] == sum(x * (d + 1) ** m for m, x in enumerate(digits))
            assert torch.equal(table[codes[b, t], 0], windows[b, t])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_similarity_table_at_token_codes_is_the_head_similarity_of_the_loop(layout):
    """G_h(row, j) = <v_h(row), v_h(j)> is read from similarity_table() at token_codes(tokens, row)."""
    cfg = config(layout=layout, n_heads=2, window=2, max_degree=1)  # max_lag <= 3: token codes apply
    copier = randomized_copier(cfg, seed=11)
    assert copier.supports_token_codes
    assert not Copier(config("full")).supports_token_codes
    tokens = random_tokens(3, 10, seed=11)
    features = reference_copier(copier, tokens)
    flat_table = copier.similarity_table().detach().reshape(-1, cfg.n_heads)
    for row in (0, 1, 5, 9):
        got = flat_table[copier.token_codes(tokens, row)]  # [batch, key, head]
        for b in range(3):
            for j in range(10):
                for h in range(cfg.n_heads):
                    expected = float(features[b, row, h] @ features[b, j, h])
                    assert abs(float(got[b, j, h]) - expected) < ATOL, (row, b, j, h)


def test_lookup_gathers_rows_and_sums_the_gradient_per_code():
    generator = torch.Generator().manual_seed(12)
    table = torch.randn(5, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    codes = torch.tensor([[0, 3, 3], [4, 0, 3]])
    upstream = torch.randn(2, 3, 2, generator=generator, dtype=torch.float64)
    out = Lookup.apply(table, codes)
    (out * upstream).sum().backward()
    expected_grad = torch.zeros(5, 2, dtype=torch.float64)
    for b in range(2):
        for k in range(3):
            assert torch.equal(out[b, k], table[codes[b, k]])
            expected_grad[codes[b, k]] += upstream[b, k]
    assert torch.allclose(table.grad, expected_grad, rtol=0, atol=ATOL)
