"""What a job tells the terminal: where it stands in its sweep, a warning when a parallel
launcher times jobs at once, and one line at its end with its key metrics.

Progress bars (tqdm, with rate and ETA) live where the work is: the timing rounds
(`moe_bench.timing`) and the convergence steps; like these lines' callers, tqdm stays quiet
when its output is not a terminal (`disable=None`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# tasks whose numbers are wall-clock times (throughput's and race's rows, convergence's
# tokens_per_s)
TIMED_TASKS = ("throughput", "race", "convergence")
MULTIRUN_YAML = "multirun.yaml"


def sweep_size(sweep_dir: str | Path) -> int | None:
    """How many jobs the multirun in sweep_dir asked for (its multirun.yaml, as the basic
    sweeper expands it); None when unknown (no file, another sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = Path(sweep_dir) / MULTIRUN_YAML
    if not path.is_file():
        return None
    hydra = OmegaConf.load(path).hydra
    if "BasicSweeper" not in str(hydra.sweeper.get("_target_", "")):
        return None
    params = [f"{k}={v}" for k, v in (hydra.sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides([*params, *hydra.overrides.task])
    return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))


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


def concurrency_warning(task: str, launcher: DictConfig) -> str | None:
    """One line when a timed task runs beside other jobs of a parallel launcher."""
    n = parallel_jobs(launcher)
    if n == 1 or task not in TIMED_TASKS:
        return None
    return (
        f"moe_bench: warning: the launcher runs up to {n} jobs at once; "
        f"task={task}'s timings share the machine with them (use hydra.launcher.n_jobs=1, "
        "or the basic launcher, to time)"
    )


def _row(rows: list[dict[str, Any]], metric: str, **where: Any) -> dict[str, Any] | None:
    found = [
        r for r in rows
        if r.get("metric") == metric and all(r.get(k) == v for k, v in where.items())
    ]  # fmt: skip
    return found[-1] if found else None


def _throughput(rows: list[dict[str, Any]]) -> str | None:
    for pass_, metric in (("fwd_bwd", "fwd_bwd_ms"), ("fwd", "fwd_ms")):
        time_row = _row(rows, metric, **{"pass": pass_})
        ratio_row = _row(rows, "ratio_to_dense", **{"pass": pass_})
        if time_row is None or ratio_row is None:
            continue
        ms, iqr = time_row["value"], time_row.get("iqr_ms") or 0.0
        shown = f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"
        text = f"{pass_} {shown} ms (x{ratio_row['value']:.2f} dense, iqr {iqr / ms:.0%})"
        if time_row.get("noisy") or ratio_row.get("noisy"):
            reason = ratio_row.get("noisy_reason")
            text += f" NOISY ({reason})" if reason else " NOISY"
        if time_row.get("load_avg") is not None:
            text += f", load {time_row['load_avg']:.1f}"
        return text
    return None


def _race(rows: list[dict[str, Any]]) -> str | None:
    """Each arm's ratio to dense, fastest first, in the last pass that has them."""
    for pass_ in ("fwd_bwd", "fwd"):
        found = [r for r in rows if r.get("metric") == "ratio_to_dense" and r.get("pass") == pass_]
        if found:
            arms = [
                f"{r['variant']} x{r['value']:.2f}" + (" NOISY" if r.get("noisy") else "")
                for r in sorted(found, key=lambda r: r["value"])
            ]
            return f"{pass_} vs dense: " + ", ".join(arms)
    return None


def _memory(rows: list[dict[str, Any]]) -> str | None:
    peak, ratio = _row(rows, "peak_memory_bytes"), _row(rows, "ratio_to_dense")
    if peak is None or ratio is None:
        return None
    return f"peak {peak['value'] / 2**20:.3g} MiB (x{ratio['value']:.2f} dense)"


def _convergence(rows: list[dict[str, Any]]) -> str | None:
    val = _row(rows, "val_loss")
    if val is None:
        return None
    return f"val_loss {val['value']:.4f} at step {val['step']}"


def _balance(rows: list[dict[str, Any]]) -> str | None:
    parts = [
        f"{r['domain']} {r['value']:.2f}"
        for r in rows
        if r.get("metric") == "max_vio_global" and r.get("domain")
    ]
    return "max_vio_global " + ", ".join(parts) if parts else None


SUMMARIES = {
    "throughput": _throughput,
    "race": _race,
    "memory": _memory,
    "convergence": _convergence,
    "balance": _balance,
}


def job_summary(task: str, rows: list[dict[str, Any]]) -> str:
    """The job's key metrics in a few words, then its row count and wall time."""
    key = SUMMARIES[task](rows) if task in SUMMARIES else None
    job = _row(rows, "job")
    seconds = f" in {job['value']:.1f} s" if job else ""
    tail = f"{len(rows)} rows{seconds}"
    return f"{key} [{tail}]" if key else tail
