"""IHTransformer against closed forms: the GIH formula, the subset kernel, and its own dense path."""

import json
import math

import pytest
import torch

from ih_circuits import IHConfig, IHTransformer, NGramTask, gih_predictive, ideal_model
from tests.model.helpers import identity_hooks, random_tokens, randomized, tiny_config


@pytest.mark.parametrize("lags", [(1,), (1, 2), (1, 3)], ids=lambda p: f"lags={p}")
@pytest.mark.parametrize("a", [2.0, 30.0])
def test_ideal_model_equals_the_gih_formula(lags, a):
    tokens = random_tokens(6, 24, seed=1)
    model = ideal_model(tiny_config(), lags=lags, a=a)
    expected = gih_predictive(tokens, lags, a, d_vocab=3)
    # The only difference is the documented floor: p_out = (1 - eps) p + eps / d, eps = 1e-6, so |p_out - p| <=
    # eps (1 - 1/d) = 6.7e-7 (measured 6.6e-7); 2e-6 adds room for float32 rounding.
    assert torch.allclose(model(tokens).exp(), expected, atol=2e-6)


def test_ideal_model_at_large_a_is_the_conditional_frequency():
    tokens = random_tokens(6, 24, seed=2)
    model = ideal_model(tiny_config(), lags=(1, 2), a=60.0)
    # The floor bound above (6.7e-7, measured 6.6e-7); a = 60 leaks e^-60 ~ 1e-26 to non-matching keys.
    assert torch.allclose(model(tokens).exp(), gih_predictive(tokens, (1, 2), math.inf, d_vocab=3), atol=2e-6)


def test_selector_kernel_equals_normalised_kronecker_features():
    """K(i, j) = <phi_i, phi_j> / sum c^2 with phi = concat_S c_S (kron_{h in S} v_h), built explicitly."""
    model = randomized(IHTransformer(tiny_config(n_ctx=8)), seed=3)
    tokens = random_tokens(2, 8, seed=3)
    _, cache = model.run_with_cache(tokens)
    features = cache["blocks.0.attn.hook_result"]  # [batch, pos, head, d]
    c = model.selector.c.detach()
    blocks = []
    for coefficient, subset in zip(c, model.config.subsets, strict=True):
        phi = torch.ones(2, 8, 1)
        for head in subset:
            phi = torch.einsum("bpi,bpj->bpij", phi, features[:, :, head]).flatten(2)
        blocks.append(coefficient * phi)
    phi = torch.cat(blocks, dim=-1)
    expected = torch.einsum("bif,bjf->bij", phi, phi) / c.square().sum()
    # float32, K of order 1 computed two ways: measured difference 1.8e-7.
    assert torch.allclose(cache["blocks.0.mlp.hook_kernel"], expected, atol=1e-5)


CONFIGS = [
    tiny_config(),
    tiny_config(window=2, max_degree=1),
    tiny_config(layout="staggered", n_heads=2, window=3, max_degree=2),
    tiny_config(copier="full"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.copier}-{c.layout}-M{c.window}")
def test_fast_path_equals_dense_path(cfg):
    """Without hooks the model takes shortcuts; with a no-op hook everywhere it builds everything. Same numbers."""
    model = randomized(IHTransformer(cfg), seed=4)
    tokens = random_tokens(5, 20, seed=4)
    noop = identity_hooks(model)
    for kwargs in ({}, {"return_type": "loss"}, {"return_type": "loss", "loss_positions": "all"}):
        fast = model(tokens, **kwargs)
        dense = model.run_with_hooks(tokens, fwd_hooks=noop, **kwargs)
        # float32 sums in another order: measured <= 7.2e-7 over all configs (as ATOL in test_paths.py).
        assert torch.allclose(fast, dense, atol=1e-5), kwargs


def test_losses_are_the_mean_nll_of_the_right_rows():
    model = randomized(IHTransformer(tiny_config()), seed=5)
    tokens = random_tokens(4, 20, seed=5)
    log_probs = model(tokens)
    last = -log_probs[:, -2].gather(1, tokens[:, -1:]).mean()
    every = -log_probs[:, :-1].gather(2, tokens[:, 1:, None]).mean()
    # float32 rounding: measured 1.2e-7, 0 and 1.8e-7 for the three checks.
    assert torch.allclose(model(tokens, return_type="loss"), last, atol=1e-6)
    assert torch.allclose(model(tokens, return_type="loss", loss_positions="all"), every, atol=1e-6)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(4, 20), atol=1e-5)


def test_first_row_is_uniform_and_missing_lags_read_zeros():
    model = ideal_model(tiny_config(), lags=(1, 3), a=5.0)
    tokens = random_tokens(3, 10, seed=6)
    assert torch.allclose(model(tokens)[:, 0].exp(), torch.full((3, 3), 1 / 3), atol=1e-6)  # float32 (3e-8)
    _, cache = model.run_with_cache(tokens)
    copied = cache["blocks.0.attn.hook_result"]
    assert torch.equal(copied[:, :2, 1], torch.zeros(3, 2, 3))  # head 1 copies lag 3: nothing before t = 2
    assert torch.equal(copied[:, 2:, 1], torch.nn.functional.one_hot(tokens[:, :-2], 3).float())


