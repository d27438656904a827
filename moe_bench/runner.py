"""Run one job: resolve its config once, run its task, record how it ended.

`execute(cfg, out_dir, label)` is what the Hydra app calls per job; `run_resolved(job, out_dir)`
runs an already resolved Job (from Python: `moe_bench.run_job`). A job that fails writes a
`failed` row with its error; expected problems (bad values, impossible combinations, out of
memory) print one line, anything else also logs its traceback to the job's log.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from moe_bench import config, results
from moe_bench.config import Job
from moe_bench.progress import job_summary
from moe_bench.tasks import get_task

log = logging.getLogger(__name__)
# failures a sweep expects (bad values, impossible combinations, too big for the device): one line
EXPECTED = (ValueError, FloatingPointError, torch.OutOfMemoryError)  # not bugs: no traceback


def _failed(recorder: results.Recorder, error: Exception, label: str) -> str:
    text = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    if not isinstance(error, EXPECTED):
        log.exception("job failed")  # a bug: keep its traceback in the job's log
    recorder.finish("failed", text)
    print(f"failed   {label}: {text}", file=sys.stderr)
    return "failed"


def run_resolved(job: Job, out_dir: Path, label: str = "") -> str:
    """Run `job` into out_dir; returns "ok" or "failed"."""
    label = label or f"variant={job.variant} task={job.task.name}"
    recorder = results.Recorder(out_dir, job.columns)
    try:
        task = get_task(job.task.name)
        if job.threads is not None:
            torch.set_num_threads(job.threads)
        results.write_env(out_dir, job.device, overrides=label)
        task(job, recorder)
        results.update_env(out_dir, load_avg_after=results.load_average())
    except Exception as e:
        return _failed(recorder, e, label)
    recorder.finish("ok")
    print(f"ok       {label}: {job_summary(job.task.name, recorder.rows)} -> {out_dir}")
    return "ok"


def execute(cfg: DictConfig, out_dir: Path, label: str) -> str:
    """Run one composed job into out_dir; returns "ok", "failed" or "skipped"."""
    if results.completed(out_dir):
        print(f"skipped  {label}: {out_dir} already holds ok results")
        return "skipped"
    try:
        job = config.resolve(cfg)
    except Exception as e:
        return _failed(results.Recorder(out_dir, config.config_columns(cfg)), e, label)
    return run_resolved(job, out_dir, label)
