"""The `mcs-batch` command line: the only place that reads argv and the environment."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print("mcs-batch: commands are being built", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
