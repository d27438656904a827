"""Build a sweep's report: result files -> frames -> leaderboards and figures -> one HTML file.

`build_report(sweep_dir)` reads only files (`moe_bench.results.load` / `load_env` and Hydra's
`multirun.yaml`), never the tasks, and writes `report.html` (self-contained: inline CSS and
SVG, no network) and `results.csv` (the tidy rows, to re-plot) into the sweep directory.
Sections with no data are listed with the reason instead of being drawn empty.

Every job the sweep asked for is counted (the job list of multirun.yaml's overrides and
sweeper params, plus any job folder found): its state (docs/contract.md §7) is ok, failed,
running, incomplete (started, never finished), unreadable (a bad results.jsonl line, named
path:line) or not started. Only ok and failed jobs feed the leaderboards and figures (failed
ones as failures); the others are listed in a table of their own.
"""

from __future__ import annotations

import datetime
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
import pandas as pd
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from moe_bench import results, schema
from moe_bench.schema import Metric

from . import figures
from .figures import Missing, column, plain, summary_rows

TEMPLATES = Path(__file__).parent / "templates"
TASK_ORDER = ("throughput", "memory", "balance", "convergence")
WIDE = 32  # run metadata values longer than this get a line of their own


class VariantNote(NamedTuple):
    loss: str  # the balance-loss normalisation as this suite implements it (docs/contract.md §3)
    causal: bool = True  # False: routing looks at later tokens of the sequence


# The one place the report states how each variant normalises its losses. Libraries differ
# (Megatron, megablocks, DeepSpeed, Tutel, HF Mixtral), so compare aux losses only with this
# table at hand. f_i counts demand before dropping; P_i is a mean of router scores over tokens.
NOTES: dict[str, VariantNote] = {
    "dense": VariantNote("No router, no auxiliary loss: one FFN of width d_ff."),
    "switch": VariantNote(
        "0.01 · E · Σ_i f_i P_i, f_i = fraction of tokens whose top-1 is i (Fedus et al. 2021); "
        "optional z-loss (default 0)."
    ),
    "gshard": VariantNote(
        "0.01 · E · Σ_i f_i P_i with f_i from first choices only (Lepikhin et al. 2020)."
    ),
    "deepseek_moe": VariantNote(
        "α1 · Σ_i f_i P_i with f_i = E/(K·T) · count_i, α1 = 0.01; device balance α2 = 0 "
        "unless set (Dai et al. 2024)."
    ),
    "deepseek_v2": VariantNote(
        "Three losses, each per sequence then averaged: expert α1 = 0.003, device α2 = 0.05, "
        "communication α3 = 0.02 (DeepSeek-AI 2024, arXiv:2405.04434)."
    ),
    "deepseek_v3": VariantNote(
        "Auxiliary-loss-free: a per-expert bias steers top-K selection (update rate 1e-3 per "
        "step), plus a sequence-wise balance loss α · Σ_i f_i P_i with α = 1e-4."
    ),
    "mixtral": VariantNote(
        "0.01 · E · Σ_i f_i P_i with f_i = count_i / (T·K); HF transformers' Mixtral loss is "
        "K times this."
    ),
    "expert_choice": VariantNote(
        "No balance loss: each expert picks its top tokens, so load is balanced by "
        "construction. Non-causal: an expert's choice depends on later tokens of the "
        "sequence, which leaks the future in a causal LM; its loss is not comparable.",
        causal=False,
    ),
    "noisy_topk": VariantNote(
        "Importance 0.1 · CV(Σ_t G_t)² and load 0.1 · CV(L)² with the smooth normal-CDF load "
        "estimator (Shazeer et al. 2017)."
    ),
}


class Column(NamedTuple):
    """One leaderboard metric: final value per job, then mean ± std over seeds."""

    label: str
    schema: Metric  # name and which way is better ("max", "min", None: no best marked)
    unit: str  # as displayed (after `scale`)
    fmt: Callable[[float], str]
    scale: float = 1.0
    routing: bool = False  # a balance metric: meaningless for a layer with one expert (dense)

    @property
    def metric(self) -> str:
        return self.schema.name

    @property
    def better(self) -> str | None:
        return self.schema.better


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:,.{digits}f}"


