"""`python -m moe_bench.report SWEEP_DIR`: (re)build a sweep's report.html and print its path.
`python -m moe_bench.report BASE CANDIDATE ...` (or `--compare`): compare sweeps matched by
config, write compare.html (in the last sweep, or `--out`) and print the table and its path.

A missing directory or one that is not a sweep gets one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .compare import compare
from .render import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_bench.report",
        description="Write report.html and results.csv into a sweep directory; with several "
        "sweeps, compare them (the first is the baseline).",
    )
    parser.add_argument("sweep_dir", type=Path, nargs="+", help="Hydra multirun directories")
    parser.add_argument("--compare", action="store_true", help="compare even a single sweep")
    parser.add_argument("--out", type=Path, default=None, help="where compare.html goes")
    parser.add_argument("--gzip", action="store_true", help="write results.csv.gz instead")
    args = parser.parse_args(argv)
    try:
        if len(args.sweep_dir) > 1 or args.compare:
            path, text = compare(args.sweep_dir, args.out)
            print(text)
        else:
            path = build_report(args.sweep_dir[0], gzip_csv=args.gzip)
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
