"""Fault injection: damaged and hand-edited saves, extreme parameters, values that would make NaN.

Kills during saves are in ``test_checkpoint.py``; Ctrl-C and ``--resume`` through the CLI in ``test_cli.py``.
"""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import ih_circuits as ih
from ih_circuits.checkpoint import MANIFEST, write_manifest
from ih_circuits.cli import main
from ih_circuits.presets import preset_parts

FILES = ["run.json", "history.csv", "optimizer.pt", "model/config.json", "model/model.safetensors", MANIFEST]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A short CWa run (12 steps, trajectory at steps 0, 10, 12) saved by the CLI."""
    out = tmp_path_factory.mktemp("faults") / "run"
    argv = ["train", "--preset", "cwa", "--steps", "12", "--batch-size", "64", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    return out


def copy_of(saved_run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(saved_run, tmp_path / "run"))


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete"])
def test_each_damaged_file_is_one_error_line_from_the_cli(saved_run, tmp_path, capsys, name, damage):
    run = copy_of(saved_run, tmp_path)
    path = run / name
    data = path.read_bytes()
    if damage == "flip a byte":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1 :])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.unlink()
    capsys.readouterr()
    assert main(["probe", str(run), "--n-sequences", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert (MANIFEST if name == MANIFEST else Path(name).name) in err[0]


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def set_history_value(path: Path, column: str, value) -> None:
    history = pd.read_csv(path)
    history[column] = history[column].astype(object)
    history.loc[1, column] = value
    history.to_csv(path, index=False)


def nan_weight(path: Path) -> None:
    set_weight(path, "blocks.1.attn.a", float("nan"))


def set_weight(path: Path, name: str, value: float) -> None:
    weights = load_file(path)
    weights[name] = torch.full_like(weights[name], value)
    save_file(weights, path)


def resize_first_moment(path: Path) -> None:
    """CWa's SGD keeps no state; a momentum buffer of the wrong size is what a mismatched state would hold."""
    state = torch.load(path, weights_only=True)
    state["state"]["state"][0] = {"momentum_buffer": torch.zeros(4)}
    torch.save(state, path)


