"""The writing side of a job's rows: the Recorder (results.jsonl) and env.json (the machine
and software of the numbers). Imports torch (versions, device names); the reading side,
torch-free, is `moe_bench.results`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moe_bench import schema
from moe_bench.identity import json_value
from moe_bench.results import ENV, RESULTS, atomic_write, git_commit
from moe_bench.schema import STATUSES, Metric


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
        row.update(status="running", error=None)  # until finish() says how the job ended
        self.rows.append({k: json_value(v) for k, v in row.items()})

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
        "git_commit": git_commit(),
        "command": shlex.join(sys.orig_argv),
    }


def write_env(out_dir: str | Path, device: torch.device, **extra: Any) -> None:
    atomic_write(Path(out_dir) / ENV, json.dumps({**environment(device), **extra}, indent=2))


def update_env(out_dir: str | Path, **fields: Any) -> None:
    """Add fields to out_dir/env.json (e.g. load_avg_after once the job's work is done)."""
    path = Path(out_dir) / ENV
    env = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write(path, json.dumps({**env, **fields}, indent=2))
