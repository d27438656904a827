"""Reading a job's records (docs/contract.md, sections 5 and 7): its rows, its state file and
state, and a sweep's rows. Torch-free: the report and the resume checks read through it; the
torch side that writes rows, env.json and the run card is `moe_bench.recorder`.

Every job writes into its own directory:
- its rows, `rows-00000.parquet`, `rows-00001.parquet`, ... (`moe_bench.rows`: appended part by
  part as the job runs; sweeps written before the part files have one `results.jsonl`, still
  read): one row per (metric, step, extra columns): the job's base columns
  (variant, task, backend, device, dtype, seed, params_total, params_active, flops_per_token,
  every config value as a dotted key), then metric, value, unit, step, status, error. Each job
  ends with one `job` row whose value is the job's wall time in seconds, whose status says
  how it ended and which carries the run card (`env.*`, `card.*`); a failed job marks every row
  `failed` and carries the error text (the reader stamps every row with the `job` row's).
- `env.json`: the machine and software the numbers came from, and the machine's load average
  before and after the job (`load_avg_before`, `load_avg_after`).
- `job.json`: the job's state file: `running` (with PID, host, start time) until it ends `ok` or
  `failed`; the hash of the config the rows came from (`config_key`), that config, and the code
  version (git commit). Resume compares it with the config it is asked to run.
All are written atomically (temp file in the same directory, then `os.replace`), so a reader
never sees a half-written file and a killed job leaves what it wrote before intact.

A job's state (`job_state`, docs/contract.md §7): `ok`/`failed` when its rows end with the
closing `job` row; `running` while its folder lock is held (`moe_bench.locks`); else
`incomplete` when anything of it is on disk (killed, or its rows were edited or cut).
Reading never raises on a bad file: `read_rows` returns the rows it could read and one
`path:line: what is wrong` (a part file: `path: what is wrong`) per problem.

`connect(paths...)`: one DuckDB `rows` view over the part files of any number of sweeps.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import socket
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from moe_bench import identity, locks, query, schema
from moe_bench import rows as parts
from moe_bench.identity import config_hash, config_key
from moe_bench.schema import CORE_COLUMNS, REQUIRED_COLUMNS, ROW_STATUSES, STATUSES

RESULTS = "results.jsonl"  # a job's rows as JSON lines: sweeps from before the part files
ENV = "env.json"
STATE = "job.json"


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def completed(out_dir: str | Path) -> bool:
    """True when out_dir holds a finished ok job: its rows end with a `job` row whose status is
    ok. Rows flushed mid-run say `running`; a job killed before `finish` has no `job` row."""
    return job_state(out_dir) == "ok"


# --- reading rows: never raises, names path:line -------------------------------------------


def _row_problem(row: Any) -> str | None:
    """What makes one parsed line unusable, or None."""
    if not isinstance(row, dict):
        return f"not a JSON object but {type(row).__name__}"
    missing = [c for c in REQUIRED_COLUMNS if c not in row or (row[c] is None and c != "value")]
    if missing:
        return f"missing required column {', '.join(missing)}"
    value = row["value"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        return f"value={value!r} is not a number"
    if row["status"] not in ROW_STATUSES:
        return f"unknown status={row['status']!r} (one of {', '.join(ROW_STATUSES)})"
    if row["metric"] not in schema.METRICS:
        return f"unknown metric={row['metric']!r}"
    return None


def has_rows(out_dir: str | Path) -> bool:
    """Whether a job folder holds rows: part files, or a results.jsonl."""
    return bool(parts.part_files(out_dir)) or (Path(out_dir) / RESULTS).is_file()


def clear_rows(out_dir: str | Path) -> None:
    """Remove a job folder's rows (part files of every rank, an older results.jsonl)."""
    parts.clear(out_dir)
    (Path(out_dir) / RESULTS).unlink(missing_ok=True)