def drop_a_parameter(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["state"]["param_groups"][0]["params"] = state["state"]["param_groups"][0]["params"][:-1]
    torch.save(state, path)


EDITS = {
    "step as a string": ("run.json", lambda p: edit_json(p, lambda d: d.update(step="5")), r"run.json: step must be"),
    "negative step": ("run.json", lambda p: edit_json(p, lambda d: d.update(step=-5)), r"step must be an integer in"),
    "step past the plan": (
        "run.json",
        lambda p: edit_json(p, lambda d: d.update(step=13)),
        r"\[0, 12 \(the planned steps\)\]; got 13",
    ),
    "interrupted as text": (
        "run.json",
        lambda p: edit_json(p, lambda d: d.update(interrupted="no")),
        r"run.json: interrupted must be true or false",
    ),
    "predicted lags as text": (
        "run.json",
        lambda p: edit_json(p, lambda d: d.update(predicted_lags="1,2")),
        r"predicted_lags must be a list",
    ),
    "missing run field": (
        "run.json",
        lambda p: edit_json(p, lambda d: d.pop("step")),
        r"run.json is missing \['step'\]",
    ),
    "task vocabulary": (
        "run.json",
        lambda p: edit_json(p, lambda d: d["task"].update(vocab_size=5)),
        r"d_vocab=3.*does not fit the task \(run.json vocab_size=5",
    ),
    "bad task field": (
        "run.json",
        lambda p: edit_json(p, lambda d: d["task"].update(seq_len=2)),
        r"run.json: task: seq_len must be an integer >= max\(parents\) \+ 1 = 3",
    ),
    "missing stage field": (
        "run.json",
        lambda p: edit_json(p, lambda d: d["train_config"]["stages"][0].pop("lr")),
        r"train_config: TrainConfig stage 0 is missing \['lr'\]",
    ),
    "missing layout": (
        "model/config.json",
        lambda p: edit_json(p, lambda d: d.pop("layout")),
        r"config.json: IHConfig is missing \['layout'\]",
    ),
    "window as text": (
        "model/config.json",
        lambda p: edit_json(p, lambda d: d.update(window="3")),
        r"config.json: window must be an integer",
    ),
    "NaN weight": ("model/model.safetensors", nan_weight, r"parameter blocks.1.attn.a holds non-finite values"),
    "history column": (
        "history.csv",
        lambda p: pd.read_csv(p).drop(columns=["share[0,1]"]).to_csv(p, index=False),
        r"history.csv: columns do not match the model: missing \['share\[0,1\]'\]",
    ),
    "history text": (
        "history.csv",
        lambda p: set_history_value(p, "eval_loss", "low"),
        r"history.csv: the columns .* must hold numbers",
    ),
    "history step": (
        "history.csv",
        lambda p: set_history_value(p, "step", 99),
        r"history.csv: step must hold increasing",
    ),
    "optimizer stage": (
        "optimizer.pt",
        lambda p: torch.save({"stage": 3, "state": {}}, p),
        r"optimizer.pt: stage must be an integer in \[0, 0\]",
    ),
    "optimizer text": ("optimizer.pt", lambda p: p.write_text("no"), r"optimizer.pt is not a readable optimizer state"),
    "optimizer moment of the wrong size": (
        "optimizer.pt",
        lambda p: resize_first_moment(p),
        r"optimizer.pt: the optimizer's momentum_buffer for parameter 0 of stage 0 has shape \(4,\), but the param",
    ),
    "optimizer of another parameter count": (
        "optimizer.pt",
        lambda p: drop_a_parameter(p),
        r"optimizer.pt: the optimizer state does not fit stage 0's parameters",
    ),
    "negative alpha under a valid prior": (
        "run.json",
        lambda p: edit_json(p, lambda d: d["task"].update(alpha=-1)),
        r"run.json: task: NGramTask alpha must be a finite number > 0.0; got -1",
    ),
    "alpha that disagrees with the prior": (
        "run.json",
        lambda p: edit_json(p, lambda d: d["task"].update(alpha=0.5)),
        r"run.json: task: NGramTask alpha=0.5 differs from its prior's alpha=0.1",
    ),
}


@pytest.mark.usefixtures("without_runtime_typecheck")
@pytest.mark.parametrize("case", sorted(EDITS))
def test_consistent_edits_are_refused_naming_the_file_and_field(saved_run, tmp_path, case):
    """Each file edited and the manifests rewritten, as a careless script would: checksums pass, validation
    still refuses, naming the file and the field."""
    name, edit, message = EDITS[case]
    run = copy_of(saved_run, tmp_path)
    edit(run / name)
    write_manifest(run / "model", "IHTransformer checkpoint")
    write_manifest(run, "TrainingRun")
    with pytest.raises(ValueError, match=message):
        ih.TrainingRun.load(run)


def test_an_unedited_copy_loads(saved_run, tmp_path):
    run = copy_of(saved_run, tmp_path)
    write_manifest(run / "model", "IHTransformer checkpoint")
    write_manifest(run, "TrainingRun")
    loaded = ih.TrainingRun.load(run)
    assert loaded.step == 12 and loaded.history["step"].tolist() == [0, 10, 12]


EXTREMES = {
    "sharp copier (w_plus 50)": {"w_plus": 50.0, "w_minus": 0.0},
    "sharp classifier (a 1e4)": {"a_init": 1e4},
    "sparse kernels (alpha 1e-3)": {"alpha": 1e-3},
    "flat kernels (alpha 1e3)": {"alpha": 1e3},
    "huge selector coefficients (1e25)": {"c_init": 1e25},
    "all at once": {"w_plus": 50.0, "w_minus": -50.0, "a_init": 1e4, "alpha": 1e-3},
}


@pytest.mark.parametrize("copier", ["positional", "full"])
@pytest.mark.parametrize("case", sorted(EXTREMES))
def test_extreme_parameters_give_finite_losses_and_gradients(case, copier):
    """On the fast path and the hooked path, for the last-position and every-position losses."""
    model, task, _ = preset_parts("cwa", copier=copier, **EXTREMES[case])
    tokens = task.sample(64, seed=0).tokens
    for hooked in (False, True):
        for positions in ("last", "all"):
            model.zero_grad()
            with model.hooks(fwd_hooks=[("hook_log_probs", lambda x, hook: x)] if hooked else []):
                loss = model(tokens, return_type="loss", loss_positions=positions)
            loss.backward()
            assert torch.isfinite(loss), (hooked, positions)
            for name, parameter in model.named_parameters():
                assert parameter.grad is None or torch.isfinite(parameter.grad).all(), (name, hooked, positions)


@pytest.mark.parametrize("case", sorted(EXTREMES))
def test_extreme_parameters_train(case):
    run = ih.train_preset("cwa", steps=4, batch_size=64, eval_size=64, record_every=2, quiet=True, **EXTREMES[case])
    assert run.finished and not run.interrupted
    assert run.history[["eval_loss", "excess_loss", "a"]].notna().all().all()


@pytest.mark.usefixtures("without_runtime_typecheck")
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ih.DirichletPrior(1e-40), r"alpha must be a finite number >= 1e-30"),
        (lambda: ih.DirichletPrior(float("nan")), r"alpha must be a finite number >= 1e-30"),
        (lambda: ih.NGramTask(vocab_size=3, parents=(1,), seq_len=10, alpha=float("inf")), "alpha must be a finite"),
        (lambda: ih.IHConfig(w_plus=float("inf")), "w_plus must be a finite number"),
        (lambda: ih.IHConfig(c_init=float("nan")), "c_init must be a finite number"),
        (lambda: ih.IHConfig(prob_floor=1.0), r"prob_floor must be in \[0, 1\)"),
        (lambda: ih.ideal_model(ih.IHConfig(), a=float("nan")), "a must be a finite number"),
    ],
)
def test_values_that_would_make_nan_are_refused_up_front(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.slow
def test_the_battery_gives_the_readme_table():
    """``make battery`` (benchmarks/battery.py, about 1 min quiet): every category's counts are the README's row,
    and nothing ends as an unclear error, a silent wrong result or a crash."""
    import re
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "battery.py")], capture_output=True, text=True, check=True
    )
    assert "315 cases in" in result.stdout
    assert "58 right result, 257 clear error, 0 unclear error, 0 silent wrong result, 0 crash" in result.stdout
    printed = {
        m[0].strip(): [int(x) for x in m[1:]]
        for m in re.findall(
            r"^ *(.+?): +(\d+) cases, (\d+) right result, (\d+) clear error, (\d+) unclear error, "
            r"(\d+) silent wrong result, (\d+) crash$",
            result.stdout,
            re.MULTILINE,
        )
    }
    readme = (root / "README.md").read_text()
    table = readme.split("| Category | Cases |")[1].split("| **total**")[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:] if line]
    assert len(rows) == len(printed) == 10
    for row in rows:
        (name,) = [c for c in printed if row[0].startswith(c.split(" (")[0].split(",")[0])]
        assert printed[name] == [int(x) for x in row[1:]], (name, row)
