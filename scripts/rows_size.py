"""Bytes on disk and load / report-build time of a sweep's rows as JSON lines and as Parquet
part files (README, "Where results live").

    python scripts/rows_size.py SRC [--copies N] [--repeats 3] [--work DIR]

SRC: a sweep folder (job folders with results.jsonl or part files) or a saved results.csv[.gz]
(split into its jobs by `job_dir`). Each job's rows are written both ways into --work: one
results.jsonl (as the recorder wrote them before the part files: one JSON object per row; rows
from a saved table leave out their null cells outside the core columns, since a CSV cannot say
which keys a row had), and part files cut where task=convergence flushes (after each
evaluation's rows). `--copies N` repeats every job N times (a sweep of N seeds' worth of rows).
Then, interleaved (JSON lines, Parquet, JSON lines, ...) `--repeats` times, it times
`results.load` and `build_report` (which also writes results.csv beside the report) on each,
and prints sizes and median times.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from moe_bench import results
from moe_bench import rows as parts
from moe_bench.report.render import build_report
from moe_bench.schema import CORE_COLUMNS

EVALUATION = ("val_loss", "val_ppl", "max_vio_global", "expert_load")


def source_jobs(src: Path) -> dict[str, list[dict[str, Any]]]:
    """job_dir -> its rows as the recorder logged them."""
    if src.is_dir() and results.job_dirs(src):
        out = {}
        for folder in results.job_dirs(src):
            rows, problems = results.read_rows(folder)
            if problems:
                raise SystemExit(f"{folder}: {problems[0]}")
            out[str(folder.relative_to(src))] = rows
        return out
    frame = results.saved_table(src)
    if frame is None:
        raise SystemExit(f"{src}: neither a sweep folder nor a saved results.csv[.gz]")
    out = {}
    for job, part in frame.groupby("job_dir", sort=False):
        records = part.drop(columns="job_dir").to_dict("records")
        out[str(job)] = [
            {k: v for k, v in r.items() if k in CORE_COLUMNS or not _null(v)} for r in records
        ]
    return out


def _null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def flushes(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The rows in parts cut after each evaluation block (where task=convergence flushes)."""
    chunks, start = [], 0
    for i, row in enumerate(rows[:-1]):
        if row["metric"] in EVALUATION and rows[i + 1]["metric"] not in EVALUATION:
            chunks.append(rows[start : i + 1])
            start = i + 1
    return [*chunks, rows[start:]]


def write(jobs: dict[str, list[dict]], work: Path, copies: int) -> tuple[Path, Path]:
    jsonl, parquet = work / "jsonl", work / "parquet"
    for root in (jsonl, parquet):
        shutil.rmtree(root, ignore_errors=True)
    n = 0
    for rows in jobs.values():
        clean = [{k: (None if _null(v) else v) for k, v in r.items()} for r in rows]
        for _ in range(copies):
            (jsonl / str(n)).mkdir(parents=True)
            text = "".join(json.dumps(r) + "\n" for r in clean)
            (jsonl / str(n) / results.RESULTS).write_text(text)
            for number, chunk in enumerate(flushes(clean)):
                parts.write_part(parquet / str(n), number, chunk)
            n += 1
    return jsonl, parquet


def size(root: Path) -> int:
    return sum(p.stat().st_size for g in (parts.GLOB, results.RESULTS) for p in root.rglob(g))


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", type=Path)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rows_size_"))
    jobs = source_jobs(args.src)
    jsonl, parquet = write(jobs, work, args.copies)
    count = sum(len(r) for r in jobs.values()) * args.copies
    print(f"{len(jobs) * args.copies} jobs, {count} rows, from {args.src}")
    times: dict[str, dict[str, list[float]]] = {"load": {}, "report": {}}
    for _ in range(args.repeats):
        for name, root in (("jsonl", jsonl), ("parquet", parquet)):
            times["load"].setdefault(name, []).append(timed(lambda r=root: results.load(r)))
            times["report"].setdefault(name, []).append(timed(lambda r=root: build_report(r)))
    a, b = size(jsonl), size(parquet)
    print(f"bytes: JSON lines {a:,} ({a / 2**20:.1f} MiB), Parquet {b:,} ({b / 2**20:.1f} MiB),")
    print(f"       {a / b:.1f}x smaller; {sum(1 for _ in parquet.rglob(parts.GLOB))} part files")
    for what, by in times.items():
        j, p = statistics.median(by["jsonl"]), statistics.median(by["parquet"])
        runs = (
            ", ".join(f"{t:.2f}" for t in by["jsonl"]),
            ", ".join(f"{t:.2f}" for t in by["parquet"]),
        )
        print(
            f"{what}: JSON lines {j:.2f} s [{runs[0]}], Parquet {p:.2f} s [{runs[1]}]: {j / p:.1f}x"
        )


if __name__ == "__main__":
    main()
