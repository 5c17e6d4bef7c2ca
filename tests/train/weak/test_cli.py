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


def test_help_of_the_new_commands_imports_neither_torch_nor_nnunet():
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from mcs_batch.cli import build_parser\n"
        "for command in ('train-weak', 'refine'):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        build_parser().parse_args([command, '--help'])\n"
        "print(sorted(m for m in ('torch', 'ray', 'nnunetv2') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_local_out_and_work_are_made_absolute_for_the_workers(tmp_path: Path, monkeypatch):
    from mcs_batch.train.cli import absolute_local_paths
    from mcs_batch.train.weak.config import load_weak_config

    monkeypatch.chdir(tmp_path)  # Ray Train workers run elsewhere: "work" must not depend on the cwd
    cfg = absolute_local_paths(load_weak_config(source="out", target="lesion", work="weak/lesion"))
    assert cfg.source == str(tmp_path / "out") and cfg.work == str(tmp_path / "weak" / "lesion")
    remote = absolute_local_paths(load_weak_config(source="s3://b/out", target="lesion", work="s3://b/w"))
    assert (remote.source, remote.work) == ("s3://b/out", "s3://b/w")
    assert absolute_local_paths(load_weak_config(target="lesion")).work == ""  # unset stays unset