LEADERBOARD = (
    Column("tokens/s", schema.TOKENS_PER_S, "tok/s", _fixed(0)),
    # time (throughput) or peak memory (memory) over the dense FFN of equal active FLOPs
    Column("ratio to dense", schema.RATIO_TO_DENSE, "×", _fixed(2)),
    Column("peak memory", schema.PEAK_MEMORY_BYTES, "MiB", _fixed(1), scale=2**-20),
    Column("final val loss", schema.VAL_LOSS, "nats", _fixed(3)),
    Column("MaxVio_global", schema.MAX_VIO_GLOBAL, "", _fixed(3), routing=True),
    Column("load entropy", schema.LOAD_ENTROPY, "", _fixed(3), routing=True),
    Column("drop fraction", schema.DROP_FRACTION, "", _fixed(3), routing=True),
)
PASS_LABEL = {"fwd": "fwd", "fwd_bwd": "fwd+bwd"}
ARROW = {"max": " ↑", "min": " ↓", None: ""}  # which way is better, shown in the header
BEST = " ★"
ALL_DOMAINS = "all"  # domain of rows that are not split by domain
# columns of a sweep where no job has written rows yet
EMPTY_COLUMNS = [
    "variant",
    "task",
    "metric",
    "value",
    "unit",
    "step",
    "seed",
    "status",
    "error",
    "job_dir",
]


