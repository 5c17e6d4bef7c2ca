"""The command line as ops use it: exit codes, one-line errors, the scan summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mcs_batch.testdata.series import write_series

CLI = [sys.executable, "-m", "mcs_batch.cli"]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
ENV.pop("RAY_ADDRESS", None)


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("scan", "sample", "demo"):
        assert command in out.stdout


def test_missing_input_prints_one_line_and_exits_2(tmp_path: Path):
    out = run("scan", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--num-cpus", "1")
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("mcs-batch: error:")]
    assert errors == [f"mcs-batch: error: {tmp_path / 'missing'}: input does not exist"]
    assert "Traceback" not in out.stderr


def test_bad_arguments_exit_2():
    out = run("scan")
    assert out.returncode == 2 and "usage:" in out.stderr


def test_scan_prints_a_summary(tmp_path: Path):
    write_series(tmp_path / "in", n_slices=4)
    (tmp_path / "in" / "junk.dcm").write_bytes(b"\x00" * 500)
    out = run("scan", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--num-cpus", "2", "--object-store-mb", "256")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "scanned 5 objects into 2 cases" in out.stdout
    assert "status:   failed 1, ok 1" in out.stdout
    assert "errors:   not_dicom 1" in out.stdout
    assert list((tmp_path / "o" / "manifest").glob("*.parquet"))


def test_ray_datas_own_progress_logs_only_with_verbose():
    import logging

    from ray.data import DataContext

    from mcs_batch.cli import build_parser
    from mcs_batch.cluster import quiet_ray_data

    assert build_parser().parse_args(["segment", "in", "--out", "o", "--verbose"]).verbose is True
    assert build_parser().parse_args(["segment", "in", "--out", "o"]).verbose is False
    ctx, logger = DataContext.get_current(), logging.getLogger("ray.data")
    before = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start, logger.level)
    try:
        quiet_ray_data()  # what start_ray does without --verbose, before the job's datasets exist
        assert not (ctx.enable_progress_bars or ctx.enable_operator_progress_bars or ctx.print_on_execution_start)
        assert not logger.isEnabledFor(logging.INFO)  # the per-operator progress lines are INFO
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start = before[:3]
        logger.setLevel(before[3])


def test_a_malformed_shard_prints_one_line_and_exits_2(tmp_path: Path):
    (tmp_path / "in").mkdir()
    out = run("segment", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--models", "tiny", "--prompt", "x",
              "--shard", "3/2")  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("mcs-batch: error:")]
    assert errors == ["mcs-batch: error: resources.shard: expected 'i/N' with 1 <= i <= N (e.g. 2/4), got '3/2'"]
    assert not (tmp_path / "o").exists()
