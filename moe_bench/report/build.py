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
import gzip
import math
import os
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

from moe_bench import claims, components, results, schema
from moe_bench.schema import Metric

from . import figures, sections
from .figures import Missing, column, plain, summary_rows

TEMPLATES = Path(__file__).parent / "templates"
TASK_ORDER = ("throughput", "memory", "balance", "convergence")
WIDE = 32  # run metadata values longer than this get a line of their own


class VariantNote(NamedTuple):
    loss: str  # the balance-loss normalisation as this suite implements it (docs/contract.md §3)


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
        "construction. With selection_scope=batch (the paper's rule) an expert's choice "
        "depends on later tokens of the sequence, which leaks the future in a causal LM; "
        "selection_scope=position picks among the tokens at one position and does not."
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
    reduce: str = "last"  # per job: the last step's value, or "mean" over the logged steps
    ranked: bool = True  # False: shown beside the ranking measure, never starred

    @property
    def metric(self) -> str:
        return self.schema.name

    @property
    def better(self) -> str | None:
        return self.schema.better


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:,.{digits}f}"


# expert parallelism (task=expert_parallel): the traffic table per variant and setting
EP_COLUMNS = (
    Column("devices/token", schema.DEVICES_PER_TOKEN, "ranks", _fixed(2), routing=True),
    Column("bytes/token", schema.BYTES_PER_TOKEN, "B", _fixed(0), routing=True),
    Column("remote fraction", schema.REMOTE_FRACTION, "", _fixed(3), routing=True),
    Column("rank imbalance", schema.RANK_IMBALANCE, "×", _fixed(3), routing=True),
    Column("a2a", schema.A2A_MS, "ms", _fixed(1)),
    Column("speedup vs ep1", schema.SPEEDUP_VS_EP1, "×", _fixed(2)),
)
LEADERBOARD = (
    *EP_COLUMNS,  # only where a task logged them (task=expert_parallel)
    # convergence logs tokens/s every few steps: the run's mean, not its last sample
    Column("tokens/s", schema.TOKENS_PER_S, "tok/s", _fixed(0), reduce="mean"),
    # time (throughput) or peak memory (memory) over the dense FFN of equal active FLOPs: its
    # denominator differs per variant, so it is shown beside the ranking measure, not ranked
    Column("ratio to dense", schema.RATIO_TO_DENSE, "×", _fixed(2), ranked=False),
    Column("peak memory", schema.PEAK_MEMORY_BYTES, "MiB", _fixed(1), scale=2**-20),
    Column("final val loss", schema.VAL_LOSS, "nats", _fixed(3)),
    # the field's unit for byte-level LMs: bits per byte = nats / ln 2
    Column("final val loss", schema.VAL_LOSS, "bits/byte", _fixed(3), scale=1 / math.log(2)),
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


def build_report(sweep_dir: str | Path, gzip_csv: bool = False) -> Path:
    """Write <sweep_dir>/report.html and <sweep_dir>/results.csv (results.csv.gz with
    `gzip_csv`, or when the directory holds only that saved table); return the report's path.

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
    data = _data_file(root, gzip_csv)
    context = _context(root, frame, results.load_env(root), jobs, problems)
    html = render({**context, "data_file": data})
    _write_table(root / data, frame)
    path = root / "report.html"
    results.atomic_write(path, html)
    return path


def _data_file(root: Path, gzip_csv: bool) -> str:
    """The tidy table's name beside the report: compressed when asked, or when the directory
    is a saved example (results.csv.gz and no job results), which is then left as it is."""
    saved = (root / "results.csv.gz").is_file() and next(root.rglob("results.jsonl"), None) is None
    return "results.csv.gz" if gzip_csv or saved else "results.csv"


def _write_table(path: Path, frame: pd.DataFrame) -> None:
    if path.suffix != ".gz":
        results.atomic_write(path, frame.to_csv(index=False))
        return
    # mtime=0: the same rows give the same bytes (a committed example diffs cleanly)
    tmp = path.with_name(f".{path.name}.tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as out:
        out.write(frame.to_csv(index=False).encode())
    os.replace(tmp, path)


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
    return render_template("report.html.j2", context)


def render_template(name: str, context: dict[str, Any]) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template(name).render(**context)


def _context(
    root: Path, frame: pd.DataFrame, env: list[dict], jobs: list[JobInfo], problems: list[str]
) -> dict[str, Any]:
    # only finished jobs' rows count: an incomplete job's last rows are not its final values
    # (a saved table, results.csv.gz alone, has no job folders: its rows are all there is)
    if jobs:
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
            {
                "board": board,
                "table": _styled(board, colors),
                "measure": MEASURES.get(board.task, ""),
                "asks": ASKS.get(board.task, ""),
                "marked": board.marks is not None and bool((board.marks != "").to_numpy().any()),
            }
            for board in (leaderboard(task, frame[frame["task"] == task]) for task in tasks)
        ],
        "figures": drawn,
        "notes": [{"variant": v, "note": NOTES.get(v)} for v in in_sweep],
        "non_causal": non_causal(frame),
        **_reading(frame),
    }


def _tasks(frame: pd.DataFrame) -> list[str]:
    found = set(frame["task"].dropna())
    return [t for t in TASK_ORDER if t in found] + sorted(found - set(TASK_ORDER))


# --- reading aids: the summary, what ran, identical routers, specialisation ----------------

# The question each task's leaderboard answers, and what it measures against what, in words.
ASKS = {
    "throughput": "How fast is one layer?",
    "memory": "How much memory does one training step of the layer take?",
    "balance": "How evenly does an untrained router spread tokens?",
    "convergence": "How well and how fast does a small LM train with the layer?",
}
MEASURES = {
    "throughput": (
        "Measure: tokens/s of one layer (tokens / median time of the timed repeats), forward + "
        "backward and forward only; rows are ranked by forward + backward tokens/s. Beside it, "
        "ratio to dense: layer time / time of a dense FFN with the same active FLOPs per "
        "token, timed interleaved in the same job on the same input (below 1: faster than that "
        "FFN). The ratio's baseline differs per variant, so the two can rank rows differently; "
        "the ranks column says where they do. Spread: IQR of the timed repeats."
    ),
    "memory": (
        "Measure: peak memory of one forward + backward step of the layer; ratio: that peak / "
        "the peak of a dense FFN with the same active FLOPs, measured in the same job."
    ),
    "balance": (
        "Untrained routing: freshly initialised routers (no training step) on real text and "
        "on skewed inputs (pushed toward expert 0). Measure: MaxVio_global (0 = perfect "
        "balance), load entropy (1 = uniform) and drop fraction, per input kind. Variants whose "
        "untrained routers are the same give identical rows here; training is what tells "
        "their balancing methods apart (see convergence)."
    ),
    "convergence": (
        "Measure: final validation loss of a small byte-level LM trained with each layer, in "
        "nats and in bits per byte (bits = nats / ln 2), lower is better; tokens/s is the "
        "mean over the run's logged training steps (forward, backward, optimizer); balance "
        "columns are after training. Baseline: the dense row (same active FLOPs)."
    ),
}


def _reading(frame: pd.DataFrame) -> dict[str, Any]:
    """Context for the sections that read across tasks (summary, what ran, ...)."""
    ok = frame[frame["status"] == "ok"]
    ran = sections.what_ran(ok)
    spec = sections.specialisation(ok)
    return {
        "findings": _findings(frame),
        "claims": claims.rows_for_report(frame),
        "claims_rule": claims.RULE,
        "claims_gaps": claims.gaps(frame),
        "what_ran": ran.to_dict("records"),
        "what_ran_columns": list(ran.columns),
        "identical": sections.identical_balance(ok),
        "specialisation": _specialisation_rows(spec),
        "spec_domains": spec.attrs.get("domains", ()),
        "spec_task": spec.attrs.get("task", ""),
    }


def _specialisation_rows(spec: pd.DataFrame) -> list[dict[str, str]]:
    return [
        {"variant": variant, **{c: f"{v:.3f}" for c, v in values.items()}}
        for variant, values in spec.iterrows()
    ]


# (question, task, column label prefix, words for the measure)
QUESTIONS = (
    ("fastest", "throughput", "tokens/s fwd+bwd", "forward + backward tokens/s"),
    ("most balanced after training", "convergence", "MaxVio_global", "MaxVio_global"),
    ("most balanced untrained", "balance", "MaxVio_global", "MaxVio_global"),
    ("best quality", "convergence", "final val loss [bits/byte]", "validation bits per byte"),
)


def _answer_group(board: Board) -> tuple[pd.DataFrame, list[bool]]:
    """The board rows one summary sentence compares: those sharing settings (the largest such
    block; for balance, real text before skewed inputs), since stars are per block too."""
    table = board.table.assign(_rankable=board.rankable)
    if board.ties:
        blocks = [part for _, part in table.groupby(board.ties, dropna=False, sort=False)]
        real = lambda part: "domain" in part and (part["domain"].astype(str) == "skewed").all()
        table = max(blocks, key=lambda part: (not real(part), len(part)))
    table = table.reset_index(drop=True)
    return table, table.pop("_rankable").astype(bool).tolist()


def _findings(frame: pd.DataFrame) -> list[str]:
    """The summary at the top: one generated sentence per question the sweep can answer."""
    out = []
    for question, task, prefix, words in QUESTIONS:
        if question == "most balanced untrained" and any("balanced" in f for f in out):
            continue  # the trained answer is the one a reader wants when there is one
        rows = frame[frame["task"] == task]
        if rows.empty:
            continue
        board = leaderboard(task, rows)
        label = next((c for c in board.specs or {} if c.startswith(prefix)), None)
        if label is None:
            continue
        table, rankable = _answer_group(board)
        col = board.specs[label]
        names = [str(v) for v in table["variant"]]
        found = sections.finding(
            question, words, names, list(table[label]), col.better, rankable, col.fmt
        )
        if found is not None:
            out.append(found.text)
    return out


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


TIMED = {schema.TOKENS_PER_S.name, schema.RATIO_TO_DENSE.name, schema.TFLOPS.name}
TIME_OF_PASS = {"fwd": schema.FWD_MS.name, "fwd_bwd": schema.FWD_BWD_MS.name}
SPREAD = " spread"  # suffix of the hidden columns holding a cell's timing spread
MARK_TEXT = {"best": " ★", "tie": " (tie)", "unknown": " ☆", "": ""}


def _relative_iqr(rows: pd.DataFrame, pass_: str | None) -> pd.Series:
    """Per job: IQR / median of the pass's timed repeats (`iqr_ms` on its fwd_ms / fwd_bwd_ms
    row); a rate or ratio over that median has, to first order, the same relative spread."""
    name = TIME_OF_PASS.get(str(pass_))
    if name is None or "iqr_ms" not in rows.columns:
        return pd.Series(dtype=float)
    timed = rows[(rows["metric"] == name) & (column(rows, "pass") == pass_)]
    iqr = pd.to_numeric(timed["iqr_ms"], errors="coerce") / pd.to_numeric(timed["value"])
    return iqr.groupby(timed["job_dir"]).mean()


def _final_values(rows: pd.DataFrame, col: Column) -> dict[str, tuple[pd.Series, pd.Series]]:
    """The column's value per job, indexed by (job_dir, domain): at the job's last recorded step
    (or the mean over its steps, `col.reduce`), with its timing spread in the same units (NaN
    when not timed); one entry per `pass` when the metric has one."""
    picked = summary_rows(figures.routed(rows) if col.routing else rows, col.metric)
    picked = picked.dropna(subset=["value"])
    picked = picked.assign(domain=column(picked, "domain").fillna(ALL_DOMAINS))
    passes = column(picked, "pass")
    out = {}
    for pass_ in sorted(passes.dropna().unique()) or ([None] if len(picked) else []):
        part = picked if pass_ is None else picked[passes == pass_]
        last = part.sort_values("step", na_position="first").groupby(["job_dir", "domain"])
        label = col.label if pass_ is None else f"{col.label} {PASS_LABEL.get(pass_, pass_)}"
        unit = f" [{col.unit}]" if col.unit else ""
        values = (
            last["value"].mean() if col.reduce == "mean" else last["value"].last()
        ) * col.scale
        spread = pd.Series(math.nan, index=values.index)
        if col.reduce == "mean":  # a mean over steps: their IQR is its spread (training tok/s)
            several = last["value"].count() > 1
            iqr = last["value"].quantile(0.75) - last["value"].quantile(0.25)
            spread = (iqr * col.scale).where(several)
        if col.metric in TIMED and (rel := _relative_iqr(rows, pass_)).notna().any():
            jobs = values.index.get_level_values("job_dir")
            spread = values * rel.reindex(jobs).to_numpy()
        out[label + unit + ARROW[col.better]] = (values, spread)
    return out


class Board(NamedTuple):
    """One task's leaderboard: display strings, where the best values are, how rows group."""

    task: str
    shown: pd.DataFrame  # one row per (variant, settings), cells already formatted
    best: pd.DataFrame  # True where `shown` holds a best value beyond the noise (★)
    ties: list[str]  # settings that define the groups in which a best is marked
    numeric: list[str]  # right-aligned columns
    table: pd.DataFrame | None = None  # the numbers behind `shown`: Estimate cells
    specs: dict[str, Column] | None = None  # the metric columns of `table`
    rankable: list[bool] | None = None  # per row: no failed, incomplete or noisy job
    marks: pd.DataFrame | None = None  # "best", "tie", "unknown" (☆: noise not measured), ""