def build_report(sweep_dir: str | Path) -> Path:
    """Write <sweep_dir>/report.html and <sweep_dir>/results.csv; return the report's path.

    Raises ValueError when `sweep_dir` does not exist or holds no results and no
    multirun.yaml (not a sweep)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"{root} does not exist or is not a directory")
    problems: list[str] = []
    frame = _load(root, problems)
    for problem in problems:  # the rest of the report goes on; the bad line is named
        print(f"moe_bench.report: warning: {problem}", file=sys.stderr)
    jobs = job_table(root, problems)
    html = render(_context(root, frame, results.load_env(root), jobs, problems))
    results.atomic_write(root / "results.csv", frame.to_csv(index=False))
    path = root / "report.html"
    results.atomic_write(path, html)
    return path


def _load(root: Path, problems: list[str]) -> pd.DataFrame:
    # A sweep that has started (multirun.yaml) but where no job has written rows yet still
    # gets a report saying so; anything else without rows is not a sweep (results.load says).
    if (root / "multirun.yaml").is_file() and not any(root.rglob("results.jsonl")):
        return pd.DataFrame(columns=EMPTY_COLUMNS)
    return results.load(root, problems)


# --- every job the sweep asked for, and its state -------------------------------------------

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
NOT_STARTED = "not started"
UNREADABLE = "unreadable"
USED = ("ok", "failed")  # job states whose rows feed the leaderboards and figures


class JobInfo(NamedTuple):
    job: str  # job folder, relative to the sweep
    overrides: str
    state: str  # running, ok, failed, incomplete, unreadable, not started
    detail: str


def asked_jobs(root: Path) -> dict[str, str] | None:
    """Job folder -> overrides of every job the sweep asked for, from multirun.yaml, as the
    basic sweeper expands them (job i in folder i); None when that cannot be known."""
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
        parsed = OverridesParser.create().parse_overrides(given)
        batches = BasicSweeper.split_arguments(parsed, None)[0]
    except Exception:  # no or odd multirun.yaml: count the job folders found instead
        return None
    return {str(n): _shown_overrides(job) for n, job in enumerate(batches)}


def _shown_overrides(overrides: list[str]) -> str:
    return " ".join(o for o in overrides if not o.lstrip("+~").startswith("hydra")) or "(none)"


def _found_jobs(root: Path) -> list[str]:
    """Job folders on disk: those holding .hydra, rows or a state file."""
    marks = (".hydra", results.RESULTS, results.STATE)
    found = {p.parent for mark in marks for p in root.rglob(mark)}
    return [str(p.relative_to(root)) for p in found if p != root]


def _detail(folder: Path, state: str, problems: list[str]) -> str:
    if state == UNREADABLE:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return problems[0] + more
    record = results.read_state(folder) or {}
    since = record.get("started") or record.get("time")
    who = f"PID {record.get('pid')} on {record.get('host')}, started {since}"
    if state == "running":
        return f"running now: {who}"
    if state == "incomplete":
        return f"never finished ({who if record else 'no state file'}): killed?; resume re-runs it"
    if state in USED and not (folder / results.ENV).is_file():
        return "env.json missing: the machine of these numbers is unknown (resume rebuilds it)"
    return ""


def job_table(root: Path, problems: list[str]) -> list[JobInfo]:
    """Every job of the sweep (asked for or found) with its state and a one-line detail."""
    asked = asked_jobs(root) or {}
    jobs = []
    for job in sorted({*asked, *_found_jobs(root)}, key=_natural):
        folder = root / job
        own = [p for p in problems if p.startswith(f"{folder / results.RESULTS}:")]
        state = UNREADABLE if own else results.job_state(folder) or NOT_STARTED
        overrides = asked.get(job) or _job_overrides(folder)
        jobs.append(JobInfo(job, overrides, state, _detail(folder, state, own)))
    return jobs


def _job_overrides(folder: Path) -> str:
    try:
        return _shown_overrides([str(o) for o in OmegaConf.load(folder / ".hydra/overrides.yaml")])
    except Exception:
        return "—"


def render(context: dict[str, Any]) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2").render(**context)


def _context(
    root: Path, frame: pd.DataFrame, env: list[dict], jobs: list[JobInfo], problems: list[str]
) -> dict[str, Any]:
    # only finished jobs' rows count: an incomplete job's last rows are not its final values
    frame = frame[frame["job_dir"].isin([j.job for j in jobs if j.state in USED])]
    ok = frame[frame["status"] == "ok"]
    colors = figures.variant_colors(frame["variant"].dropna().unique())
    in_sweep = sorted(frame["variant"].dropna().unique(), key=list(colors).index)
    drawn, missing = [], []
    for spec in figures.FIGURES:
        try:
            drawn.append({**spec._asdict(), "svg": figures.render(spec, ok, colors)})
        except Missing as why:
            missing.append({"section": spec.title, "reason": str(why)})
        except Exception as err:  # one odd figure must not cost the whole report: say why
            reason = f"could not be drawn: {type(err).__name__}: {err}"
            missing.append({"section": spec.title, "reason": reason})
    failed = _failed_jobs(frame)
    no_results = _jobs_without_results(root)
    if no_results:
        why = "no results.jsonl (not run yet, still running, or killed before writing)"
        missing.insert(0, {"section": "Jobs " + ", ".join(no_results), "reason": why})
    for problem in problems:
        missing.insert(0, {"section": "Unreadable rows", "reason": problem})
    states = pd.Series([j.state for j in jobs], dtype=object).value_counts()
    tasks = _tasks(frame)
    return {
        "name": root.resolve().name,
        "sweep": str(root.resolve()),
        "built": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "summary": {
            "jobs": len(jobs),
            "ok": int(states.get("ok", 0)),
            "failed": int(states.get("failed", 0)),
            "others": {
                state: int(states[state])
                for state in ("running", "incomplete", UNREADABLE, NOT_STARTED)
                if state in states
            },
        },
        "jobs": [j._asdict() for j in jobs if j.state not in USED or j.detail],
        "tasks": tasks,
        "colors": {v: colors[v] for v in in_sweep},
        "run": _run_metadata(root, env),
        "missing": missing,
        "failed": failed,
        "leaderboards": [
            {"board": board, "table": _styled(board, colors)}
            for board in (leaderboard(task, frame[frame["task"] == task]) for task in tasks)
        ],
        "figures": drawn,
        "notes": [{"variant": v, "note": NOTES.get(v)} for v in in_sweep],
        "non_causal": [v for v in in_sweep if v in NOTES and not NOTES[v].causal],
    }


def _tasks(frame: pd.DataFrame) -> list[str]:
    found = set(frame["task"].dropna())
    return [t for t in TASK_ORDER if t in found] + sorted(found - set(TASK_ORDER))


# --- run metadata, failures, missing jobs ---------------------------------------------------


def _run_metadata(root: Path, env: list[dict]) -> list[dict[str, str]]:
    """Key/value rows: every env.json field (one value, or how it varies across jobs) and the
    sweep's overrides from Hydra's multirun.yaml."""
    rows = []
    keys = list(dict.fromkeys(k for record in env for k in record if k != "job_dir"))
    for key in keys:
        values = pd.Series([str(record.get(key, "—")) for record in env])
        counts = values.value_counts()
        if len(counts) == 1:
            text = counts.index[0]
        elif len(counts) <= 3:
            text = "varies across jobs: " + "; ".join(f"{v} ({n} jobs)" for v, n in counts.items())
        else:
            text = f"one per job ({len(counts)} values; each job's env.json has its own)"
        rows.append({"key": key, "value": text, "wide": len(text) > WIDE})
    if not env:
        rows.append(
            {"key": "environment", "value": "no env.json in any job directory", "wide": True}
        )
    overrides = _sweep_overrides(root)
    if overrides is not None:
        text = " ".join(overrides) or "(none)"
        rows.append({"key": "sweep overrides", "value": text, "wide": len(text) > WIDE})
    return rows


def _sweep_overrides(root: Path) -> list[str] | None:
    path = root / "multirun.yaml"
    if not path.is_file():
        return None
    config = OmegaConf.load(path)
    return [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=[])]


def _failed_jobs(frame: pd.DataFrame) -> list[dict[str, Any]]:
    failed = frame[frame["status"] == "failed"]
    jobs = []
    for job_dir, rows in failed.groupby("job_dir", sort=False):
        first = rows.iloc[0]
        error = next((str(e) for e in rows["error"] if isinstance(e, str) and e.strip()), "")
        lines = [line for line in error.splitlines() if line.strip()] or ["(no error text)"]
        jobs.append(
            {
                "job": job_dir,
                "variant": first["variant"],
                "task": first["task"],
                "seed": first.get("seed"),
                "headline": lines[-1],
                "error": error if len(lines) > 1 else "",
            }
        )
    return sorted(jobs, key=lambda job: _natural(job["job"]))


def _jobs_without_results(root: Path) -> list[str]:
    """Hydra job directories (they hold .hydra/) with no results.jsonl."""
    jobs = [p.parent for p in root.rglob(".hydra") if p.is_dir()]
    lacking = [str(j.relative_to(root)) for j in jobs if not (j / "results.jsonl").is_file()]
    return sorted((j for j in lacking if j != "."), key=_natural)


def _natural(name: str) -> list[tuple[int, int | str]]:
    """Sort key putting job 2 before job 10."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p]


