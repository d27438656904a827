"""What a job tells the terminal: where it stands in its sweep, a warning when a parallel
launcher times jobs at once, and one line at its end with its key metrics (its task's
`summary`, `moe_bench.task`). Names no task.

Progress bars (tqdm, with rate and ETA) live where the work is: the timing rounds
(`moe_bench.timing`) and a task's training steps; like these lines' callers, tqdm stays quiet
when its output is not a terminal (`disable=None`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

Rows = list[dict[str, Any]]
MULTIRUN_YAML = "multirun.yaml"


def sweep_size(sweep_dir: str | Path) -> int | None:
    """How many jobs the multirun in sweep_dir asked for (its multirun.yaml, as the basic
    sweeper expands it, `report.load.expand`); None when unknown (no file, another sweeper)."""
    # imported here: the report stage loads pandas and matplotlib, which only a multirun needs
    from moe_bench.report.load import expand

    path = Path(sweep_dir) / MULTIRUN_YAML
    if not path.is_file():
        return None
    hydra = OmegaConf.load(path).hydra
    if "BasicSweeper" not in str(hydra.sweeper.get("_target_", "")):
        return None
    params = [f"{k}={v}" for k, v in (hydra.sweeper.get("params") or {}).items()]
    return len(expand([*params, *hydra.overrides.task]))


def sweep_position(job_num: int, sweep_dir: str | Path) -> str:
    """'job 3/8' (1-based) or 'job 3' when the sweep's size is unknown."""
    total = sweep_size(sweep_dir)
    return f"job {job_num + 1}/{total}" if total else f"job {job_num + 1}"


def parallel_jobs(launcher: DictConfig) -> int:
    """How many jobs the launcher runs at once on this machine (1 unless a local pool)."""
    target = str(launcher.get("_target_", ""))
    if "joblib" not in target.lower():
        return 1
    n_jobs = launcher.get("n_jobs", 1) or 1
    return n_jobs if n_jobs > 0 else os.cpu_count() or 2  # joblib: -1 = one job per core


def concurrency_warning(task: str, timed: bool, launcher: DictConfig) -> str | None:
    """One line when a timed task (`Task.timed`) runs beside other jobs of a parallel
    launcher."""
    n = parallel_jobs(launcher)
    if n == 1 or not timed:
        return None
    return (
        f"moe_bench: warning: the launcher runs up to {n} jobs at once; "
        f"task={task}'s timings share the machine with them (use hydra.launcher.n_jobs=1, "
        "or the basic launcher, to time)"
    )


def find_row(rows: Rows, metric: str, **where: Any) -> dict[str, Any] | None:
    """The last row of `metric` whose columns match `where` (a task's summary reads it)."""
    found = [
        r for r in rows
        if r.get("metric") == metric and all(r.get(k) == v for k, v in where.items())
    ]  # fmt: skip
    return found[-1] if found else None


def job_summary(key: str | None, rows: Rows) -> str:
    """The job's key metrics (its task's `summary`, when it has one), then its row count and
    wall time."""
    job = find_row(rows, "job")
    seconds = f" in {job['value']:.1f} s" if job else ""
    tail = f"{len(rows)} rows{seconds}"
    return f"{key} [{tail}]" if key else tail
