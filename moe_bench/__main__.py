"""`moe-bench` (or `python -m moe_bench`): the Hydra application over the configs in `sweeps/`
(`moe_bench.config_dir()`; docs/contract.md, sections 5-6).

One job = one composed config: resolve it once (a single run takes the resolution its folder
check made), refuse it if it is GPU-sized and would run on a CPU (`config.gpu_sized` with its
task's `cost_tflop`; `allow_cpu=true` overrides), announce it ('job i/N' in a multirun, and a
warning when a parallel launcher times jobs at once), resolve and validate it, lock its
directory, skip it if the directory already holds ok results of the same config (resume;
`moe_bench.runner` says what a different config, a held lock or an unwritable folder do), run
its task, write its rows (rows-*.parquet), env.json and job.json, and print one line with its
key metrics.
A job that fails writes a `failed` row with its error; in a multirun the sweep goes on, a
single run exits with status 1 (also when refused or busy). A GPU-sized job refused in a
multirun is such a failed job (its error the refusal line); a single run exits with status 2.
Expected problems (bad values, impossible combinations, out of memory) print one line; anything
else also logs its traceback to the job's log.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from moe_bench import SWEEPS, callbacks, config, progress, registry
from moe_bench.recorder import Recorder
from moe_bench.runner import Resolved, execute, guarded, resolve

__all__ = ["execute", "main"]


def gpu_refusal(cfg: DictConfig, resolved: Resolved) -> str | None:
    """The one-line refusal of a GPU-sized job on a CPU (None: it fits, or it does not resolve
    and fails as a job)."""
    job = resolved.job
    if job is None:
        return None
    task = registry.lookup(job.task.name)
    tflop = task.cost_tflop(job) if task.cost_tflop else None
    return config.gpu_sized(job, tflop, bool(cfg.allow_cpu))


def refused_in_sweep(
    cfg: DictConfig, out_dir: Path, label: str, resolved: Resolved, refusal: str
) -> str:
    """A sweep's GPU-sized job: recorded as failed with the refusal as its error (one line),
    so the report shows it and the sweep goes on to its other jobs."""

    def refuse(recorder: Recorder) -> None:
        raise ValueError(refusal.removeprefix("moe_bench: error: "))

    return guarded(out_dir, label, resolved.job.columns, refuse, bool(cfg.get("overwrite")))


def announce(cfg: DictConfig, hc: DictConfig, label: str, resolved: Resolved) -> str | None:
    """Print 'job i/N' and any concurrency warning; a GPU-sized job on a CPU: its refusal line,
    and a single run exits with status 2 (a sweep records it as failed and goes on)."""
    refusal = gpu_refusal(cfg, resolved)
    if refusal and hc.mode != RunMode.MULTIRUN:
        print(refusal, file=sys.stderr)
        raise SystemExit(2)
    if hc.mode == RunMode.MULTIRUN:
        print(f"{progress.sweep_position(hc.job.num, hc.sweep.dir)}  {label}", flush=True)
    name = cfg.task.name
    timed = name in registry.names() and registry.lookup(name).timed
    warning = progress.concurrency_warning(name, timed, hc.launcher)
    if warning and not refusal:
        print(warning, file=sys.stderr)
    return refusal


@hydra.main(version_base="1.3", config_path=str(SWEEPS), config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    label = " ".join(hc.overrides.task) or f"variant={cfg.variant.name} task={cfg.task.name}"
    resolved = callbacks.take_resolved() or resolve(cfg)
    refusal = announce(cfg, hc, label, resolved)
    out_dir = Path(hc.runtime.output_dir)
    if refusal:
        status = refused_in_sweep(cfg, out_dir, label, resolved, refusal)
    else:
        status = execute(cfg, out_dir, label, resolved)
    if status in ("failed", "refused", "busy") and hc.mode != RunMode.MULTIRUN:
        sys.exit(1)


if __name__ == "__main__":
    main()
