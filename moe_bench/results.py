"""Tidy result rows (docs/contract.md, section 5): one job's Recorder, env.json, and a sweep's
loader. Metric names, units and columns come from `moe_bench.schema`.

Every job writes into its own directory:
- `results.jsonl`: one JSON object per (metric, step, extra columns): the job's base columns
  (variant, task, backend, device, dtype, seed, params_total, params_active, flops_per_token,
  every config value as a dotted key), then metric, value, unit, step, status, error. Each job
  ends with one `job` row whose value is the job's wall time in seconds and whose status says
  how it ended; a failed job marks every row `failed` and carries the error text.
- `env.json`: the machine and software the numbers came from, and the machine's load average
  before and after the job (`load_avg_before`, `load_avg_after`).
Both are written atomically (temp file in the same directory, then `os.replace`), so a reader
never sees a half-written file and a killed job leaves the previous file intact.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from moe_bench import schema
from moe_bench.schema import CORE_COLUMNS, STATUSES, Metric

RESULTS = "results.jsonl"
ENV = "env.json"


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_value(value: Any) -> Any:
    """JSON-ready cell: non-finite floats become null, tensors and numpy scalars Python."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Recorder:
    """Collects tidy rows for one job and writes them atomically into out_dir/results.jsonl."""

    def __init__(self, out_dir: str | Path, base: dict[str, Any]) -> None:
        self.path = Path(out_dir) / RESULTS
        self.base = dict(base)
        self.rows: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def log(self, metric: str | Metric, value: float, **columns: Any) -> None:
        """Add one row of a schema metric (its unit from the schema); columns: step, layer, ..."""
        row = {**self.base, **schema.row(metric, value, **columns)}
        row.update(status="ok", error=None)
        self.rows.append({k: _json_value(v) for k, v in row.items()})

    def flush(self) -> None:
        """Rewrite results.jsonl atomically with every row so far."""
        text = "".join(json.dumps(row) + "\n" for row in self.rows)
        atomic_write(self.path, text)

    def finish(self, status: str = "ok", error: str | None = None) -> None:
        """Stamp every row with the job's status and error, add the `job` row, write."""
        if status not in STATUSES:
            raise ValueError(f"status={status!r} is not one of {', '.join(map(repr, STATUSES))}")
        self.log(schema.JOB, time.perf_counter() - self.started)
        for row in self.rows:
            row.update(status=status, error=error)
        self.flush()


def completed(out_dir: str | Path) -> bool:
    """True when out_dir/results.jsonl ends a finished job: its `job` row has status ok.

    Rows flushed while a job runs carry status ok too; a job killed before `finish` has no
    `job` row and runs again.
    """
    path = Path(out_dir) / RESULTS
    if not path.is_file():
        return False
    rows = (json.loads(line) for line in path.read_text().splitlines())
    return any(r.get("metric") == "job" and r.get("status") == "ok" for r in rows)


def _git_commit() -> str | None:
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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average (runnable processes); None where the OS keeps none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and software of this process (env.json)."""
    cuda = device.type == "cuda"
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cpu_model": _cpu_model(),
        "gpu_model": torch.cuda.get_device_name(device) if cuda else None,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "load_avg_before": load_average(),  # the job adds load_avg_after (update_env)
        "git_commit": _git_commit(),
        "command": shlex.join(sys.orig_argv),
    }


def write_env(out_dir: str | Path, device: torch.device, **extra: Any) -> None:
    atomic_write(Path(out_dir) / ENV, json.dumps({**environment(device), **extra}, indent=2))


def update_env(out_dir: str | Path, **fields: Any) -> None:
    """Add fields to out_dir/env.json (e.g. load_avg_after once the job's work is done)."""
    path = Path(out_dir) / ENV
    env = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write(path, json.dumps({**env, **fields}, indent=2))


def _job_files(sweep_dir: str | Path, name: str) -> tuple[Path, list[Path]]:
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory: no sweep to read")

    def natural(path: Path) -> list[Any]:  # 2/ before 10/
        return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(path))]

    return root, sorted(root.rglob(name), key=natural)


def load(sweep_dir: str | Path) -> pd.DataFrame:
    """Every row of every results.jsonl under sweep_dir, with the job's relative `job_dir`."""
    root, files = _job_files(sweep_dir, RESULTS)
    if not files:
        raise ValueError(f"{root} is not a sweep directory: no {RESULTS} under it")
    rows = []
    for path in files:
        job_dir = str(path.parent.relative_to(root))
        rows.extend({**json.loads(line), "job_dir": job_dir} for line in path.open())
    frame = pd.DataFrame(rows)
    if "layer" in frame.columns:  # §5: an integer, or "mean"; pandas would make it float
        frame["layer"] = (
            frame["layer"]
            .map(lambda v: v if isinstance(v, str) or pd.isna(v) else int(v))
            .astype(object)
        )
    first = [c for c in (*CORE_COLUMNS, "job_dir") if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def load_env(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every env.json under sweep_dir, each with its relative `job_dir`."""
    root, files = _job_files(sweep_dir, ENV)
    return [
        {**json.loads(p.read_text()), "job_dir": str(p.parent.relative_to(root))} for p in files
    ]
