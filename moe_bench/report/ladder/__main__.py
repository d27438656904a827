"""`python -m moe_bench.report.ladder OUT --ladder DIR... [--causes DIR...] [--grid DIR...]`:
write OUT/README.md (the ladder table, crossovers, dense's flattening, the cause table) and
OUT/ladder.svg (the figure, drawn from the table) from sweeps or saved results.csv[.gz]."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from moe_bench import results

from .figure import svg
from .page import FIGURE, page


def _load(paths: list[str]) -> pd.DataFrame | None:
    """The rows of every path, job_dir prefixed by the path so jobs stay apart."""
    if not paths:
        return None
    parts = [results.load(p).assign(job_dir=lambda f, p=p: p + "/" + f["job_dir"].astype(str))
             for p in paths]  # fmt: skip
    return pd.concat(parts, ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_bench.report.ladder", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--ladder", nargs="+", required=True, help="the ladder_* sweeps")
    parser.add_argument("--causes", nargs="*", default=[], help="ladder_causes sweeps")
    parser.add_argument("--grid", nargs="*", default=[], help="ladder_grid sweeps")
    args = parser.parse_args(argv)
    try:
        ladder, causes, grid = (_load(p) for p in (args.ladder, args.causes, args.grid))
    except (OSError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    text, rows = page(ladder, causes, grid)
    args.out.mkdir(parents=True, exist_ok=True)
    if not rows.empty and (rows["n"] >= 2).any():
        figure, _ = svg(rows)
        (args.out / FIGURE).write_text(figure)
    else:
        text = text.replace(f"![d against tokens]({FIGURE})", "(no figure: needs 2+ seeds)")
    tmp = args.out / "README.md.tmp"
    tmp.write_text(text)
    tmp.replace(args.out / "README.md")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
