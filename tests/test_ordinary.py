"""Ordinary transformers saved and loaded: exact round trips, runs that resume as if never stopped, clear refusals."""

import json

import pandas as pd
import pytest
import torch

from ih_circuits import NGramTask, TrainingRun
from ih_circuits.baselines import transformer_parts
from ih_circuits.checkpoint import write_manifest
from ih_circuits.ordinary import (
    has_hooked_transformer,
    load_ordinary_transformer,
    ordinary_transformer,
    save_ordinary_transformer,
)
from ih_circuits.training import train

CLASSES = ["bridge", pytest.param("hooked", marks=pytest.mark.skipif(not has_hooked_transformer(), reason="TL 4.x"))]
TASK = NGramTask(vocab_size=3, parents=(1, 2), seq_len=21, alpha=0.1, window=3)


def small_run_parts(model_class="bridge"):
    return transformer_parts(
        seed=0, seq_len=21, steps=6, d_model=16, heads=2, batch_size=8, eval_size=16, model_class=model_class
    )


@pytest.mark.parametrize("model_class", CLASSES)
def test_a_saved_model_loads_to_the_same_function(tmp_path, model_class):
    model = ordinary_transformer(TASK, d_model=16, n_heads=2, kind=model_class, seed=3)
    save_ordinary_transformer(model, tmp_path / "model")
    loaded = load_ordinary_transformer(tmp_path / "model")
    assert type(loaded) is type(model) and not loaded.training
    tokens = TASK.sample(4, seed=0).tokens
    assert torch.equal(loaded(tokens), model(tokens))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("model_class", CLASSES)
def test_an_interrupted_transformer_run_resumes_as_if_never_stopped(tmp_path, model_class):
    """The one training loop serves both kinds: a run stopped, saved, loaded and resumed ends bit-equal to one
    that never stopped (same batches from the same seeds, Adam's state restored)."""
    full = train(*small_run_parts(model_class), quiet=True)

    def stop_at_three(run):
        if run.step == 3:
            raise KeyboardInterrupt

    partial = train(*small_run_parts(model_class), quiet=True, callback=stop_at_three)
    assert partial.interrupted and partial.step == 3
    partial.save(tmp_path / "run")
    reloaded = TrainingRun.load(tmp_path / "run")
    pd.testing.assert_frame_equal(reloaded.history, partial.history)
    assert list(reloaded.history.columns) == ["step", "stage", "loss", "eval_loss", "bayes_loss", "excess_loss"]
    finished = reloaded.resume(quiet=True)
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(finished.model.state_dict()[name], tensor), name
    assert finished.history["eval_loss"].tolist() == full.history["eval_loss"].tolist()


def test_models_that_cannot_be_rebuilt_are_refused_on_save(tmp_path):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    with_mlp = TransformerBridge.boot_native(
        TransformerBridgeConfig(d_model=16, d_head=8, n_layers=1, n_ctx=21, n_heads=2, d_vocab=3, d_mlp=32)
    )
    with pytest.raises(ValueError, match="only attention-only models built by ordinary_transformer"):
        save_ordinary_transformer(with_mlp, tmp_path / "model")
    run = train(*small_run_parts(), quiet=True)
    run.model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="this model is a Linear: save it with its own tools"):
        run.save(tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "model").exists()


def test_an_edited_recipe_or_damaged_weights_are_refused_on_load(tmp_path):
    model = ordinary_transformer(TASK, d_model=16, n_heads=2, kind="bridge")
    save_ordinary_transformer(model, tmp_path / "model")
    recipe = json.loads((tmp_path / "model" / "transformer.json").read_text())
    (tmp_path / "model" / "transformer.json").write_text(
        json.dumps({**recipe, "config": {**recipe["config"], "d_model": 32}})
    )
    with pytest.raises(ValueError, match="transformer.json does not match its checksum"):
        load_ordinary_transformer(tmp_path / "model")
    write_manifest(tmp_path / "model", "ordinary transformer checkpoint")  # edited consistently: the shapes refuse
    with pytest.raises(ValueError, match=r"model.safetensors: parameter .* has shape .* but transformer.json needs"):
        load_ordinary_transformer(tmp_path / "model")
    (tmp_path / "model" / "transformer.json").write_text(json.dumps({**recipe, "model_class": "lstm"}))
    write_manifest(tmp_path / "model", "ordinary transformer checkpoint")
    with pytest.raises(ValueError, match="model_class must be 'bridge' or 'hooked'; got 'lstm'"):
        load_ordinary_transformer(tmp_path / "model")
    del recipe["config"]["n_heads"]
    (tmp_path / "model" / "transformer.json").write_text(json.dumps(recipe))
    write_manifest(tmp_path / "model", "ordinary transformer checkpoint")
    with pytest.raises(ValueError, match=r"transformer.json config is missing \['n_heads'\]"):
        load_ordinary_transformer(tmp_path / "model")
