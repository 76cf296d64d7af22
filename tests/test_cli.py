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
