"""Hydra callbacks (registered in sweeps/config.yaml under hydra.callbacks).

- `OutputCheck`: before any job, the output directory must be creatable and writable; else one
  clear line and exit status 2, instead of a traceback from deep inside Hydra. A multirun then
  locks its sweep folder for as long as it runs (a second run on it says who holds it and
  exits 2), and refuses a sweep folder that was run with other overrides (one line naming them,
  exit 2) unless `overwrite=true`: before Hydra rewrites the folder's multirun.yaml. A single
  run into a folder of another config is refused the same way (exit 1) before Hydra rewrites
  its .hydra/. Each job still checks its own folder's config under its lock
  (moe_bench.runner), which also catches edited YAML in a multirun. A single run's config is
  resolved here, once: the app takes that resolution (`take_resolved`) instead of resolving
  again.
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
from omegaconf import DictConfig, OmegaConf

from moe_bench import locks, runner


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


def _error(text: str) -> None:
    print(f"moe_bench: error: {text}", file=sys.stderr)
    raise SystemExit(2)


def sweep_params(config: DictConfig) -> dict[str, str]:
    """What a sweep was asked for: sweeper params, then command-line overrides (later wins),
    as key -> value text; Hydra's own settings and `overwrite` left out (they change nothing
    a job measures)."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    given = [f"{k}={v}" for k, v in params.items()]
    given += list(OmegaConf.select(config, "hydra.overrides.task", default=None) or [])
    out = {}
    for text in map(str, given):
        key, _, value = text.partition("=")
        name = key.lstrip("+~")
        if not name.startswith("hydra") and name != "overwrite":
            out[name] = value if not key.startswith("~") else "(deleted)"
    return out


def check_same_sweep(config: DictConfig) -> None:
    """Exit with one line when the sweep folder was run with other overrides (resume would mix
    two sweeps), unless overwrite=true."""
    path = Path(config.hydra.sweep.dir) / "multirun.yaml"
    if not path.is_file() or OmegaConf.select(config, "overwrite", default=False):
        return
    try:
        old = sweep_params(OmegaConf.load(path))
    except Exception:  # an unreadable multirun.yaml: each job still checks its own config
        return
    new = sweep_params(config)
    if old != new:
        keys = sorted({*old, *new}, key=lambda k: (k not in old or k not in new, k))
        diff = ", ".join(
            f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}"
            for k in keys
            if old.get(k) != new.get(k)
        )
        _error(
            f"sweep folder {config.hydra.sweep.dir} was run with other overrides ({diff}); use "
            "another hydra.sweep.dir, or overwrite=true to replace the jobs whose config changed"
        )


_sweep_lock: locks.Lock | None = None  # held from the sweep's start to its end (or exit)


def lock_sweep(sweep_dir: str) -> None:
    global _sweep_lock
    try:
        _sweep_lock = locks.Lock(sweep_dir).acquire()
    except locks.Busy as e:
        _error(f"sweep folder {e}; wait for it, or use another hydra.sweep.dir")
    except OSError as e:
        _error(f"cannot lock sweep folder {sweep_dir}: {e.strerror or e}")


def check_same_job(config: DictConfig, resolved: runner.Resolved) -> None:
    """A single run into a folder of another config: one line and exit 1 before Hydra rewrites
    the folder's .hydra/ (the runner would refuse it too, after that rewrite)."""
    out_dir = Path(config.hydra.run.dir)
    if OmegaConf.select(config, "overwrite", default=False) or not out_dir.is_dir():
        return
    diff = runner.mismatch(out_dir, resolved.key)
    if diff is not None:
        print(f"moe_bench: error: {runner.refusal(out_dir, diff)}", file=sys.stderr)
        raise SystemExit(1)


_resolved: runner.Resolved | None = None  # a single run's config, resolved by its check


def take_resolved() -> runner.Resolved | None:
    """The resolution `OutputCheck` made of this single run's config (once; None in a
    multirun, or when the callback is not configured)."""
    global _resolved
    resolved, _resolved = _resolved, None
    return resolved


class OutputCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _resolved
        check_writable(config.hydra.run.dir)
        _resolved = runner.resolve(config)
        check_same_job(config, _resolved)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(config.hydra.sweep.dir)
        lock_sweep(config.hydra.sweep.dir)
        check_same_sweep(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _sweep_lock is not None:
            _sweep_lock.release()


class ReportCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = os.fspath(config.hydra.sweep.dir)
        try:
            from moe_bench.report.render import build_report
        except ImportError as e:
            print(f"moe_bench: warning: no report for {sweep_dir}: report module missing ({e})")
            return
        try:
            path = build_report(sweep_dir)
        except Exception as e:  # the sweep's results stand without a report
            print(f"moe_bench: warning: report of {sweep_dir} failed: {type(e).__name__}: {e}")
            return
        print(f"report: {path}")