def _is_true(value: Any) -> bool:
    """A boolean cell: True, or "true" as CSV and JSON round trips may write it."""
    return value is True or str(value).lower() == "true"


def _default_leak(variant: str) -> bool:
    """Rows recorded before the `leaks_future_tokens` column: the variant's default config says."""
    try:
        return bool(components.lookup(variant).make_config().leaks_future_tokens)
    except ValueError:  # a variant this install does not know
        return False


def _leaks(rows: pd.DataFrame) -> pd.Series:
    """Per job: whether its layer's routing sees later tokens of its sequence (the runner's
    column, written from the layer config's own `leaks_future_tokens`)."""
    variant = rows.groupby("job_dir")["variant"].first()
    recorded = column(rows, "leaks_future_tokens").groupby(rows["job_dir"]).first()
    return pd.Series(
        {
            job: _default_leak(name) if pd.isna(recorded.get(job)) else _is_true(recorded[job])
            for job, name in variant.items()
        },
        dtype=bool,
    )


def non_causal(rows: pd.DataFrame) -> list[str]:
    """Variants with a job whose routing sees later tokens of its sequence."""
    if rows.empty:
        return []
    leaks = _leaks(rows)
    return sorted(rows.groupby("job_dir")["variant"].first()[leaks].unique())


def _job_flags(rows: pd.DataFrame) -> pd.DataFrame:
    """Per job: `noisy` (a timing row flagged noisy), `incomplete` (no `job` row while other
    jobs of the sweep have one: it was killed or is still running) and `leaks`."""
    noisy = column(rows, "noisy").map(_is_true)
    has_end = (rows["metric"] == schema.JOB.name).groupby(rows["job_dir"]).any()
    # rows written before `job` rows existed (or hand-made ones) have none at all: not incomplete
    incomplete = ~has_end if has_end.any() else pd.Series(False, index=has_end.index)
    return pd.DataFrame(
        {
            "noisy": noisy.groupby(rows["job_dir"]).any(),
            "incomplete": incomplete,
            "leaks": _leaks(rows),
        }
    )


