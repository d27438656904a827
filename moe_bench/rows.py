"""A job's rows on disk: numbered Parquet part files `rows-00000.parquet`, `rows-00001.parquet`,
... in its folder (docs/contract.md §5). Torch-free; `moe_bench.results` reads through it.

Why parts: a job appends its rows as it runs. Each flush writes the rows logged since the last
one as the next part (a temp file in the same folder, then a rename), so a reader never sees a
half-written part, a killed job keeps every part it wrote and loses at most the rows since its
last flush, and no flush rewrites what is already on disk (a JSON-lines file had to be rewritten
whole at every flush). Parquet is columnar and compressed: a sweep's rows are a fraction of
their JSON-lines size and load without parsing text (numbers: README, "Where results live").

Statuses: rows are written saying `running`; the closing `job` row, in the last part, says how
the job ended, and the reader stamps every row of the job with its status and error, so a job
has one ending as its JSON-lines rows had. Parts must be numbered 0, 1, ... without a gap.

Column types: `schema.COLUMN_TYPES`; any other column takes the type of its values in a part.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moe_bench import schema

PREFIX = "rows"  # rank 0's parts (ranks > 0 of a multi-process job: rows.rank<N>-*.parquet)
GLOB = "rows-*.parquet"
NAME = re.compile(r"rows-(\d{5,})\.parquet")
COMPRESSION = "zstd"
TEXT = tuple(c for c, t in schema.COLUMN_TYPES.items() if t == "string")


def part_name(number: int, prefix: str = PREFIX) -> str:
    return f"{prefix}-{number:05d}.parquet"


def part_files(out_dir: str | Path) -> list[Path]:
    """The job's rank-0 parts, in order of their number."""
    found = [(NAME.fullmatch(p.name), p) for p in Path(out_dir).glob(GLOB)]
    return [p for _, p in sorted((int(m.group(1)), p) for m, p in found if m)]


def to_table(records: list[dict[str, Any]]) -> pa.Table:
    """Rows as one Arrow table: schema types where the schema names the column."""
    names = list(dict.fromkeys(k for r in records for k in r))
    arrays = []
    for name in names:
        values = [r.get(name) for r in records]
        if name in TEXT:  # `layer`: 0, 1, "mean" as text
            values = [v if v is None or isinstance(v, str) else str(v) for v in values]
        kind = schema.COLUMN_TYPES.get(name)
        try:
            arrays.append(pa.array(values, type=pa.type_for_alias(kind) if kind else None))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise ValueError(
                f"column {name!r} holds values of several types in one job ({e}); "
                "give it a type in schema.COLUMN_TYPES"
            ) from None
    return pa.table(arrays, names=names)


def write_part(
    out_dir: str | Path, number: int, records: list[dict[str, Any]], prefix: str = PREFIX
) -> Path:
    """Write records as part `number` atomically; part 0 first removes this prefix's old
    parts (a job run again never mixes with its earlier rows)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if number == 0:
        for old in out_dir.glob(f"{prefix}-*.parquet"):
            old.unlink(missing_ok=True)
    path = out_dir / part_name(number, prefix)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(to_table(records), tmp, compression=COMPRESSION)
    os.replace(tmp, path)
    return path


def clear(out_dir: str | Path) -> None:
    """Remove every part file of the folder (all ranks)."""
    for path in Path(out_dir).glob("rows*.parquet"):
        path.unlink(missing_ok=True)


def _gap(paths: list[Path]) -> list[str]:
    """A part missing from the numbering 0, 1, ... (its rows are lost): the first one."""
    for expected, path in enumerate(paths):
        if int(NAME.fullmatch(path.name).group(1)) != expected:
            lost = path.with_name(part_name(expected))
            return [f"{lost}: missing (parts up to {paths[-1].name} found); its rows are lost"]
    return []


def _table_problem(path: Path, table: pa.Table) -> str | None:
    """What makes a part unusable (a required column missing or null, a value that is not a
    number, an unknown status or metric), or None."""
    missing = [c for c in schema.REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        return f"{path}: missing required column {', '.join(missing)}"
    for name in schema.REQUIRED_COLUMNS:
        if name != "value" and table[name].null_count:
            return f"{path}: missing required column {name} in {table[name].null_count} rows"
    if not (pa.types.is_floating(table["value"].type) or pa.types.is_integer(table["value"].type)):
        return f"{path}: value is {table['value'].type}, not a number"
    for name, known in (("status", schema.ROW_STATUSES), ("metric", schema.METRICS)):
        bad = sorted(set(pc.unique(table[name]).to_pylist()) - set(known))
        if bad:
            return f"{path}: unknown {name}={bad[0]!r}"
    return None


def read_tables(out_dir: str | Path) -> tuple[list[pa.Table], list[str]]:
    """The job's parts as Arrow tables, and `path: what is wrong` per problem (a part that is
    not Parquet, a gap in the numbering, a bad column): any problem makes the job unreadable."""
    paths = part_files(out_dir)
    tables, problems = read_tables_of(paths)
    return tables, _gap(paths) + problems


def read_tables_of(paths: list[Path]) -> tuple[list[pa.Table], list[str]]:
    tables, problems = [], []
    for path in paths:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            problems.append(f"{path}: not a readable Parquet part ({e})")
            continue
        problem = _table_problem(path, table)
        if problem:
            problems.append(problem)
        tables.append(table)
    return tables, problems


def ending(tables: list[pa.Table]) -> tuple[str, str | None] | None:
    """(status, error) of the closing `job` row at the end of the last part, or None."""
    if not tables or not tables[-1].num_rows:
        return None
    last = tables[-1].slice(tables[-1].num_rows - 1).to_pylist()[0]
    if last["metric"] == schema.JOB.name and last["status"] in schema.STATUSES:
        return last["status"], last.get("error")
    return None


def end_state(out_dir: str | Path) -> tuple[str | None, list[str]]:
    """How the job ended (its closing row's status, None without one) and its parts' problems,
    reading the last part only (the others' footers are checked): a job's state cheaply."""
    paths = part_files(out_dir)
    problems = _gap(paths)
    for path in paths[:-1]:
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowException) as e:
            problems.append(f"{path}: not a readable Parquet part ({e})")
    tables, last = read_tables_of(paths[-1:])
    end = ending(tables)
    return (end[0] if end else None), problems + last


def layer_value(value: Any) -> Any:
    """A `layer` cell as §5 has it: an integer, "mean", or null."""
    if isinstance(value, str):
        return int(value) if value.lstrip("-").isdigit() else value
    return value if value is None or value != value else int(value)  # NaN != NaN


def records(tables: list[pa.Table]) -> list[dict[str, Any]]:
    """The job's rows as dicts, stamped with its ending (each row keeps its part's columns)."""
    end = ending(tables)
    out = [row for table in tables for row in table.to_pylist()]
    for row in out:
        if end:
            row["status"], row["error"] = end
        if "layer" in row:
            row["layer"] = layer_value(row["layer"])
    return out


def frame(tables: list[pa.Table]) -> pd.DataFrame:
    """The job's rows as one frame, stamped with its ending."""
    table = pa.concat_tables(tables, promote_options="permissive")
    out = table.to_pandas()
    for name in table.column_names:  # no value in this job: NaN, as pandas makes of absent keys
        if pa.types.is_null(table[name].type):
            out[name] = float("nan")
    end = ending(tables)
    if end:
        out["status"] = end[0]
        out["error"] = end[1]
    return out
