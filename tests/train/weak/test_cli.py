"""`train-weak` and `refine`: expected errors are one line and exit 2, before Ray starts."""

from __future__ import annotations

from pathlib import Path

from mcs_batch.cli import main
from mcs_batch.train.weak.synthetic import write_pseudo_run


def test_expected_errors_are_one_line_and_exit_2(tmp_path: Path, capsys):
    out = tmp_path / "out"
    write_pseudo_run(tmp_path, str(out), n=2)
    cases = [
        (["train-weak", "--from", str(out), "--target", "lesion"], "work must be set"),
        (["train-weak", "--from", str(tmp_path / "nothing"), "--target", "lesion", "--work", "w"], "no catalog there"),
        (["train-weak", "--from", str(out), "--target", "lungs", "--work", "w"], "has targets lesion"),
        (["train-weak", "--from", str(out), "--target", "lesion", "--work", "w", "--set", "train.cycles=0"], "cycles"),
        (["refine", "--from", str(out), "--target", "lesion", "--work", str(tmp_path / "w")], "train-weak` first"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