def leaderboard(task: str, rows: pd.DataFrame) -> Board:
    """Rows of one task -> one leaderboard row per variant, setting and domain, seeds pooled."""
    keys = _key_columns(rows)
    jobs = rows.groupby("job_dir").agg(
        variant=("variant", "first"),
        failed=("status", lambda s: (s != "ok").any()),
        **{k: (k, "first") for k in keys},
        **{p: (p, "first") for p in ("params_total", "params_active") if p in rows.columns},
    )
    jobs = jobs.join(_job_flags(rows))
    jobs["incomplete"] &= ~jobs["failed"]  # a failed job is listed as failed, not incomplete
    specs, values = {}, {}
    for col in LEADERBOARD:
        for label, (series, spread) in _final_values(rows[rows["status"] == "ok"], col).items():
            specs[label], values[label], values[label + SPREAD] = col, series, spread
    index = pd.MultiIndex.from_tuples([], names=["job_dir", "domain"])
    cases = pd.DataFrame(values, columns=list(values), index=index if not values else None)
    cases = cases.reset_index().merge(jobs, left_on="job_dir", right_index=True, how="right")
    cases["domain"] = cases["domain"].fillna(ALL_DOMAINS)
    if (cases["domain"] != ALL_DOMAINS).any():
        keys.append("domain")  # per-domain metrics (balance task): one row per domain
    # a job none of whose rows this board shows (dense under balance metrics) gets no row,
    # unless it failed or did not finish: those stay visible
    shown = cases[list(specs)].notna().any(axis=1) | cases["failed"] | cases["incomplete"]
    table = []
    for group, part in cases[shown].groupby(["variant", *keys], dropna=False, sort=True):
        record = dict(zip(["variant", *keys], group))
        each = part.drop_duplicates("job_dir")
        record["runs"] = _runs_text(each)
        record["_rankable"] = not (each["failed"].any() or each["incomplete"].any())
        record["_rankable"] &= not each["noisy"].any()
        record["_leaks"] = bool(each["leaks"].any())
        for label in specs:
            found = part[label].dropna()
            record[label] = sections.Estimate(
                float(found.mean()) if len(found) else math.nan,
                float(found.std()) if len(found) > 1 else math.nan,
                len(found),
                float(part[label + SPREAD].mean()),
            )
        if "params_total" in part:
            record["params total / active"] = (
                f"{_count(part['params_total'].iloc[0])} / {_count(part['params_active'].iloc[0])}"
            )
        table.append(record)
    # Rows that share settings sit together, so the best of each block reads at a glance.
    ties = [k for k in keys if not k.startswith("variant.")]
    table = pd.DataFrame(table, columns=["variant", *keys, *specs, "runs", "_rankable", "_leaks"])
    table = _ordered(table, specs, ties)
    rankable = table.pop("_rankable").astype(bool).tolist()
    leaks = table.pop("_leaks").astype(bool).tolist()
    marks = _marks(table, specs, ties, rankable)
    agreement = _rank_agreement(table, specs, ties)
    shown = _display(table, specs, marks, keys, leaks)
    if agreement is not None:
        shown["ranks"] = agreement
    best = (marks == "best").reindex(columns=shown.columns, fill_value=False)
    numeric = [c for c in [*specs, "params total / active", "runs"] if c in shown.columns]
    return Board(task, shown, best, ties, numeric, table, specs, rankable, marks)


