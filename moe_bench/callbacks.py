"""Hydra callbacks (registered in sweeps/config.yaml under hydra.callbacks).

- `OutputCheck`: before any job, the output directory must be creatable and writable; else one
  clear line and exit status 2, instead of a traceback from deep inside Hydra.
- `ReportCallback`: when a multirun ends, build its HTML report. A missing or failing report
  module prints a one-line warning: results are on disk already and the sweep succeeded.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def check_writable(directory: str) -> None:
    """Exit with a clear message unless `directory` exists writable or can be created."""
    path = Path(directory).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    else:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            problem = f"cannot write in {existing}: {e.strerror or e}"
    if problem:
        print(f"moe_bench: error: output directory {directory} is not writable: {problem}",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)


class OutputCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(config.hydra.sweep.dir)


class ReportCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = os.fspath(config.hydra.sweep.dir)
        try:
            from moe_bench.report.build import build_report
        except ImportError as e:
            print(f"moe_bench: warning: no report for {sweep_dir}: report module missing ({e})")
            return
        try:
            path = build_report(sweep_dir)
        except Exception as e:  # the sweep's results stand without a report
            print(f"moe_bench: warning: report of {sweep_dir} failed: {type(e).__name__}: {e}")
            return
        print(f"report: {path}")