def read_rows(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a job folder (its part files, else its results.jsonl) or of one
    results.jsonl, and its problems, each `path:line: what is wrong` (`path: ...` for a part)."""
    path = Path(path)
    if path.is_dir():
        if parts.part_files(path):
            tables, problems = parts.read_tables(path)
            return parts.records(tables) if not problems else [], problems
        path = path / RESULTS
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [], [f"{path}: cannot read: {e}"]
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            problems.append(f"{path}:{number}: not JSON ({e}; a cut or edited line)")
            continue
        problem = _row_problem(row)
        if problem:
            problems.append(f"{path}:{number}: {problem}")
        else:
            rows.append(row)
    last_parsed = not problems or not problems[-1].startswith(f"{path}:{len(text.splitlines())}:")
    if text and not text.endswith("\n") and last_parsed:
        problems.append(f"{path}:{text.count(chr(10)) + 1}: last line has no newline (cut)")
    return rows, problems


def ending(rows: list[dict[str, Any]]) -> str | None:
    """How the job of these rows ended: the status of its closing `job` row, or None."""
    if rows and rows[-1]["metric"] == schema.JOB.name and rows[-1]["status"] in STATUSES:
        return rows[-1]["status"]
    return None


# --- the job's state file and config key ----------------------------------------------------


def config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """'seed: 0 -> 1, model.tokens: 256 -> 128': the keys whose values differ, changed first."""
    missing = object()
    changed = [k for k in sorted({*old, *new}) if old.get(k, missing) != new.get(k, missing)]
    changed.sort(key=lambda k: (k not in old or k not in new, k))  # both present first
    shown = [
        f"{k}: {old.get(k, '(absent)')!s} -> {new.get(k, '(absent)')!s}" for k in changed[:limit]
    ]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(shown) + more


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_state(out_dir: str | Path, state: str, key: dict[str, Any], **extra: Any) -> None:
    """Write out_dir/job.json: the state, who runs it, and the config key with its hash."""
    record = {
        "state": state,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": now(),  # when this state was written
        "config_hash": config_hash(key),
        "git_commit": git_commit(),
        **extra,
        "config": key,
    }
    atomic_write(Path(out_dir) / STATE, json.dumps(record, indent=1, default=str))


def read_state(out_dir: str | Path) -> dict[str, Any] | None:
    """out_dir/job.json, or None when absent or unreadable (an edited file never raises)."""
    try:
        record = json.loads((Path(out_dir) / STATE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def recorded_config(out_dir: str | Path) -> dict[str, Any] | None:
    """The config key of the results in out_dir: job.json's, else (a folder written before
    job.json existed) the base columns of its first row; None when nothing says."""
    state = read_state(out_dir)
    if state and isinstance(state.get("config"), dict):
        return state["config"]
    rows, _ = read_rows(out_dir)
    if not rows:
        return None
    own = {"metric", "value", "unit", "step", "status", "error"}
    return config_key(
        {k: v for k, v in rows[0].items() if "." in k or (k in CORE_COLUMNS and k not in own)}
    )


def job_state(out_dir: str | Path, probe_lock: bool = True) -> str | None:
    """running, ok, failed or incomplete (docs/contract.md §7); None when never started.

    `probe_lock=False` when the caller holds the job's lock itself (probing would see it held).
    """
    out_dir = Path(out_dir)
    if probe_lock and locks.is_held(out_dir):
        return "running"
    if parts.part_files(out_dir):
        end, problems = parts.end_state(out_dir)
        return (None if problems else end) or "incomplete"
    path = out_dir / RESULTS
    if path.is_file():
        rows, problems = read_rows(path)
        end = None if problems else ending(rows)
        return end or "incomplete"
    return "incomplete" if (out_dir / STATE).is_file() else None


@functools.cache
def git_commit() -> str | None:
    """The code version: the commit of the checkout moe_bench runs from (None outside git).
    Read once per process: a checkout moved on later does not change the code it imported."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def natural(path: Path) -> list[Any]:
    """Sort key putting job 2/ before 10/."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(path))]


def _job_files(sweep_dir: str | Path, name: str) -> tuple[Path, list[Path]]:
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory: no sweep to read")
    return root, sorted(root.rglob(name), key=natural)


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Every job folder under sweep_dir that holds rows (part files or a results.jsonl)."""
    root = Path(sweep_dir)
    found = {p.parent for name in (parts.GLOB, RESULTS) for p in root.rglob(name)}
    return sorted((d for d in found if has_rows(d)), key=natural)


def read_job(folder: Path, root: Path) -> tuple[pd.DataFrame | None, list[str]]:
    """One job's rows with its relative `job_dir`, or none at all when any of it is bad."""
    if parts.part_files(folder):
        tables, problems = parts.read_tables(folder)
        frame = None if problems else parts.frame(tables)
    else:
        rows, problems = read_rows(folder / RESULTS)
        frame = None if problems else pd.DataFrame(rows)
    if frame is None:
        return None, problems
    return frame.assign(job_dir=str(folder.relative_to(root))), []