def _ranking_label(specs: dict[str, Column]) -> str | None:
    """The measure a board is sorted by: fwd+bwd tokens/s where present, else fwd."""
    labels = [name for name, c in specs.items() if c.metric == schema.TOKENS_PER_S.name]
    return next((name for name in labels if "fwd+bwd" in name), labels[0] if labels else None)


def _ordered(table: pd.DataFrame, specs: dict[str, Column], ties: list[str]) -> pd.DataFrame:
    """Rows by settings, then fastest first where the board has tokens/s, else by variant."""
    rank = _ranking_label(specs)
    if rank is None or table.empty:
        return table.sort_values([*ties, "variant"], kind="stable", ignore_index=True)
    speed = table[rank].map(lambda e: -e.mean if not e.missing else math.inf)
    return (
        table.assign(_speed=speed)
        .sort_values([*ties, "_speed", "variant"], kind="stable", ignore_index=True)
        .drop(columns="_speed")
    )


def _rank_agreement(
    table: pd.DataFrame, specs: dict[str, Column], ties: list[str]
) -> list[str] | None:
    """Per row, whether ratio to dense ranks it where tokens/s does; None when the board lacks
    either. They can disagree: each variant's dense twin has its own active FLOPs and speed."""
    rank = _ranking_label(specs)
    if rank is None:
        return None
    ratio = rank.replace("tokens/s", "ratio to dense").replace("[tok/s] ↑", "[×] ↓")
    if ratio not in table:
        return None
    out = [""] * len(table)
    groups = [p.index for _, p in table.groupby(ties, dropna=False)] if ties else [table.index]
    for index in groups:
        speed = table.loc[index, rank].map(lambda e: e.mean).rank(ascending=False, method="min")
        cost = table.loc[index, ratio].map(lambda e: e.mean).rank(ascending=True, method="min")
        for i in index:
            if pd.isna(speed[i]) or pd.isna(cost[i]):
                continue
            out[i] = (
                "same rank"
                if speed[i] == cost[i]
                else f"ratio ranks it #{cost[i]:.0f}, tokens/s #{speed[i]:.0f}"
            )
    return out