@pytest.mark.parametrize("objective", ["last", "all"])
def test_gradients_are_finite_for_extreme_parameters(objective):
    model = IHTransformer(tiny_config())
    with torch.no_grad():
        model.classifier.a.fill_(1e4)
        model.selector.c.zero_()
        model.selector.c[4] = 1.0
        model.copier.w_pos.copy_(torch.tensor([[50.0, -50.0, -50.0], [-50.0, 50.0, -50.0], [50.0, 50.0, -50.0]]))
    tokens = random_tokens(8, 24, seed=7)
    loss = model(tokens, return_type="loss", loss_positions=objective)
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name


def test_all_zero_selector_gives_uniform_attention_not_nan():
    model = IHTransformer(tiny_config())
    with torch.no_grad():
        model.selector.c.zero_()
    tokens = random_tokens(2, 12, seed=8)
    out = model(tokens)
    assert torch.isfinite(out).all()
    # c = 0 makes K = 0, so row t attends equally to its t keys (key j holds token j+1)...
    _, cache = model.run_with_cache(tokens)
    pattern = cache["blocks.1.attn.hook_pattern"][:, 0]
    rows = torch.arange(1, 12)
    # Default tolerance (rtol 1e-5, atol 1e-8): float32 rounding, measured 1.2e-7 and 0.
    assert torch.allclose(pattern[:, rows, :].sum(-1), torch.ones(2, 11))
    assert torch.allclose(pattern[:, 11, :11], torch.full((2, 11), 1 / 11))
    # ...and predicts the in-context unigram, the GIH with a = 0; the floor 1e-6 bounds the difference.
    expected = gih_predictive(tokens, (), 0.0, d_vocab=model.config.d_vocab)
    # Floor effect <= eps (1 - 1/d) = 6.7e-7 (measured 6.6e-7); the factor 2 covers float32 rounding.
    assert torch.allclose(out.exp(), expected, atol=2 * model.config.prob_floor)


def test_full_variant_trains_a_step():
    model = IHTransformer(tiny_config(copier="full"))
    tokens = random_tokens(16, 24, seed=9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model(tokens, return_type="loss")
    before.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert model(tokens, return_type="loss") < before


def test_accessors_speak_paper_terms():
    model = IHTransformer(IHConfig())
    weights = model.copier_weights()
    assert weights.shape == (3, 3) and torch.allclose(weights.sum(-1), torch.ones(3))
    assert model.head_lags() == [1, 2, 3]
    shares = model.selector_shares()
    assert list(shares) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]
    # Equal initial c over 7 subsets and a_init = 0.01 (PAPER.md section 3); the default rel 1e-6 covers float32
    # (measured relative errors <= 4.5e-8).
    assert sum(shares.values()) == pytest.approx(1.0) and shares[(0, 1)] == pytest.approx(1 / 7)
    assert model.classifier_scale() == pytest.approx(0.01)


def test_checkpoint_round_trips_bit_exactly(tmp_path):
    model = randomized(IHTransformer(tiny_config(copier="full")), seed=10)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = IHTransformer.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    tokens = random_tokens(3, 24, seed=10)
    assert torch.equal(model(tokens), loaded(tokens))


