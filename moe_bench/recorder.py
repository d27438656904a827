"""Writing a job's records (docs/contract.md, section 5): its rows, env.json, and the run card.

The torch side of `moe_bench.results` (which reads them back without torch). A `Recorder`
collects one job's tidy rows; each `flush` appends the rows since the last one as the next
Parquet part file (`moe_bench.rows`: rows-00000.parquet, ..., each written atomically); `finish`
adds the closing `job` row, which says how the job ended and carries the run card:
- `env.*`: the machine and software the job ran on (`env_card`), so that a report rebuilt from
  its saved results.csv alone still says where its numbers came from;
- `card.*`: what the job's task asks and how its variant normalises its losses (given by the
  runner, from the task object and the layer config).
Card columns never enter a config identity (`moe_bench.identity.CARD_PREFIXES`).
Live loggers (`moe_bench.loggers`) sit in `sinks`: they see each row of rank 0 as it is logged.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from moe_bench import rows as parts
from moe_bench import schema
from moe_bench.identity import json_value
from moe_bench.results import ENV, atomic_write, git_commit, now
from moe_bench.schema import STATUSES, Metric

SHORT_COMMIT = 10  # hex digits of the commit shown in the card


class Recorder:
    """Collects tidy rows for one job and appends them to out_dir as Parquet part files.

    `card`: the job's `card.*` columns, written on its closing `job` row with its `env.*`;
    `metrics`: the names its task writes (`Task.metric_names`; None: any schema metric);
    `prefix`: the part files' name (`rows`; ranks > 0 of a multi-process job: `rows.rank<N>`).
    """

    def __init__(
        self,
        out_dir: str | Path,
        base: dict[str, Any],
        card: dict[str, Any] | None = None,
        metrics: Collection[str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.prefix = parts.PREFIX
        self.parts = 0  # part files written
        self.written = 0  # rows in them
        self.sinks: list[Any] = []  # live loggers: .row(row), .close()
        self.base = dict(base)
        self.card = dict(card or {})
        self.metrics = metrics
        self.rows: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.load_before = load_average()

    def log(self, metric: str | Metric, value: float, **columns: Any) -> None:
        """Add one row of a schema metric (its unit from the schema); columns: step, layer, ..."""
        name = schema.metric(metric).name
        if self.metrics is not None and name not in self.metrics:
            raise ValueError(
                f"metric={name!r} is not one of the metrics of task={self.base.get('task')!r} "
                f"({', '.join(sorted(self.metrics))}); list it in its Task's metrics"
            )
        row = {**self.base, **schema.row(metric, value, **columns)}
        row.update(status="running", error=None)  # until finish() says how the job ended
        self.rows.append({k: json_value(v) for k, v in row.items()})
        if self.prefix == parts.PREFIX:
            for sink in self.sinks:
                sink.row(self.rows[-1])

    def flush(self) -> None:
        """Append the rows logged since the last flush as the next part file (atomically)."""
        if self.written == len(self.rows):
            return
        parts.write_part(self.out_dir, self.parts, self.rows[self.written :], self.prefix)
        self.parts += 1
        self.written = len(self.rows)

    def finish(self, status: str = "ok", error: str | None = None) -> None:
        """Stamp every row with the job's status and error, add the `job` row (with the run
        card), write the last part, close the live loggers. Parts already written keep status
        `running`; the reader stamps them with the `job` row's status and error."""
        if status not in STATUSES:
            raise ValueError(f"status={status!r} is not one of {', '.join(map(repr, STATUSES))}")
        device = str(self.base.get("device", "cpu"))
        card = {**env_card(device, self.load_before), **self.card}
        self.log(schema.JOB, time.perf_counter() - self.started, **card)
        for row in self.rows:
            row.update(status=status, error=error)
        try:
            self.flush()
        finally:
            for sink in self.sinks:
                sink.close()


def cpu_model() -> str:
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


def _cuda(device: str) -> torch.device | None:
    """The CUDA device a job's `device` column names, None for any other (or none visible)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.device(device)


def env_card(device: str, load_avg_before: float | None) -> dict[str, Any]:
    """The `env.*` columns of a job's closing row, taken as it ends (docs/contract.md §5)."""
    cuda = _cuda(device)
    commit = git_commit()
    memory = torch.cuda.get_device_properties(cuda).total_memory / 2**30 if cuda else None
    return {
        "env.cpu": cpu_model(),
        "env.gpu": torch.cuda.get_device_name(cuda) if cuda else None,
        "env.cores": os.cpu_count(),
        "env.device_memory_gib": round(memory, 2) if memory is not None else None,
        "env.threads": torch.get_num_threads(),
        "env.torch": torch.__version__,
        "env.cuda": torch.version.cuda,
        "env.python": platform.python_version(),
        "env.platform": platform.platform(),
        "env.commit": commit[:SHORT_COMMIT] if commit else None,
        "env.date": now(),
        "env.load_avg_before": load_avg_before,
        "env.load_avg_after": load_average(),
    }


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and software of this process (env.json)."""
    cuda = device.type == "cuda"
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cpu_model": cpu_model(),
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
