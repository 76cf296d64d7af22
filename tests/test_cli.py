"""The ``ih-circuits`` command line."""

from ih_circuits.cli import main


def test_theory_prints_the_predicted_set(capsys):
    assert main(["theory", "--parents", "1,3", "--window", "3", "--n-kernels", "300"]) == 0
    out = capsys.readouterr().out
    assert "predicted parent set (|S| <= 2): (1, 3)" in out


def test_bad_argument_is_one_line_and_exit_2(capsys):
    assert main(["theory", "--vocab-size", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocab_size" in err[0]


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
