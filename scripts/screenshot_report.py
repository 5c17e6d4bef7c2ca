"""Screenshot a QC report in headless Chromium, to look at it as a person would (not used by CI).

    .venv/bin/python scripts/screenshot_report.py OUT_OR_REPORT [--png report.png] [--width 1400] [--height 4000]

OUT_OR_REPORT is a local report file, or a local OUT whose newest OUT/qc/report-*.html is taken.
Needs Debian's `chromium` package (`apt-get install -y chromium`); says so and exits 2 without it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def newest_report(path: Path) -> Path:
    if path.is_file():
        return path
    reports = sorted((path / "qc").glob("report-*.html"))
    if not reports:
        sys.exit(f"screenshot_report: no report under {path}/qc (run `mcs-batch report {path}` first)")
    return reports[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a report .html or a local OUT")
    parser.add_argument("--png", type=Path, default=Path("report.png"), help="screenshot to write")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=4000, help="window height: what the screenshot shows")
    args = parser.parse_args()
    browser = next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        print("screenshot_report: no chromium here (apt-get install -y chromium)", file=sys.stderr)
        return 2
    report = newest_report(args.path).resolve()
    with tempfile.TemporaryDirectory() as profile:  # a throwaway profile: nothing of the host's browser
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--window-size={args.width},{args.height}",
                   f"--screenshot={args.png.resolve()}", report.as_uri()]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode or not args.png.exists():
        print(f"screenshot_report: chromium failed ({done.returncode}): {done.stderr.strip()[-500:]}", file=sys.stderr)
        return 2
    print(f"{report} -> {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