# --- leaderboards ---------------------------------------------------------------------------


def _key_columns(rows: pd.DataFrame) -> list[str]:
    """Settings that tell a task's jobs apart besides variant and seed: columns that take
    several values within one variant (swept config values, backend, dtype)."""
    candidates = ["backend", "dtype", "device"] + [c for c in rows.columns if "." in c]
    by_variant = rows.groupby("variant")
    return [
        c
        for c in candidates
        if c in rows.columns
        and c.split(".")[-1] != "seed"
        and by_variant[c].nunique(dropna=False).max() > 1
    ]


def _final_values(rows: pd.DataFrame, col: Column) -> dict[str, pd.Series]:
    """The column's value at each job's last recorded step, indexed by (job_dir, domain); one
    series per `pass` when the metric has one."""
    rows = summary_rows(figures.routed(rows) if col.routing else rows, col.metric)
    rows = rows.dropna(subset=["value"])
    rows = rows.assign(domain=column(rows, "domain").fillna(ALL_DOMAINS))
    passes = column(rows, "pass")
    out = {}
    for pass_ in sorted(passes.dropna().unique()) or ([None] if len(rows) else []):
        part = rows if pass_ is None else rows[passes == pass_]
        last = part.sort_values("step", na_position="first").groupby(["job_dir", "domain"])
        label = col.label if pass_ is None else f"{col.label} {PASS_LABEL.get(pass_, pass_)}"
        unit = f" [{col.unit}]" if col.unit else ""
        out[label + unit + ARROW[col.better]] = last["value"].last() * col.scale
    return out


class Board(NamedTuple):
    """One task's leaderboard: display strings, where the best values are, how rows group."""

    task: str
    shown: pd.DataFrame  # one row per (variant, settings), cells already formatted
    best: pd.DataFrame  # True where `shown` holds a best value (same index and columns)
    ties: list[str]  # settings that define the groups in which a best is marked
    numeric: list[str]  # right-aligned columns


