"""SQL over the rows of any number of sweeps: the DuckDB `rows` view (`moe_bench.results.connect`
builds it; docs/contract.md §5).

The view reads the jobs' Parquet part files in place (no copy; DuckDB reads only the columns and
row groups a query needs), and the `results.jsonl` of sweeps from before the part files. Each
row gets its job's `sweep` (the folder holding the job folder), `job_dir`, `arm_id` and `arm`
(`moe_bench.identity`: the job's config minus its seed), `commit` and `date` (job.json), and
its `status` and `error` are its job's ending, as `results.load` stamps them. `layer` is text
there ("0", "mean"). An example, the best validation loss of each arm over every sweep:

    from moe_bench import results
    con = results.connect("outputs")
    print(con.sql(query.BEST_VAL_LOSS).df())
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

# the README's example
BEST_VAL_LOSS = """\
SELECT arm, min(value) AS best_val_loss, count(DISTINCT sweep || '/' || job_dir) AS jobs
FROM rows
WHERE metric = 'val_loss' AND status = 'ok'
GROUP BY arm_id, arm
ORDER BY best_val_loss"""


def duckdb_module() -> Any:
    try:
        import duckdb
    except ImportError:
        raise ImportError(
            "moe_bench.results.connect needs duckdb: pip install duckdb (or moe-bench[query])"
        ) from None
    return duckdb


def _sources(files: pd.DataFrame) -> list[str]:
    """SELECTs of the raw rows, one per file kind, each with the file's `job_key`."""
    selects = []
    for kind, reader, options in (
        ("parquet", "read_parquet", "union_by_name = true, filename = true"),
        ("jsonl", "read_json", "format = 'newline_delimited', union_by_name = true, "
         "filename = true, sample_size = -1"),
    ):  # fmt: skip
        paths = files.loc[files["kind"] == kind, "filename"].tolist()
        if not paths:
            continue
        listed = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
        raw = f"{reader}([{listed}], {options})"
        selects.append(
            f"SELECT r.* EXCLUDE (filename), f.job_key FROM {raw} r JOIN files f USING (filename)"
        )
    return selects


def rows_view(files: pd.DataFrame, jobs: pd.DataFrame) -> Any:
    """An in-memory DuckDB connection with the `rows` view over `files` (filename, kind,
    job_key) and `jobs` (job_key and the columns every row of the job gets)."""
    duckdb = duckdb_module()
    con = duckdb.connect()
    for name, table in (("files", files), ("jobs", jobs)):  # copied: the view outlives them
        con.register(f"{name}_df", table)
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM {name}_df")
        con.unregister(f"{name}_df")
    selects = _sources(files) or ["SELECT NULL::BIGINT AS job_key WHERE false"]
    union = " UNION ALL BY NAME ".join(f"({s})" for s in selects)
    con.execute(f"CREATE VIEW raw_rows AS {union}")
    ends = "metric = 'job' AND status IN ('ok', 'failed')"
    con.execute(
        f"""CREATE VIEW rows AS
        WITH ends AS (SELECT job_key, status AS end_status, error AS end_error
                      FROM raw_rows WHERE {ends})
        SELECT r.* EXCLUDE (status, error, job_key),
               coalesce(e.end_status, r.status) AS status,
               CASE WHEN e.end_status IS NULL THEN r.error ELSE e.end_error END AS error,
               j.* EXCLUDE (job_key)
        FROM raw_rows r LEFT JOIN ends e USING (job_key) JOIN jobs j USING (job_key)"""
    )
    return con


def job_files(folder: Path, parts: list[Path], jsonl: Path) -> list[tuple[str, str]]:
    """(filename, kind) of a job's rows: its part files, else its results.jsonl."""
    if parts:
        return [(str(p), "parquet") for p in parts]
    return [(str(jsonl), "jsonl")] if jsonl.is_file() else []