def _runs_text(part: pd.DataFrame) -> str:
    flags = [
        f"{int(part[flag].sum())} {word}"
        for flag, word in (("failed", "failed"), ("incomplete", "incomplete"), ("noisy", "noisy"))
        if part[flag].any()
    ]
    return f"{len(part)}" + (f" ({', '.join(flags)})" if flags else "")


def _count(n: Any) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    n = float(n)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}"


def _marks(
    table: pd.DataFrame, specs: dict[str, Column], ties: list[str], rankable: list[bool]
) -> pd.DataFrame:
    """Per cell: "best" (★) where a rankable row leads its column among rows with the same
    settings by more than the noise, "tie" for rows within the noise of the leader (or equal as
    printed), "unknown" (☆) for a leader whose noise was not measured; "" elsewhere. Failed,
    incomplete and noisy rows are never marked."""
    marks = pd.DataFrame("", index=table.index, columns=table.columns)
    groups = [p.index for _, p in table.groupby(ties, dropna=False)] if ties else [table.index]
    for label, col in specs.items():
        if col.better is None or not col.ranked:
            continue
        same = lambda a, b, fmt=col.fmt: fmt(a) == fmt(b)
        for index in groups:
            cells = [table.at[i, label] for i in index]
            v = sections.verdict(cells, col.better, [rankable[i] for i in index], same)
            if v is None:
                continue
            if v.beyond_noise is False:
                for j in v.tied:
                    marks.at[index[j], label] = "tie"
            else:
                marks.at[index[v.leader], label] = "best" if v.beyond_noise else "unknown"
    return marks


def _display(
    table: pd.DataFrame,
    specs: dict[str, Column],
    marks: pd.DataFrame,
    keys: list[str],
    leaks: list[bool],
) -> pd.DataFrame:
    shown = table.copy()
    shown["variant"] = [
        v + ("  ⚠ non-causal" if leak else "") for v, leak in zip(table["variant"], leaks)
    ]
    for key in keys:
        shown[key] = table[key].map(lambda v: "—" if pd.isna(v) else plain(v))
    for label, col in specs.items():
        shown[label] = [
            _cell(cell, col.fmt) + MARK_TEXT[marks.at[i, label]] for i, cell in table[label].items()
        ]
    order = ["variant", *keys, *specs, "params total / active", "runs"]
    return shown[[c for c in order if c in shown.columns]]


def _cell(cell: sections.Estimate, fmt: Callable[[float], str]) -> str:
    """mean ± std over seeds; one seed with a timing spread: value (IQR width)."""
    if cell.missing:
        return "—"
    if not math.isnan(cell.std):
        return f"{fmt(cell.mean)} ± {fmt(cell.std)}"
    if not math.isnan(cell.spread):
        return f"{fmt(cell.mean)} (IQR {fmt(cell.spread)})"
    return fmt(cell.mean)


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