def load(sweep_dir: str | Path, problems: list[str] | None = None) -> pd.DataFrame:
    """Every row of every job under sweep_dir (its part files, or an older sweep's
    results.jsonl), with the job's relative `job_dir`.

    Rows are checked against the schema as they are read: a job with a bad line or part (not
    JSON or Parquet, a required column missing, a value that is not a number, an unknown
    status or metric, a part missing) is left out whole, and each problem, `path:line: what is
    wrong`, goes to `problems` (a warning when no list is given). The other jobs load as usual.
    """
    saved = saved_table(sweep_dir)
    if saved is not None:
        return saved
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory: no sweep to read")
    folders = job_dirs(root)
    if not folders:
        raise ValueError(f"{root} is not a sweep directory: no {parts.GLOB} or {RESULTS} under it")
    frames = []
    for folder in folders:
        frame, bad = read_job(folder, root)
        if frame is not None:
            frames.append(frame)
        for problem in bad:
            if problems is None:
                warnings.warn(problem, stacklevel=2)
            else:
                problems.append(problem)
    # one frame of all jobs, typed as one frame of all their rows would be (a job whose
    # values are all null leaves an object column until inferred again)
    frame = pd.concat(frames, ignore_index=True).infer_objects() if frames else pd.DataFrame()
    for name in (*REQUIRED_COLUMNS, "unit", "step", "error", "job_dir"):  # absent: null
        if name not in frame.columns:
            frame[name] = None
    if "layer" in frame.columns:  # §5: an integer, or "mean" (text in the part files)
        frame["layer"] = frame["layer"].map(parts.layer_value).astype(object)
    first = [c for c in (*CORE_COLUMNS, "job_dir") if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def connect(*paths: str | Path) -> Any:
    """A DuckDB connection whose `rows` view holds every row of every job under `paths` (sweep
    folders, or folders of sweeps), each with its job's sweep, job_dir, arm_id, arm, state,
    commit and date (`moe_bench.query`). ValueError when a path is not a folder or holds no
    rows; ImportError (one line) without duckdb."""
    query.duckdb_module()
    folders = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory: no sweep to read")
        folders += job_dirs(path)
    if not folders:
        raise ValueError(f"no {parts.GLOB} or {RESULTS} under {', '.join(map(str, paths))}")
    jobs, files, keys = [], [], {}
    for number, folder in enumerate(dict.fromkeys(folders)):
        state = read_state(folder) or {}
        config = {k: v for k, v in (recorded_config(folder) or {}).items() if v is not None}
        arm = identity.arm_hash(config)
        keys[arm] = identity.arm_key(config)
        jobs.append(
            {
                "job_key": number,
                "sweep": str(folder.parent),
                "job_dir": folder.name,
                "arm_id": arm,
                "state": job_state(folder),
                "commit": state.get("git_commit"),
                "date": state.get("time"),
            }
        )
        found = query.job_files(folder, parts.part_files(folder), folder / RESULTS)
        files += [{"filename": f, "kind": kind, "job_key": number} for f, kind in found]
    jobs_frame = pd.DataFrame(jobs)
    jobs_frame["arm"] = jobs_frame["arm_id"].map(identity.arm_labels(keys))
    return query.rows_view(pd.DataFrame(files), jobs_frame)


SAVED = ("results.csv.gz", "results.csv")  # a report's tidy rows, compressed first


def saved_table(path: str | Path) -> pd.DataFrame | None:
    """The rows of a saved table: `path` itself when it is a .csv / .csv.gz file, or the first
    of SAVED in a directory without any results.jsonl (a committed example keeps only its
    compressed table). None when there is no such table."""
    path = Path(path)
    if path.is_dir():
        if job_dirs(path):
            return None
        path = next((path / name for name in SAVED if (path / name).is_file()), path)
    if not (path.is_file() and path.name.endswith((".csv", ".csv.gz"))):
        return None
    # the run card's machine facts stay as written ("13.0" is a CUDA version, not 13)
    header = pd.read_csv(path, nrows=0).columns
    text = {c: str for c in header if c.startswith("env.")}
    frame = pd.read_csv(path, low_memory=False, dtype=text)  # gzip inferred from the suffix
    frame = frame.astype(object).where(frame.notna(), None)
    for col in ("value", "step", "seed", "params_total", "params_active", "flops_per_token"):
        if col in frame.columns:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    if "job_dir" in frame.columns:
        frame["job_dir"] = frame["job_dir"].astype(str)
    if "layer" in frame.columns:  # written as 0, 1, "mean": integers back, "mean" kept
        frame["layer"] = frame["layer"].map(
            lambda v: v if v is None or not str(v).lstrip("-").isdigit() else int(v)
        )
    return frame


def load_env(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable env.json under sweep_dir, each with its relative `job_dir`."""
    root, files = _job_files(sweep_dir, ENV)
    envs = []
    for path in files:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # the report flags jobs without a readable env.json
        if isinstance(record, dict):
            envs.append({**record, "job_dir": str(path.parent.relative_to(root))})
    return envs
