"""Join the rows of several sweeps (or saved rows files) into one rows file, each part's
`job_dir` prefixed so its jobs stay apart, for a committed report built from runs made at
different times (reports/claims/README.md).

    python scripts/join_rows.py OUT.csv.gz reports/claims/results.csv.gz training=SWEEP ...

A part is `PATH` (job_dir kept) or `PREFIX=PATH` (job_dir becomes `PREFIX/job_dir`); PATH is a
sweep folder or a results.csv[.gz] (`moe_bench.results.load` reads both). Two parts with the
same job_dir after prefixing are an error (one job's rows would merge into another's). The
output is written whole, then moved into place.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from moe_bench import results


def part(spec: str) -> tuple[str, Path]:
    prefix, _, path = spec.rpartition("=")
    return prefix, Path(path)


def join(parts: list[tuple[str, Path]]) -> pd.DataFrame:
    frames = []
    seen: dict[str, str] = {}
    for prefix, path in parts:
        frame = results.load(path)
        if prefix:
            frame["job_dir"] = prefix + "/" + frame["job_dir"].astype(str)
        for job in frame["job_dir"].astype(str).unique():
            if job in seen:
                raise ValueError(f"job_dir {job!r} is in both {seen[job]} and {path}")
            seen[job] = str(path)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True, sort=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/join_rows.py", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("parts", nargs="+", help="PATH or PREFIX=PATH")
    args = parser.parse_args(argv)
    try:
        frame = join([part(p) for p in args.parts])
    except (OSError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    tmp = args.out.with_name(args.out.name + ".tmp")
    gzip = {"method": "gzip", "mtime": 0} if args.out.name.endswith(".gz") else None
    frame.to_csv(tmp, index=False, compression=gzip)
    os.replace(tmp, args.out)
    print(f"{len(frame)} rows, {frame['job_dir'].nunique()} jobs -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
