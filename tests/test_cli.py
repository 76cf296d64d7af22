"""The ``ih-circuits`` command line."""

import os
import signal

import pandas as pd
import pytest
import torch

from ih_circuits import TrainingRun
from ih_circuits.cli import main


def test_theory_prints_the_predicted_set(capsys):
    assert main(["theory", "--parents", "1,3", "--window", "3", "--n-kernels", "300"]) == 0
    out = capsys.readouterr().out
    assert "predicted parent set (|S| <= 2): (1, 3)" in out


def test_theory_samples_when_asked(capsys):
    args = ["theory", "--parents", "1,3", "--window", "3", "--n-kernels", "100", "--method", "monte_carlo"]
    assert main([*args, "--n-samples", "4000"]) == 0
    out = capsys.readouterr().out
    assert "100 kernels, Monte Carlo, 4000 windows per kernel" in out
    assert "predicted parent set (|S| <= 2): (1, 3)" in out


def test_bad_argument_is_one_line_and_exit_2(capsys):
    assert main(["theory", "--vocab-size", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocab_size" in err[0]


def test_a_negative_max_degree_is_refused_before_any_work(capsys):
    assert main(["theory", "--max-degree", "-1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == (
        "ih-circuits theory: error: --max-degree must be an integer >= 0; got -1"
    )


def test_train_refuses_parents_the_model_cannot_see(tmp_path, capsys):
    """A window-3 model's copier heads read lags 1..3: parents (1, 5) are refused, with the override that fixes it."""
    args = ["train", "--preset", "cwa", "--parents", "1,5", "--steps", "2", "--batch-size", "64", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err
    assert "include lag(s) (5,) that the model cannot see" in error and "--window 5" in error
    assert not (tmp_path / "a").exists()
    assert main([*args, "--window", "5", "--out", str(tmp_path / "b")]) == 0
    assert TrainingRun.load(tmp_path / "b").model.config.window == 5


def test_train_probe_report_round_trip(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "cwa", "--steps", "30", "--batch-size", "512", "--quiet", "--out", str(out)]) == 0
    assert (out / "run.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert main(["probe", str(out), "--n-sequences", "64"]) == 0
    printed = capsys.readouterr().out
    assert "ParentReport(lags=(1, 2)" in printed and "DecompositionReport(verdict=" in printed
    assert main(["report", str(out), "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 1_000_000


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["probe", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a saved TrainingRun" in err[0]


def test_unknown_preset_is_one_line(capsys):
    assert main(["train", "--preset", "nope", "--quiet"]) == 2
    assert "unknown preset" in capsys.readouterr().err


TRAIN = ["train", "--preset", "cwa", "--steps", "12", "--batch-size", "64", "--quiet"]


def interrupt_at_step(monkeypatch, step: int) -> None:
    """Send this process a real SIGINT (Ctrl-C) while training computes the loss of ``step`` (1-based)."""
    from ih_circuits import training

    original, calls = training.objective_loss, []

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(torch.is_grad_enabled())  # training steps; evaluation runs without gradients
        if sum(calls) == step and calls[-1]:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "objective_loss", loss_then_ctrl_c)


def test_ctrl_c_saves_the_run_exits_1_and_resume_finishes_it_exactly(tmp_path, capsys, monkeypatch):
    """Ctrl-C during step 5: the step completes, the run is saved with exit status 1, and ``--resume`` ends
    with the same weights and trajectory as a run never interrupted (fresh data is seeded by step)."""
    assert main([*TRAIN, "--out", str(tmp_path / "whole")]) == 0
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 5)
        assert main([*TRAIN, "--out", str(tmp_path / "cut")]) == 1
    printed = capsys.readouterr().out
    assert "interrupted at step 5" in printed and f"ih-circuits train --resume {tmp_path / 'cut'}" in printed
    cut = TrainingRun.load(tmp_path / "cut")
    assert cut.interrupted and cut.step == 5
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    resumed, whole = TrainingRun.load(tmp_path / "cut"), TrainingRun.load(tmp_path / "whole")
    assert resumed.step == whole.step == 12 and not resumed.interrupted
    for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)
    pd.testing.assert_frame_equal(resumed.history, whole.history)
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    assert "nothing to resume" in capsys.readouterr().out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_every_failure_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main([*TRAIN, "--out", str(tmp_path / "file")]) == 2
    assert "it is a file, not a directory" in one_error_line(capsys)
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "3"]) == 2
    assert "drop --steps" in one_error_line(capsys)
    assert main(["train", "--quiet"]) == 2
    assert "needs --preset" in one_error_line(capsys)
    assert main([*TRAIN, "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path)]) == 2
    assert "it is a directory" in one_error_line(capsys)
    weights = tmp_path / "run" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    for command in (
        ["probe", str(tmp_path / "run")],
        ["report", str(tmp_path / "run")],
        ["train", "--resume", str(tmp_path / "run")],
    ):
        assert main(command) == 2
        assert "model.safetensors does not match its checksum" in one_error_line(capsys)


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--steps", "many"])
    assert exit_info.value.code == 2
    assert "invalid int value: 'many'" in one_error_line(capsys)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where nobody can create files")
def test_unwritable_output_directory_is_refused_before_training(capsys, monkeypatch):
    def must_not_train(*args, **kwargs):
        raise AssertionError("training started although the output directory cannot be written")

    monkeypatch.setattr("ih_circuits.presets.train_preset", must_not_train)
    assert main([*TRAIN, "--out", "/proc/ih-circuits-run"]) == 2
    assert "/proc is not a writable directory" in one_error_line(capsys)


def test_a_diverged_run_is_saved_and_reported_in_one_line(tmp_path, capsys, monkeypatch):
    """A NaN loss at step 3 stops training (TrainingDiverged); the CLI saves the two good steps and says where."""
    from ih_circuits import training

    original, calls = training.objective_loss, []

    def nan_at_step_3(*args, **kwargs):
        loss = original(*args, **kwargs)
        calls.append(torch.is_grad_enabled())
        return loss * float("nan") if sum(calls) == 3 and calls[-1] else loss

    monkeypatch.setattr(training, "objective_loss", nan_at_step_3)
    assert main([*TRAIN, "--out", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert "training loss became nan at step 2" in line and f"saved to {tmp_path / 'run'}" in line
    kept = TrainingRun.load(tmp_path / "run")
    assert kept.step == 2 and all(torch.isfinite(p).all() for p in kept.model.parameters())


def test_ctrl_c_while_the_command_starts_is_one_line_and_exit_1(capsys, monkeypatch):
    """The command's modules (torch among them) load inside main's handler: a Ctrl-C while they load, here as
    the theory module is imported, is the command's own "interrupted", not a traceback."""
    import builtins

    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):
        if name == "ih_circuits.theory":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    assert main(["theory", "--vocab-size", "3", "--parents", "1,2"]) == 1
    assert capsys.readouterr().err == "ih-circuits theory: interrupted\n"


@pytest.mark.e2e  # fresh interpreters
def test_the_command_module_loads_without_torch_and_a_sigint_during_start_up_is_clean():
    """Importing ih_circuits and its command line loads no torch (names load on first use), so the only
    unguarded start-up is Python's own; a SIGINT half a second in lands while torch loads, inside main."""
    import signal
    import subprocess
    import sys
    import time

    code = "import sys, ih_circuits, ih_circuits.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    command = [sys.executable, "-c", "import sys; from ih_circuits.cli import main; sys.exit(main())", "theory"]
    arguments = ["--vocab-size", "3", "--parents", "1,2", "--n-kernels", "200000"]  # seconds of work after start-up
    child = subprocess.Popen([*command, *arguments], stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert (child.returncode, err) == (1, "ih-circuits theory: interrupted\n")
