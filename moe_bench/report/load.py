"""Load: a sweep's rows, its jobs with their states, and the run card.

Reads files only: the job folders (rows: `rows-*.parquet` part files, or an older sweep's
`results.jsonl`; `job.json`, `env.json`, `.hydra/`) and
Hydra's `multirun.yaml`, or a saved `results.csv[.gz]` alone. Every job the sweep asked for is
counted (the basic sweeper's expansion of multirun.yaml's sweeper params and overrides, plus
any job folder found): its state (docs/contract.md §7) is ok, failed, running, incomplete,
unreadable (a bad results.jsonl line, named path:line, or a bad part file) or not started.
Without job folders (a saved table) the counts come from the rows' closing `job` rows.

The run card (docs/contract.md §5): columns `env.*` (machine, versions, commit, date) and
`card.*` (what each task asks and measures, the questions it answers, the variant's loss
note) on each job's closing `job` row. Job folders written before the card keep their
env.json, read as a fallback.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from moe_bench import identity, results, schema

EMPTY_COLUMNS = [
    "variant", "task", "metric", "value", "unit", "step", "seed", "status", "error", "job_dir",
]  # fmt: skip
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
NOT_STARTED = "not started"
UNREADABLE = "unreadable"
INCOMPLETE = "incomplete"
USED = ("ok", "failed")  # job states whose rows feed the leaderboards and figures
WIDE = 32  # run card values longer than this get a line of their own


def natural(name: str) -> list[tuple[int, int | str]]:
    """Sort key putting job 2 before job 10."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p]


def load_rows(root: Path, problems: list[str]) -> pd.DataFrame:
    """Every readable row under `root` (or its saved table). A sweep that has started
    (multirun.yaml) but where no job has written rows yet gets an empty frame; anything else
    without rows is not a sweep (results.load raises ValueError)."""
    if (root / "multirun.yaml").is_file() and not results.job_dirs(root):
        return pd.DataFrame(columns=EMPTY_COLUMNS)
    return results.load(root, problems)


def data_file(root: Path, gzip_csv: bool) -> str:
    """The tidy table's name beside the report: compressed when asked, or when the directory
    is a saved table (results.csv.gz and no job results), which is then left as it is."""
    saved = (root / "results.csv.gz").is_file() and not results.job_dirs(root)
    return "results.csv.gz" if gzip_csv or saved else "results.csv"


