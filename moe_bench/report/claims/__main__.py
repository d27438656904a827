"""`python -m moe_bench.report.claims SWEEP_DIR`: print the paper claims a sweep (or a saved
results.csv[.gz]) covers, with verdicts, as a markdown table and the rule."""

from __future__ import annotations

import argparse
import sys

from moe_bench import results

from . import markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_bench.report.claims",
        description="Print the paper claims a sweep covers, with verdicts, as a markdown table.",
    )
    parser.add_argument("sweep_dir", help="a Hydra multirun directory (or a saved report's)")
    args = parser.parse_args(argv)
    try:
        frame = results.load(args.sweep_dir)
    except (OSError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    text = markdown(frame)
    none = f"{args.sweep_dir}: no claim of moe_bench/report/claims/registry.py is covered"
    print(text or none)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