def leaderboard(task: str, rows: pd.DataFrame) -> Board:
    """Rows of one task -> one leaderboard row per variant, setting and domain, seeds pooled."""
    keys = _key_columns(rows)
    jobs = rows.groupby("job_dir").agg(
        variant=("variant", "first"),
        failed=("status", lambda s: (s == "failed").any()),
        **{k: (k, "first") for k in keys},
        **{p: (p, "first") for p in ("params_total", "params_active") if p in rows.columns},
    )
    specs, values = {}, {}
    for col in LEADERBOARD:
        for label, series in _final_values(rows[rows["status"] == "ok"], col).items():
            specs[label], values[label] = col, series
    index = pd.MultiIndex.from_tuples([], names=["job_dir", "domain"])
    cases = pd.DataFrame(values, columns=list(specs), index=index if not values else None)
    cases = cases.reset_index().merge(jobs, left_on="job_dir", right_index=True, how="right")
    cases["domain"] = cases["domain"].fillna(ALL_DOMAINS)
    if (cases["domain"] != ALL_DOMAINS).any():
        keys.append("domain")  # per-domain metrics (balance task): one row per domain
    # a job none of whose rows this board shows (dense under balance metrics) gets no row,
    # unless it failed: failures stay visible
    shown = cases[list(specs)].notna().any(axis=1) | cases["failed"]
    table = []
    for group, part in cases[shown].groupby(["variant", *keys], dropna=False, sort=True):
        record = dict(zip(["variant", *keys], group))
        record["runs"] = _runs_text(part.drop_duplicates("job_dir"))
        for label in specs:
            found = part[label].dropna()
            record[label] = (found.mean(), found.std() if len(found) > 1 else math.nan)
        if "params_total" in part:
            record["params total / active"] = (
                f"{_count(part['params_total'].iloc[0])} / {_count(part['params_active'].iloc[0])}"
            )
        table.append(record)
    # Rows that share settings sit together, so the best of each block reads at a glance.
    ties = [k for k in keys if not k.startswith("variant.")]
    table = pd.DataFrame(table, columns=["variant", *keys, *specs, "runs"]).sort_values(
        [*ties, "variant"], kind="stable", ignore_index=True
    )
    best = _best_cells(table, specs, ties)
    shown = _display(table, specs, best, keys)
    numeric = [c for c in [*specs, "params total / active", "runs"] if c in shown.columns]
    return Board(task, shown, best.reindex(columns=shown.columns, fill_value=False), ties, numeric)


def _runs_text(part: pd.DataFrame) -> str:
    failed = int(part["failed"].sum())
    return f"{len(part)}" if not failed else f"{len(part)} ({failed} failed)"


def _count(n: Any) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    n = float(n)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}"


def _best_cells(table: pd.DataFrame, specs: dict[str, Column], ties: list[str]) -> pd.DataFrame:
    """True where a row holds the best mean of its column among rows with the same settings."""
    best = pd.DataFrame(False, index=table.index, columns=table.columns)
    groups = (
        [part.index for _, part in table.groupby(ties, dropna=False)] if ties else [table.index]
    )
    for label, col in specs.items():
        if col.better is None:
            continue
        means = table[label].map(lambda cell: cell[0])
        for index in groups:
            values = means.loc[index].dropna()
            if len(values) < 2:
                continue
            target = values.max() if col.better == "max" else values.min()
            best.loc[values.index[values == target], label] = True
    return best


def _display(
    table: pd.DataFrame, specs: dict[str, Column], best: pd.DataFrame, keys: list[str]
) -> pd.DataFrame:
    shown = table.copy()
    shown["variant"] = [
        v + ("  ⚠ non-causal" if v in NOTES and not NOTES[v].causal else "")
        for v in table["variant"]
    ]
    for key in keys:
        shown[key] = table[key].map(lambda v: "—" if pd.isna(v) else plain(v))
    for label, col in specs.items():
        shown[label] = [
            _cell(mean, std, col.fmt) + (BEST if best.at[i, label] else "")
            for i, (mean, std) in table[label].items()
        ]
    order = ["variant", *keys, *specs, "params total / active", "runs"]
    return shown[[c for c in order if c in shown.columns]]


def _cell(mean: float, std: float, fmt: Callable[[float], str]) -> str:
    if math.isnan(mean):
        return "—"
    return fmt(mean) if math.isnan(std) else f"{fmt(mean)} ± {fmt(std)}"


def _styled(board: Board, colors: dict[str, str]) -> str:
    """The board as an HTML table (pandas Styler): cells escaped, best cells and variant
    swatches marked with CSS classes defined in the template."""
    shown = board.shown
    classes = board.best.replace({True: "best", False: ""}).astype(str)
    classes[board.numeric] = classes[board.numeric] + " num"
    classes["variant"] = [
        f"variant v-{v.split()[0]}" if v.split()[0] in colors else "variant"
        for v in shown["variant"]
    ]
    styler = (
        shown.style.hide(axis="index")
        .format(escape="html")
        .set_td_classes(classes)
        .set_table_attributes('class="leaderboard"')
    )
    return styler.to_html(table_uuid=f"lb-{board.task}")