def write_table(path: Path, frame: pd.DataFrame) -> None:
    """The rows as CSV, every column kept (the run card's included)."""
    if path.suffix != ".gz":
        results.atomic_write(path, frame.to_csv(index=False))
        return
    # mtime=0: the same rows give the same bytes (a committed example diffs cleanly)
    tmp = path.with_name(f".{path.name}.tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as out:
        out.write(frame.to_csv(index=False).encode())
    os.replace(tmp, path)


# --- every job the sweep asked for ----------------------------------------------------------


class JobInfo(NamedTuple):
    job: str  # job folder, relative to the sweep
    overrides: str
    state: str  # running, ok, failed, incomplete, unreadable, not started
    detail: str


def expand(overrides: list[str]) -> list[list[str]]:
    """The basic sweeper's job list: each override's values (a comma list or range() sweep
    gives several, a plain value one; a later override of the same key replaces an earlier one
    in its place), then their cartesian product in order (job i is folder i)."""
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if override.is_sweep_override():
            choices[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]


def asked_jobs(root: Path) -> dict[str, str] | None:
    """Job folder -> overrides of every job the sweep asked for, from multirun.yaml (the
    sweeper params, then the command line's overrides); None when that cannot be known."""
    try:
        config = OmegaConf.load(root / "multirun.yaml")
        hydra = OmegaConf.to_container(config.hydra, resolve=False)
        sweeper = (hydra.get("sweeper") or {}).get("_target_", BASIC_SWEEPER)
        subdir = (hydra.get("sweep") or {}).get("subdir", "${hydra.job.num}")
        if sweeper != BASIC_SWEEPER or subdir != "${hydra.job.num}":
            return None
        params = (hydra.get("sweeper") or {}).get("params") or {}
        given = [f"{k}={v}" for k, v in params.items()]
        given += [str(o) for o in (hydra.get("overrides") or {}).get("task") or []]
        batches = expand(given)
    except Exception:  # no or odd multirun.yaml: count the job folders found instead
        return None
    return {str(n): _shown_overrides(job) for n, job in enumerate(batches)}


def _shown_overrides(overrides: list[str]) -> str:
    return " ".join(o for o in overrides if not o.lstrip("+~").startswith("hydra")) or "(none)"


def _found_jobs(root: Path) -> list[str]:
    """Job folders on disk: those holding .hydra, rows or a state file."""
    marks = (".hydra", results.STATE)
    found = {p.parent for mark in marks for p in root.rglob(mark)} | set(results.job_dirs(root))
    return [str(p.relative_to(root)) for p in found if p != root]


def _detail(folder: Path, state: str, problems: list[str], carded: bool) -> str:
    if state == UNREADABLE:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return problems[0] + more
    record = results.read_state(folder) or {}
    since = record.get("started") or record.get("time")
    who = f"PID {record.get('pid')} on {record.get('host')}, started {since}"
    if state == "running":
        return f"running now: {who}"
    if state == INCOMPLETE:
        return f"never finished ({who if record else 'no state file'}): killed?; resume re-runs it"
    if state in USED and not carded and not (folder / results.ENV).is_file():
        why = "the machine of these numbers is unknown (resume rebuilds env.json)"
        return f"no run card and env.json missing: {why}"
    return ""


def job_table(root: Path, frame: pd.DataFrame, problems: list[str]) -> list[JobInfo]:
    """Every job of the sweep (asked for or found) with its state and a one-line detail; for
    a saved table without job folders, one entry per job of its rows (`rows_jobs`)."""
    asked = asked_jobs(root) or {}
    found = _found_jobs(root)
    if not asked and not found:
        return rows_jobs(frame)
    carded = set(frame.loc[card_rows(frame).index, "job_dir"]) if "job_dir" in frame else set()
    jobs = []
    for job in sorted({*asked, *found}, key=natural):
        folder = root / job
        own = [p for p in problems if p.startswith(f"{folder}{os.sep}")]
        state = UNREADABLE if own else results.job_state(folder) or NOT_STARTED
        overrides = asked.get(job) or _job_overrides(folder)
        jobs.append(JobInfo(job, overrides, state, _detail(folder, state, own, job in carded)))
    return jobs


def rows_jobs(frame: pd.DataFrame) -> list[JobInfo]:
    """Jobs of a saved table, from its rows: a job's state is its closing `job` row's status;
    without one it is incomplete (when other jobs have one) or ok (rows from before `job`
    rows existed)."""
    if frame.empty:
        return []
    ends = frame[frame["metric"] == schema.JOB.name].groupby("job_dir")["status"].last()
    jobs = []
    for job in sorted(frame["job_dir"].astype(str).unique(), key=natural):
        state = ends.get(job) or (INCOMPLETE if len(ends) else "ok")
        jobs.append(JobInfo(job, "—", str(state), ""))
    return jobs


def _job_overrides(folder: Path) -> str:
    try:
        return _shown_overrides([str(o) for o in OmegaConf.load(folder / ".hydra/overrides.yaml")])
    except Exception:
        return "—"


def jobs_without_results(root: Path) -> list[str]:
    """Hydra job directories (they hold .hydra/) with no rows."""
    jobs = [p.parent for p in root.rglob(".hydra") if p.is_dir()]
    lacking = [str(j.relative_to(root)) for j in jobs if not results.has_rows(j)]
    return sorted((j for j in lacking if j != "."), key=natural)


def failed_jobs(frame: pd.DataFrame) -> list[dict[str, Any]]:
    failed = frame[frame["status"] == "failed"]
    jobs = []
    for job_dir, rows in failed.groupby("job_dir", sort=False):
        first = rows.iloc[0]
        error = next((str(e) for e in rows["error"] if isinstance(e, str) and e.strip()), "")
        lines = [line for line in error.splitlines() if line.strip()] or ["(no error text)"]
        jobs.append(
            {
                "job": job_dir,
                "arm": first.get("arm", first["variant"]),
                "task": first["task"],
                "seed": first.get("seed"),
                "headline": lines[-1],
                "error": error if len(lines) > 1 else "",
            }
        )
    return sorted(jobs, key=lambda job: natural(job["job"]))


# --- the run card ---------------------------------------------------------------------------

# the card's machine part (env.*) and what its task asks (card.*): identity.CARD_PREFIXES
ENV_PREFIX, _ = identity.CARD_PREFIXES


def card_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The closing `job` rows that carry a run card (any env.* or card.* value)."""
    cols = [c for c in frame.columns if c.startswith(identity.CARD_PREFIXES)]
    if not cols or frame.empty:
        return frame.iloc[0:0]
    ends = frame[frame["metric"] == schema.JOB.name]
    return ends[ends[cols].notna().any(axis=1)]


def _varying(values: list[str], unit: str = "jobs") -> str:
    counts = pd.Series(values, dtype=object).value_counts()
    if len(counts) == 1:
        return str(counts.index[0])
    if len(counts) <= 3:
        return "varies across jobs: " + "; ".join(f"{v} ({n} {unit})" for v, n in counts.items())
    return f"one per job ({len(counts)} values)"


def _row(key: str, text: str) -> dict[str, Any]:
    return {"key": key, "value": text, "wide": len(text) > WIDE}


def run_card(root: Path, frame: pd.DataFrame, env: list[dict]) -> list[dict[str, Any]]:
    """Key/value rows of the run: every env.* card column of the rows (one value, or how it
    varies across jobs) and the dtypes; else every env.json field (job folders from before the
    card); then the sweep's overrides from multirun.yaml."""
    rows = []
    ends = card_rows(frame)
    keys = [c for c in ends.columns if c.startswith(ENV_PREFIX) and ends[c].notna().any()]
    for key in keys:
        values = [("—" if pd.isna(v) else _text(v)) for v in ends[key]]
        rows.append(_row(key.removeprefix(ENV_PREFIX), _varying(values)))
    if not keys:
        names = list(dict.fromkeys(k for record in env for k in record if k != "job_dir"))
        for name in names:
            rows.append(_row(name, _varying([str(r.get(name, "—")) for r in env])))
    if "dtype" in frame and frame["dtype"].notna().any() and not frame.empty:
        dtypes = frame.groupby("job_dir")["dtype"].first().dropna().astype(str).tolist()
        rows.append(_row("dtype", _varying(dtypes)))
    if not keys and not env:
        text = "no run card in the rows and no env.json in any job folder"
        rows.append({"key": "machine", "value": text, "wide": True})
    overrides = _sweep_overrides(root)
    if overrides is not None:
        rows.append(_row("sweep overrides", " ".join(overrides) or "(none)"))
    return rows


def _text(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _sweep_overrides(root: Path) -> list[str] | None:
    path = root / "multirun.yaml"
    if not path.is_file():
        return None
    config = OmegaConf.load(path)
    return [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=[])]


class Answer(NamedTuple):
    """One summary question a task can answer (card.task_answers)."""

    question: str  # "fastest"
    metric: str  # a schema metric name
    pass_: str | None  # the `pass` of the metric's rows, if it has one
    unit: str | None  # the leaderboard column's unit where the metric has several
    words: str  # the measure in words


class TaskCard(NamedTuple):
    task: str
    order: float  # where the report puts the task (inf: no card, after carded tasks)
    ask: str  # the question the task's leaderboard answers ("" without a card)
    measure: str  # its measure, in words
    answers: tuple[Answer, ...]


def _first(rows: pd.DataFrame, name: str) -> Any:
    if name not in rows:
        return None
    found = rows[name].dropna()
    return found.iloc[0] if len(found) else None


def _answers(text: Any) -> tuple[Answer, ...]:
    if not isinstance(text, str) or not text.strip():
        return ()
    try:
        items = json.loads(text)
    except ValueError:
        return ()
    return tuple(
        Answer(
            str(a.get("question", "")),
            str(a.get("metric", "")),
            a.get("pass"),
            a.get("unit"),
            str(a.get("words", a.get("metric", ""))),
        )
        for a in items
        if isinstance(a, dict)
    )


def task_cards(frame: pd.DataFrame) -> list[TaskCard]:
    """One card per task of the rows, in the cards' order (then by name; tasks whose rows lack
    the card come last, by name, with no question text)."""
    ends = card_rows(frame)
    cards = []
    for task in sorted(frame["task"].dropna().astype(str).unique()) if not frame.empty else []:
        rows = ends[ends["task"] == task]
        order = pd.to_numeric(pd.Series([_first(rows, "card.task_order")]), errors="coerce")[0]
        cards.append(
            TaskCard(
                task,
                float("inf") if pd.isna(order) else float(order),
                str(_first(rows, "card.task_ask") or ""),
                str(_first(rows, "card.task_measure") or ""),
                _answers(_first(rows, "card.task_answers")),
            )
        )
    return sorted(cards, key=lambda c: (c.order, c.task))


def uncarded_tasks(frame: pd.DataFrame) -> list[str]:
    """Tasks none of whose jobs' rows carry the card (sweeps from before it)."""
    return [c.task for c in task_cards(frame) if not c.ask and not c.answers and not c.measure]


def variant_notes(frame: pd.DataFrame) -> dict[str, str]:
    """variant -> its layer config's note on loss normalisation (card.variant_note)."""
    ends = card_rows(frame)
    if "card.variant_note" not in ends or ends.empty:
        return {}
    notes = ends.dropna(subset=["card.variant_note"]).groupby("variant")["card.variant_note"]
    return {str(k): str(v) for k, v in notes.first().items()}