def test_checkpoint_with_mismatched_config_is_refused(tmp_path):
    IHTransformer(tiny_config(window=3)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["window"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json does not match its checksum"):
        IHTransformer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a saved IHTransformer checkpoint: the directory does not exist"):
        IHTransformer.from_pretrained(tmp_path / "nowhere")


def test_config_round_trips_and_rejects_unknown_or_missing_keys():
    cfg = tiny_config(copier="full", layout="staggered", dtype="float64")
    assert IHConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"IHConfig has unknown fields \['lr'\]"):
        IHConfig.from_dict({**cfg.to_dict(), "lr": 1.0})
    without_layout = {k: v for k, v in cfg.to_dict().items() if k != "layout"}
    with pytest.raises(ValueError, match=r"IHConfig is missing \['layout'\]"):  # not silently "shared"
        IHConfig.from_dict(without_layout)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_vocab": 1}, "d_vocab"),
        ({"max_degree": 5}, r"max_degree must be an integer in \[0, n_heads=3\]; got 5"),
        ({"copier": "mlp"}, "copier"),
        ({"layout": "diagonal"}, "layout"),
        ({"dtype": "float16"}, "dtype"),
        ({"window": 0}, "window"),
        ({"prob_floor": 1.0}, "prob_floor"),
        ({"a_init": float("nan")}, "a_init"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


@pytest.mark.usefixtures("without_runtime_typecheck")
@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (torch.zeros(2, 5), "integer dtype"),
        (torch.zeros(5, dtype=torch.long), r"\[batch, pos\]"),
        (torch.full((2, 5), 3), r"\[0, d_vocab=3\)"),
        (torch.zeros(2, 25, dtype=torch.long), "n_ctx=24"),
    ],
)
def test_bad_tokens_raise_value_error(tokens, message):
    model = IHTransformer(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(tokens)


def test_bad_return_type():
    model = IHTransformer(tiny_config())
    with pytest.raises(ValueError, match="return_type"):
        model(random_tokens(1, 5), return_type="logits")
    with pytest.raises(ValueError, match="loss_positions"):
        model(random_tokens(1, 5), return_type="loss", loss_positions="first")


def test_ideal_model_validates_lags():
    with pytest.raises(ValueError, match="outside head"):
        ideal_model(tiny_config(window=2), lags=(1, 3))
    with pytest.raises(ValueError, match="max_degree"):
        ideal_model(tiny_config(max_degree=1), lags=(1, 2))


@pytest.mark.parametrize("w_plus", [3.0, 25.0, 50.0])
def test_fast_and_hooked_gradients_agree_even_for_a_sharp_copier(w_plus):
    """The fast path's similarity table is clipped to [0, 1] (codes no tokens produce overflowed once the copier
    was sharp); on the codes tokens do produce, it and its gradient are exactly the hooked path's."""
    cfg = IHConfig(d_vocab=3, n_ctx=41, n_heads=3, window=3, max_degree=2, w_plus=w_plus, w_minus=0.0, dtype="float64")
    tokens = random_tokens(32, 41, seed=4)
    grads = []
    for dense in (False, True):
        model = IHTransformer(cfg)
        with model.hooks(fwd_hooks=identity_hooks(model) if dense else []):
            model(tokens, return_type="loss").backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, fast in grads[0].items():
        assert torch.isfinite(fast).all(), name
        # float64: measured relative differences <= 1.5e-14 on gradients of order 1e-2; the w_pos gradients that
        # underflow at w_plus 25-50 (order 1e-7 to 1e-15) differ by < 1e-20 absolute, hence atol 1e-15.
        assert torch.allclose(fast, grads[1][name], rtol=1e-9, atol=1e-15), name


def test_huge_selector_coefficients_keep_finite_shares_and_outputs():
    model = IHTransformer(tiny_config())
    with torch.no_grad():
        model.selector.c.fill_(1e25)
        model.selector.c[0] = 3e25
    shares = model.selector.shares().detach()
    # c^2 = 9e50 of 15e50 in total; float32, measured relative error 2.4e-7.
    assert torch.isfinite(shares).all() and float(shares[0]) == pytest.approx(9 / 15, rel=1e-5)
    assert torch.isfinite(model(random_tokens(2, 10))).all()


@pytest.mark.usefixtures("without_runtime_typecheck")
def test_float_ids_and_unknown_positions_are_refused():
    model = IHTransformer(tiny_config())
    with pytest.raises(ValueError, match="integer dtype"):
        model.to_tokens([0.5, 1.0, 2.0])
    with pytest.raises(ValueError, match="loss_positions must be 'last' or 'all'; got 'lats'"):
        model(random_tokens(1, 5), return_type="loss", loss_positions="lats")


@pytest.mark.usefixtures("without_runtime_typecheck")
def test_the_classifier_scale_is_bounded_where_the_routes_agree():
    """|a| <= 1e4: at the bound the fast routes and the hooked dense path give the same loss on both objectives
    (to 1e-5 nats); beyond it the config, ``ideal_model`` and a loaded checkpoint refuse it."""
    from ih_circuits.model.config import MAX_CLASSIFIER_SCALE

    task = NGramTask(vocab_size=3, parents=(1, 2), seq_len=101)
    tokens = task.sample(64, seed=0).tokens
    for a in (MAX_CLASSIFIER_SCALE, -MAX_CLASSIFIER_SCALE):
        model = IHTransformer(IHConfig(d_vocab=3, n_ctx=101, n_heads=3, window=3, max_degree=2, a_init=a))
        with torch.no_grad():
            hooked, _ = model.run_with_cache(tokens)
        for positions, rows, targets in (
            ("last", hooked[:, -2:-1], tokens[:, -1:]),
            ("all", hooked[:, :-1], tokens[:, 1:]),
        ):
            dense = -rows.gather(-1, targets[..., None]).mean()
            fast = model(tokens, return_type="loss", loss_positions=positions)
            assert abs(fast.item() - dense.item()) < 1e-5, (a, positions)
    with pytest.raises(ValueError, match=r"a_init must be a finite number in \[-10000.0, 10000.0\]; got 1e\+30"):
        IHConfig(a_init=1e30)
    with pytest.raises(ValueError, match=r"a must be a finite number in \[-10000.0, 10000.0\]"):
        ideal_model(IHConfig(d_vocab=3, n_ctx=12, n_heads=3, window=3, max_degree=2), a=2e4)
