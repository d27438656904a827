"""Reading a job's records (docs/contract.md, sections 5 and 7): its rows, its state file and
state, and a sweep's rows. Torch-free: the report and the resume checks read through it; the
torch side that writes rows, env.json and the run card is `moe_bench.recorder`.

Every job writes into its own directory:
- `results.jsonl`: one JSON object per (metric, step, extra columns): the job's base columns
  (variant, task, backend, device, dtype, seed, params_total, params_active, flops_per_token,
  every config value as a dotted key), then metric, value, unit, step, status, error. Each job
  ends with one `job` row whose value is the job's wall time in seconds, whose status says
  how it ended and which carries the run card (`env.*`, `card.*`); a failed job marks every row
  `failed` and carries the error text.
- `env.json`: the machine and software the numbers came from, and the machine's load average
  before and after the job (`load_avg_before`, `load_avg_after`).
- `job.json`: the job's state file: `running` (with PID, host, start time) until it ends `ok` or
  `failed`; the hash of the config the rows came from (`config_key`), that config, and the code
  version (git commit). Resume compares it with the config it is asked to run.
All are written atomically (temp file in the same directory, then `os.replace`), so a reader
never sees a half-written file and a killed job leaves the previous file intact.

A job's state (`job_state`, docs/contract.md §7): `ok`/`failed` when its rows end with the
closing `job` row; `running` while its folder lock is held (`moe_bench.locks`); else
`incomplete` when anything of it is on disk (killed, or its rows were edited or cut).
Reading never raises on a bad file: `read_rows` returns the rows it could read and one
`path:line: what is wrong` per problem.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from moe_bench import locks, schema
from moe_bench.identity import config_hash, config_key
from moe_bench.schema import CORE_COLUMNS, REQUIRED_COLUMNS, ROW_STATUSES, STATUSES

RESULTS = "results.jsonl"
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


def read_rows(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of one results.jsonl and its problems, each `path:line: what is wrong`."""
    path = Path(path)
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
    rows, _ = read_rows(Path(out_dir) / RESULTS)
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
    path = out_dir / RESULTS
    if path.is_file():
        rows, problems = read_rows(path)
        end = None if problems else ending(rows)
        return end or "incomplete"
    return "incomplete" if (out_dir / STATE).is_file() else None


def git_commit() -> str | None:
    """The code version: the commit of the checkout moe_bench runs from (None outside git)."""
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


def _job_files(sweep_dir: str | Path, name: str) -> tuple[Path, list[Path]]:
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory: no sweep to read")

    def natural(path: Path) -> list[Any]:  # 2/ before 10/
        return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(path))]

    return root, sorted(root.rglob(name), key=natural)


def read_job(path: Path, root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One job's rows with its relative `job_dir`, or none at all when any line is bad."""
    rows, problems = read_rows(path)
    if problems:
        return [], problems
    job_dir = str(path.parent.relative_to(root))
    return [{**row, "job_dir": job_dir} for row in rows], []


def load(sweep_dir: str | Path, problems: list[str] | None = None) -> pd.DataFrame:
    """Every row of every results.jsonl under sweep_dir, with the job's relative `job_dir`.

    Rows are checked against the schema as they are read: a job with a bad line (not JSON, a
    required column missing, a value that is not a number, an unknown status or metric) is left
    out whole, and each problem, `path:line: what is wrong`, goes to `problems` (a warning when
    no list is given). The other jobs load as usual.
    """
    saved = saved_table(sweep_dir)
    if saved is not None:
        return saved
    root, files = _job_files(sweep_dir, RESULTS)
    if not files:
        raise ValueError(f"{root} is not a sweep directory: no {RESULTS} under it")
    rows = []
    for path in files:
        good, bad = read_job(path, root)
        rows.extend(good)
        for problem in bad:
            if problems is None:
                warnings.warn(problem, stacklevel=2)
            else:
                problems.append(problem)
    frame = pd.DataFrame(rows)
    for name in (*REQUIRED_COLUMNS, "unit", "step", "error", "job_dir"):  # absent: null
        if name not in frame.columns:
            frame[name] = None
    if "layer" in frame.columns:  # §5: an integer, or "mean"; pandas would make it float
        frame["layer"] = (
            frame["layer"]
            .map(lambda v: v if isinstance(v, str) or pd.isna(v) else int(v))
            .astype(object)
        )
    first = [c for c in (*CORE_COLUMNS, "job_dir") if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


SAVED = ("results.csv.gz", "results.csv")  # a report's tidy rows, compressed first


def saved_table(path: str | Path) -> pd.DataFrame | None:
    """The rows of a saved table: `path` itself when it is a .csv / .csv.gz file, or the first
    of SAVED in a directory without any results.jsonl (a committed example keeps only its
    compressed table). None when there is no such table."""
    path = Path(path)
    if path.is_dir():
        if next(path.rglob(RESULTS), None) is not None:
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
