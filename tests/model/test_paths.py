"""Every route through the model (window-code table, fused attention, per-head kernel, query-row shortcuts,
hooked dense layers) against the fully dense hooked path: outputs and gradients to float precision."""

import math

import pytest
import torch

import ih_circuits.model.selector as selector_module
import ih_circuits.model.transformer as transformer_module
from ih_circuits import IHConfig, IHTransformer
from tests.model.helpers import identity_hooks, random_tokens, randomized, tiny_config

# float32 throughout: the routes sum the same terms in different orders, so outputs agree to a few ulps of
# log-probabilities of order 1-10 (measured differences are below 1e-6, at most 8.3e-7 over every route, config
# and objective; 1e-5 leaves a 10x margin).
ATOL = 1e-5

ROUTES = {
    "window table": {},
    "fused attention": {"MAX_WINDOW_CODES": 0},
    "per-head kernel": {"MAX_WINDOW_CODES": 0, "MAX_FEATURE_WIDTH": 0},
}
CONFIGS = [
    tiny_config(),
    tiny_config(copier="full"),
    tiny_config(layout="staggered", n_heads=2, window=3, max_degree=2),
    tiny_config(max_degree=3),
]


def loss_and_grads(model: IHTransformer, tokens: torch.Tensor, objective: str, hooks: list) -> tuple:
    model.zero_grad()
    with model.hooks(fwd_hooks=hooks):
        loss = model(tokens, return_type="loss", loss_positions=objective)
        loss.backward()
        log_probs = model(tokens).detach()
    return log_probs, loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.copier}-{c.layout}-D{c.max_degree}")
@pytest.mark.parametrize("objective", ["last", "all"])
def test_each_route_equals_the_dense_path(route, cfg, objective, monkeypatch):
    for name, value in ROUTES[route].items():
        monkeypatch.setattr(transformer_module, name, value)
    model = randomized(IHTransformer(cfg), seed=5)
    tokens = random_tokens(6, 24, seed=5)
    fast = loss_and_grads(model, tokens, objective, [])
    dense = loss_and_grads(model, tokens, objective, identity_hooks(model))
    assert torch.allclose(fast[0], dense[0], atol=ATOL)
    assert torch.allclose(fast[1], dense[1], atol=ATOL)
    for name, grad in fast[2].items():
        assert torch.isfinite(grad).all(), name
        assert torch.allclose(grad, dense[2][name], atol=ATOL), name


@pytest.mark.parametrize("a", [-20.0, 300.0, 1e4])
def test_window_routes_stay_exact_for_any_classifier_scale(a):
    """The query row's counts shift scores by the largest present one, so any a works there; the block route
    (fixed per-code shift) hands over to fused attention once a x (max K - min K) could underflow a weight.
    float64, so that a = 1e4 times K's rounding error stays far below the tolerance."""
    model = randomized(IHTransformer(tiny_config(dtype="float64")), seed=6)
    with torch.no_grad():
        model.classifier.a.fill_(a)
        table = model.window_kernel_table()
    tokens = random_tokens(4, 24, seed=6)
    spread = abs(a) * float((table.amax(-1) - table.amin(-1)).max())
    assert model.window_table_route(4, 24, "last") is not None
    half_exponent_range = -0.5 * math.log(torch.finfo(torch.float64).tiny)  # 354
    assert (model.window_table_route(4, 24, "all") is not None) == (spread <= half_exponent_range)
    dense = model.run_with_hooks(tokens, fwd_hooks=identity_hooks(model))
    for fast, expected in ((model.query_log_probs(tokens), dense[:, -2]), (model(tokens), dense)):
        assert torch.isfinite(fast).all()
        # float64: measured differences <= 5.7e-14 (at a = 300) for all three scales.
        assert torch.allclose(fast, expected, atol=1e-9)


def test_layers_without_hooks_stay_light(monkeypatch):
    """run_with_cache(names_filter=...) builds dense activations only in the layers it hooks."""
    model = randomized(IHTransformer(tiny_config()), seed=7)
    tokens = random_tokens(3, 24, seed=7)
    _, full = model.run_with_cache(tokens)

    def refuse(*args, **kwargs):
        raise AssertionError("the selector's [subset, batch, pos, pos] stack was built")

    monkeypatch.setattr(selector_module, "_products", refuse)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    assert list(cache.keys()) == ["blocks.0.attn.hook_pattern"]
    assert torch.equal(cache["blocks.0.attn.hook_pattern"], full["blocks.0.attn.hook_pattern"])
    with pytest.raises(AssertionError, match="stack was built"):
        model.run_with_cache(tokens, names_filter="blocks.0.mlp.hook_subset_similarity")


def test_copier_edits_reach_the_fused_attention_route():
    """With only a copier hook, layers 1-2 use fused attention on the edited copies: zeroing them changes the
    output exactly as it does on the fully dense path."""
    model = randomized(IHTransformer(tiny_config()), seed=8)
    tokens = random_tokens(3, 24, seed=8)

    def zero(result, hook):
        return torch.zeros_like(result)

    edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_result", zero)])
    everything = identity_hooks(model)[:-1] + [("blocks.0.attn.hook_result", zero)]
    assert (edited - model(tokens)).abs().max() > 1e-2  # measured 1.36; float32 noise is ~1e-6
    assert torch.allclose(edited, model.run_with_hooks(tokens, fwd_hooks=everything), atol=ATOL)  # measured 1.2e-7


def test_last_row_needs_two_positions():
    model = IHTransformer(tiny_config())
    with pytest.raises(ValueError, match="the query row T-2 needs at least 2 positions; got 1"):
        model.query_log_probs(torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("route", ROUTES)
def test_routes_agree_on_cuda(route, monkeypatch):
    for name, value in ROUTES[route].items():
        monkeypatch.setattr(transformer_module, name, value)
    cpu = randomized(IHTransformer(tiny_config()), seed=9)
    cuda = IHTransformer(tiny_config(device="cuda"))
    cuda.load_state_dict(cpu.state_dict())
    tokens = random_tokens(4, 24, seed=9)
    for objective in ("last", "all"):
        expected = cpu(tokens, return_type="loss", loss_positions=objective)
        got = cuda(tokens.cuda(), return_type="loss", loss_positions=objective)
        # Same float32 reordering argument as ATOL (CUDA kernels sum in another order); not measured here (no GPU).
        assert torch.allclose(got.cpu(), expected, atol=ATOL)


def test_window_codes_name_each_lag_window():
    """The code of position t is sum_m x_{t-m} (d+1)^m, with d standing for "before the start"."""
    tokens = torch.tensor([[2, 0, 1, 2]])
    codes = transformer_module.window_codes(tokens, max_lag=3, d_vocab=3)
    expected = [2 + 3 * 4 + 3 * 16, 0 + 2 * 4 + 3 * 16, 1 + 0 * 4 + 2 * 16, 2 + 1 * 4 + 0 * 16]
    assert codes.tolist() == [expected]


def test_config_sizes_pick_the_route():
    cfg = IHConfig(d_vocab=3, n_ctx=1001, n_heads=3, window=3, max_degree=2)
    model = IHTransformer(cfg)
    assert model.window_table_route(batch=9000, n_pos=101, positions="last") is not None  # 64 codes
    table, block = model.window_table_route(batch=64, n_pos=1000, positions="all")
    assert table.shape == (64, 64) and block == 14  # ceil(sqrt(64 codes x 3 tokens))
    wide = IHTransformer(cfg.replace(d_vocab=20))
    assert wide.window_table_route(batch=1, n_pos=101, positions="last") is None  # 21^3 = 9261 codes
