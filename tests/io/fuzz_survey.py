"""Survey: N random examples of each fuzz strategy, counting distinct findings instead of stopping at
the first (the test stops and shrinks). `python -m tests.io.fuzz_survey 2000`."""

from __future__ import annotations

import re
import sys
import warnings
from collections import Counter

from hypothesis import HealthCheck, given, settings

from tests.io.test_header_fuzz import dicom_archive, nifti_file, png_file, run_archive


def signature(finding: str) -> str:
    """A finding without the file it came from and without numbers: one line per kind of crash."""
    finding = re.sub(r"file://\S+?: ", "", finding)
    return re.sub(r"[-+]?\d[\d.e+-]*", "N", finding)[:110]


def survey(strategy, n: int) -> tuple[int, Counter]:
    found: Counter = Counter()
    runs = 0

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(files=strategy)
    def body(files):
        nonlocal runs
        runs += 1
        for finding in run_archive(files):
            found[signature(finding)] += 1

    body()
    return runs, found


def main(n: int) -> None:
    warnings.simplefilter("ignore")
    for name, strategy in (("dicom", dicom_archive()), ("nifti", nifti_file()), ("png", png_file())):
        runs, found = survey(strategy, n)
        print(f"{name}: {runs} examples, {sum(found.values())} findings, {len(found)} distinct")
        for signature, count in found.most_common():
            print(f"  {count:5d}  {signature}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
