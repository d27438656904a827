"""`python -m moe_bench.report SWEEP_DIR`: (re)build a sweep's report.html and print its path.

A missing directory or one that is not a sweep gets one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_bench.report",
        description="Write report.html and results.csv into a sweep directory.",
    )
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.sweep_dir)
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{parser.prog}: error: cannot write the report: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
