"""Run one job: resolve its config once, run its task, record how it ended.

`resolve(cfg)` resolves a composed config once (`Resolved`: the Job, or the error and the
columns as given); `execute(cfg, out_dir, label, resolved)` is what the Hydra app calls per job
(a single run passes the resolution its folder check made); `run_resolved(job, out_dir)` runs
an already resolved Job (from Python: `moe_bench.run_job`). The task is the registry's object
of the job's `task` name (`moe_bench.registry`); its closing `job` row carries the run card
(`moe_bench.recorder`). A job that fails writes a
`failed` row with its error; expected problems (bad values, impossible combinations, out of
memory, an allocation the machine cannot give) print one line and keep their traceback in the
job's log file only; anything else (a bug) also prints its traceback.

Resume and its guards (docs/contract.md §7), in this order, each a one-line outcome:
1. the job folder's lock (`moe_bench.locks`): held by another run -> `busy`, nothing touched;
   a folder that cannot be written -> `failed`, nothing touched, the sweep goes on;
2. the config key the folder's results came from (`job.json`) differs from this job's ->
   `refused`, naming the differing keys, unless `overwrite=true`;
3. an `ok` job with the same config -> `skipped` (a missing env.json is rebuilt and marked);
4. anything else (never started, `failed`, `incomplete`, unreadable rows) runs afresh: the
   state file says `running`, the old rows are removed, the new rows replace them.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig

from moe_bench import components, config, locks, registry, results
from moe_bench.config import Job
from moe_bench.progress import job_summary
from moe_bench.recorder import Recorder, load_average, update_env, write_env
from variants.compute.megablocks import Unavailable

log = logging.getLogger(__name__)
# failures a sweep expects (bad values, impossible combinations, too big for the device): one line
# (and what the machine lacks: no CUDA device, an optional package not installed)
EXPECTED = (ValueError, FloatingPointError, torch.OutOfMemoryError, Unavailable)
# torch's CPU allocator raises a plain RuntimeError when malloc fails ("DefaultCPUAllocator:
# can't allocate memory", "not enough memory"): as expected as torch.OutOfMemoryError
ALLOCATION = re.compile(r"can't allocate memory|not enough memory|out of memory", re.IGNORECASE)
Body = Callable[[Recorder], None]


def expected(error: BaseException) -> bool:
    """True for failures a sweep expects: one line, no traceback on the console."""
    if isinstance(error, EXPECTED):
        return True
    return isinstance(error, RuntimeError) and bool(ALLOCATION.search(str(error)))


def say(word: str, label: str, text: str) -> None:
    """One line per job outcome: `word     label: text` (problems on stderr)."""
    stream = sys.stdout if word in ("ok", "skipped") else sys.stderr
    print(f"{word:<8} {label}: {text}", file=stream, flush=True)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines) if len(lines) <= 2 else f"{lines[0]} | ... | {lines[-1]}"


def _traceback_to_log_file(error: BaseException) -> None:
    """The traceback of an expected failure, for the job's log file (Hydra's file handler)
    only: the console gets one line."""
    exc_info = (type(error), error, error.__traceback__)
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, "job failed", (), exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _failed(recorder: Recorder, error: Exception, label: str) -> str:
    text = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    if expected(error):
        _traceback_to_log_file(error)
    else:
        log.exception("job failed")  # a bug: keep its traceback on the console and in the log
    try:
        recorder.finish("failed", text)
    except OSError as e:  # the folder turned unwritable mid-run: say so, let the sweep go on
        text += f" (and its rows could not be written: {e.strerror or e})"
    say("failed", label, _one_line(text))
    return "failed"


def mismatch(out_dir: Path, key: dict[str, Any]) -> str | None:
    """The differing keys (old -> new) when out_dir holds results of another config."""
    recorded = results.recorded_config(out_dir)
    if recorded is None or results.config_hash(recorded) == results.config_hash(key):
        return None
    return results.config_diff(recorded, key)


def refusal(out_dir: Path, diff: str) -> str:
    return (
        f"{out_dir} holds results of another config ({diff}); rerun with another "
        "hydra.sweep.dir (or hydra.run.dir), or overwrite=true to replace them"
    )


class Resolved(NamedTuple):
    """A composed config, resolved once: its Job and base columns, or (when it does not
    resolve: that job fails, keyed by what was asked) the error and the columns as given."""

    job: Job | None
    columns: dict[str, Any]
    error: Exception | None = None

    @property
    def key(self) -> dict[str, Any]:
        """The config key the job runs with (resume compares it with its folder's)."""
        return results.config_key(self.columns)


def resolve(cfg: DictConfig) -> Resolved:
    """Resolve `cfg` once; a config that does not resolve is kept with its error."""
    try:
        job = config.resolve(cfg)
    except Exception as e:
        return Resolved(None, config.config_columns(cfg), e)
    return Resolved(job, job.columns)


def _resume_check(out_dir: Path, label: str, key: dict[str, Any], overwrite: bool) -> str | None:
    """With the job's lock held: `refused` or `skipped` (printed), or None: run it."""
    diff = mismatch(out_dir, key)
    if diff is not None:
        if not overwrite:
            say("refused", label, refusal(out_dir, diff))
            return "refused"
        say("replace", label, f"overwrite=true: replacing results of another config ({diff})")
        return None
    if results.job_state(out_dir, probe_lock=False) != "ok":
        return None  # never started, failed, incomplete or unreadable: run it afresh
    note = _kept_note(out_dir, key)
    say("skipped", label, f"{out_dir} already holds ok results of this config{note}")
    return "skipped"


def _kept_note(out_dir: Path, key: dict[str, Any]) -> str:
    """Code-version and env.json remarks on an ok job kept by resume."""
    notes = []
    state = results.read_state(out_dir) or {}
    then, now = state.get("git_commit"), results.git_commit()
    if then and now and then != now:
        notes.append(f"measured at commit {then[:10]}, now {now[:10]}; kept")
    if not (out_dir / results.ENV).is_file():
        try:
            device = torch.device(str(key.get("device", "cpu")))
            write_env(out_dir, device, rebuilt="on resume: describes the resuming run")
            notes.append("env.json was missing: rebuilt and marked `rebuilt`")
        except (OSError, RuntimeError) as e:
            notes.append(f"env.json is missing and could not be rebuilt: {e}")
    return f" ({'; '.join(notes)})" if notes else ""


def run_card(columns: dict[str, Any]) -> dict[str, Any]:
    """The `card.*` columns of a job (docs/contract.md §5): what its task asks (the task
    object's `report`) and its variant's loss note, found by name so that a job that failed to
    resolve carries them too."""
    card: dict[str, Any] = {}
    if columns.get("task") in registry.names():
        card.update(registry.lookup(columns["task"]).report.card())
    if columns.get("variant") in components.names():
        config_cls = components.lookup(columns["variant"]).config
        card["card.variant_note"] = config_cls.note
    return card


def recorder_for(out_dir: Path, columns: dict[str, Any]) -> Recorder:
    """The job's Recorder: its base columns, run card, and its task's metrics only."""
    task = columns.get("task")
    metrics = registry.lookup(task).metric_names if task in registry.names() else None
    return Recorder(out_dir, columns, card=run_card(columns), metrics=metrics)


def _summary(columns: dict[str, Any], recorder: Recorder) -> str:
    task = registry.lookup(columns["task"])
    key = task.summary(recorder.rows) if task.summary else None
    return job_summary(key, recorder.rows)


def _run(out_dir: Path, label: str, columns: dict[str, Any], body: Body) -> str:
    """Run body into out_dir (lock held, resume checked): state file, fresh rows, ending."""
    key = results.config_key(columns)
    started = results.now()
    # OSError here: an unwritable folder, the caller says so
    results.write_state(out_dir, "running", key, started=started)
    results.clear_rows(out_dir)  # never append to an old run's rows
    recorder = recorder_for(out_dir, columns)
    try:
        body(recorder)
    except Exception as e:
        status = _failed(recorder, e, label)
    else:
        recorder.finish("ok")
        status = "ok"
        say("ok", label, f"{_summary(columns, recorder)} -> {out_dir}")
    results.write_state(out_dir, status, key, started=started)
    return status


def launcher_rank() -> int:
    """This process's rank when a launcher starts several processes for one job (torchrun's
    RANK, Slurm's SLURM_PROCID: a multi-process task under an env launcher); else 0."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _helper_rank(out_dir: Path, label: str, columns: dict[str, Any], body: Body, rank: int) -> str:
    """Rank > 0 of a multi-process job: rank 0 owns the folder (lock, state file, resume,
    rows); this rank writes only its own part files rows.rank<N>-*.parquet."""
    recorder = recorder_for(out_dir, columns)
    recorder.prefix = f"rows.rank{rank}"
    try:
        body(recorder)
    except Exception as e:
        return _failed(recorder, e, f"{label} (rank {rank})")
    recorder.finish("ok")
    return "ok"


def guarded(
    out_dir: str | Path, label: str, columns: dict[str, Any], body: Body, overwrite: bool = False
) -> str:
    """Lock the job folder, check resume, run: "ok", "failed", "skipped", "refused", "busy"."""
    out_dir = Path(out_dir)
    rank = launcher_rank()
    if rank > 0:
        return _helper_rank(out_dir, label, columns, body, rank)
    lock = locks.Lock(out_dir)
    try:
        lock.acquire()
    except locks.Busy as e:
        say("busy", label, f"{e}; this run leaves it alone")
        return "busy"
    except OSError as e:
        say("failed", label, f"cannot write in {out_dir}: {e.strerror or e}; left as it is")
        return "failed"
    try:
        verdict = _resume_check(out_dir, label, results.config_key(columns), overwrite)
        return verdict or _run(out_dir, label, columns, body)
    except OSError as e:  # the state file or rows could not be written: this job only
        say("failed", label, f"cannot write in {out_dir}: {e.strerror or e}; left as it is")
        return "failed"
    finally:
        lock.release()


def _task_body(job: Job, out_dir: Path, label: str) -> Body:
    def body(recorder: Recorder) -> None:
        task = registry.lookup(job.task.name)
        if job.threads is not None:
            torch.set_num_threads(job.threads)
        write_env(out_dir, job.device, overrides=label)
        task.run(job, recorder)
        update_env(out_dir, load_avg_after=load_average())

    return body


def run_resolved(job: Job, out_dir: Path, label: str = "", overwrite: bool = False) -> str:
    """Run `job` into out_dir; returns "ok", "failed", "skipped", "refused" or "busy"."""
    label = label or f"variant={job.variant} task={job.task.name}"
    out_dir = Path(out_dir)
    return guarded(out_dir, label, job.columns, _task_body(job, out_dir, label), overwrite)


def execute(cfg: DictConfig, out_dir: Path, label: str, resolved: Resolved | None = None) -> str:
    """Run one composed job into out_dir; returns its outcome (see `guarded`). `resolved`:
    `cfg` already resolved (by the single run's folder check), else it is resolved here."""
    overwrite = bool(cfg.get("overwrite", False))
    resolved = resolved or resolve(cfg)
    if resolved.job is None:
        error = resolved.error

        def refuse(recorder: Recorder) -> None:
            raise error

        return guarded(out_dir, label, resolved.columns, refuse, overwrite)
    return run_resolved(resolved.job, out_dir, label, overwrite)
