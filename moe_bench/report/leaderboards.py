"""Leaderboards: one table per task, one row per arm (and domain), seeds pooled.

Each cell is an `stats.Estimate` (mean ± std over the arm's seeds, or one timed job's 95%
half-width); a ★ marks a best value beyond the noise among arms with the same settings
(`stats.verdict`: Welch's t interval across seeds, the interleaved ratio's interval for one
timed job). `findings` turns the boards into the summary sentences each task's run card asks
for (`card.task_answers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pandas as pd

from moe_bench import schema
from moe_bench.schema import Metric

from . import frames, stats
from .frames import ARM, RUN, column, summary_rows
from .stats import Estimate


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


EP_COLUMNS = (  # expert-parallel traffic, where a task logged it
    Column("devices/token", schema.DEVICES_PER_TOKEN, "ranks", _fixed(2), routing=True),
    Column("bytes/token", schema.BYTES_PER_TOKEN, "B", _fixed(0), routing=True),
    Column("remote fraction", schema.REMOTE_FRACTION, "", _fixed(3), routing=True),
    Column("rank imbalance", schema.RANK_IMBALANCE, "×", _fixed(3), routing=True),
    Column("a2a", schema.A2A_MS, "ms", _fixed(1)),
    Column("speedup vs ep1", schema.SPEEDUP_VS_EP1, "×", _fixed(2)),
)
LEADERBOARD = (
    *EP_COLUMNS,
    # training logs tokens/s every few steps: the run's mean, not its last sample
    Column("tokens/s", schema.TOKENS_PER_S, "tok/s", _fixed(0), reduce="mean"),
    Column("TFLOP/s", schema.TFLOPS, "TFLOP/s", _fixed(3), ranked=False),
    # time (or peak memory) over the dense FFN of equal active FLOPs: its denominator differs
    # per arm, so it is shown beside the ranking measure, not ranked
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
ALL_DOMAINS = "all"  # domain of rows that are not split by domain
TIMED = {schema.TOKENS_PER_S.name, schema.RATIO_TO_DENSE.name, schema.TFLOPS.name}
SPREAD = " spread"  # suffix of the hidden columns holding a cell's timing half-width
MARK_TEXT = {"best": " ★", "tie": " (tie)", "unknown": " ☆", "": ""}


def label_of(col: Column, pass_: str | None) -> str:
    """A column's header: label, pass, unit, arrow (e.g. `tokens/s fwd+bwd [tok/s] ↑`)."""
    name = col.label if pass_ is None else f"{col.label} {PASS_LABEL.get(pass_, pass_)}"
    unit = f" [{col.unit}]" if col.unit else ""
    return name + unit + ARROW[col.better]


class Final(NamedTuple):
    """A column's values per (run, domain) and their timing half-widths (`frames.runs`: a job
    folder, or one config of a job that wrote several, the race's arms)."""

    col: Column
    pass_: str | None
    values: pd.Series
    spread: pd.Series


def final_values(rows: pd.DataFrame, col: Column) -> dict[str, Final]:
    """The column's value per run, indexed by (run, domain): at the run's last recorded step
    (or the mean over its steps, `col.reduce`), with its 95% half-width where timed (NaN
    otherwise); one entry per `pass` when the metric has one."""
    rows = rows if RUN in rows else rows.assign(**{RUN: frames.runs(rows)})
    picked = summary_rows(frames.routed(rows) if col.routing else rows, col.metric)
    picked = picked.dropna(subset=["value"])
    picked = picked.assign(domain=column(picked, "domain").fillna(ALL_DOMAINS))
    passes = column(picked, "pass")
    out = {}
    for pass_ in sorted(passes.dropna().unique()) or ([None] if len(picked) else []):
        part = picked if pass_ is None else picked[passes == pass_]
        last = part.sort_values("step", na_position="first").groupby([RUN, "domain"])
        values = (
            last["value"].mean() if col.reduce == "mean" else last["value"].last()
        ) * col.scale
        spread = pd.Series(math.nan, index=values.index)
        if col.reduce == "mean":  # a mean over steps: the t half-width of that mean
            spread = last["value"].agg(frames.steps_half_width) * col.scale
        if col.metric in TIMED and (rel := frames.timing_half_width(rows, pass_)).notna().any():
            jobs = values.index.get_level_values(RUN)
            spread = values * rel.reindex(jobs).to_numpy()
        out[label_of(col, pass_)] = Final(col, pass_, values, spread)
    return out


class Board(NamedTuple):
    """One task's leaderboard: display strings, where the best values are, how rows group."""

    task: str
    shown: pd.DataFrame  # one row per arm (and domain), cells already formatted
    best: pd.DataFrame  # True where `shown` holds a best value beyond the noise (★)
    ties: list[str]  # settings that define the groups in which a best is marked
    numeric: list[str]  # right-aligned columns
    table: pd.DataFrame  # the numbers behind `shown`: Estimate cells
    specs: dict[str, Final]  # the metric columns of `table`
    rankable: list[bool]  # per row: no failed, incomplete or noisy job
    marks: pd.DataFrame  # "best", "tie", "unknown" (☆: noise not measured), ""


def _key_columns(rows: pd.DataFrame) -> list[str]:
    """Settings that tell a task's arms apart besides the variant: config columns that take
    several values within one variant (swept config values, backend, dtype); a column equal to
    an earlier one in every row (`variant.backend` beside `backend`) is shown once."""
    candidates = ["backend", "dtype", "device"] + [c for c in rows.columns if "." in c]
    by_variant = rows.groupby("variant")
    keys: list[str] = []
    for c in candidates:
        if (
            c in rows.columns
            and c.split(".")[-1] != "seed"
            and not c.startswith(("env.", "card."))
            and by_variant[c].nunique(dropna=False).max() > 1
            and not any(rows[c].astype(str).equals(rows[k].astype(str)) for k in keys)
        ):
            keys.append(c)
    return keys


def _job_flags(rows: pd.DataFrame) -> pd.DataFrame:
    """Per run: `noisy` (a timing row flagged noisy), `reference` (a race's reference rows),
    `failed` (a row of its job not ok),
    `incomplete` (its job has no `job` row while other jobs of the sweep have one: it was
    killed or is still running) and `leaks`. Failure and completion are the job folder's: every
    run of a race job shares them."""
    noisy = column(rows, "noisy").map(frames.is_true)
    run = rows[RUN]
    has_end = (rows["metric"] == schema.JOB.name).groupby(rows["job_dir"]).any()
    # rows written before `job` rows existed (or hand-made ones) have none at all: not incomplete
    incomplete = ~has_end if has_end.any() else pd.Series(False, index=has_end.index)
    failed = (rows["status"] != "ok").groupby(rows["job_dir"]).any()
    job_of = rows.groupby(run)["job_dir"].first()
    return pd.DataFrame(
        {
            "failed": job_of.map(failed).astype(bool),
            "noisy": noisy.groupby(run).any(),
            "incomplete": job_of.map(incomplete).astype(bool),
            "leaks": frames.leaks(rows),
            "reference": column(rows, "reference").map(frames.is_true).groupby(run).any(),
        }
    )


def leaderboard(task: str, rows: pd.DataFrame) -> Board:
    """Rows of one task -> one leaderboard row per arm and domain, seeds pooled."""
    rows = rows if ARM in rows else frames.with_arms(rows)
    keys = _key_columns(rows)
    rows = rows if RUN in rows else rows.assign(**{RUN: frames.runs(rows)})
    jobs = rows.groupby(RUN).agg(
        arm=(ARM, "first"),
        variant=("variant", "first"),
        **{k: (k, "first") for k in keys},
        **{p: (p, "first") for p in ("params_total", "params_active") if p in rows.columns},
    )
    jobs = jobs.join(_job_flags(rows))
    jobs["incomplete"] &= ~jobs["failed"]  # a failed job is listed as failed, not incomplete
    # what a column can read, selected once (filtering a wide frame copies every column):
    # ok jobs' rows of the board's metrics and the timed ratio (whose interval a rate's spread
    # takes), not per expert (most of a training sweep's rows: never a leaderboard value), in
    # the columns `final_values` reads
    needed = {c.metric for c in LEADERBOARD} | {schema.RATIO_TO_DENSE.name}
    read = [RUN, "job_dir", "metric", "value", "step", "domain", "pass", "layer", "ratio_ci95"]
    experts = frames.find_column(rows, frames.EXPERTS)
    ok = rows.loc[
        (rows["status"] == "ok") & rows["metric"].isin(needed) & column(rows, "expert").isna(),
        [c for c in [*read, experts] if c is not None and c in rows.columns],
    ]
    present = set(ok["metric"].unique())
    specs, values = {}, {}
    for col in (c for c in LEADERBOARD if c.metric in present):
        for label, final in final_values(ok, col).items():
            specs[label], values[label], values[label + SPREAD] = final, final.values, final.spread
    index = pd.MultiIndex.from_tuples([], names=[RUN, "domain"])
    cases = pd.DataFrame(values, columns=list(values), index=index if not values else None)
    cases = cases.reset_index().merge(jobs, left_on=RUN, right_index=True, how="right")
    cases["domain"] = cases["domain"].fillna(ALL_DOMAINS)
    split = ["domain"] if (cases["domain"] != ALL_DOMAINS).any() else []
    # a job none of whose rows this board shows (dense under balance metrics) gets no row,
    # unless it failed or did not finish: those stay visible
    shown = cases[list(specs)].notna().any(axis=1) | cases["failed"] | cases["incomplete"]
    table = []
    for group, part in cases[shown].groupby([ARM, *split], dropna=False, sort=True):
        group = group if isinstance(group, tuple) else (group,)
        record: dict[str, Any] = dict(zip([ARM, *split], group))
        record["variant"] = part["variant"].iloc[0]
        record.update({k: part[k].iloc[0] for k in keys})
        each = part.drop_duplicates(RUN)
        record["runs"] = _runs_text(each)
        # a race's reference (the base of every ratio) is shown beside its arms, never ranked
        flags = ["failed", "incomplete", "noisy", "reference"]
        record["_rankable"] = not (each[flags].any().any())
        record["_leaks"] = bool(each["leaks"].any())
        for label in specs:
            found = part[label].dropna()
            record[label] = Estimate(
                float(found.mean()) if len(found) else math.nan,
                float(found.std()) if len(found) > 1 else math.nan,
                len(found),
                float(part[label + SPREAD].mean()),
            )
        if "params_total" in part:
            total, active = part["params_total"].iloc[0], part["params_active"].iloc[0]
            record["params total / active"] = f"{_count(total)} / {_count(active)}"
        table.append(record)
    # Rows that share settings sit together, so the best of each block reads at a glance.
    ties = [k for k in keys if not k.startswith("variant.")] + split
    columns = [ARM, "variant", *keys, *split, *specs, "runs", "_rankable", "_leaks"]
    table = pd.DataFrame(table, columns=columns)
    table = _ordered(table, specs, ties)
    rankable = table.pop("_rankable").astype(bool).tolist()
    flagged = table.pop("_leaks").astype(bool).tolist()
    marks = _marks(table, specs, ties, rankable)
    agreement = _rank_agreement(table, specs, ties)
    shown = _display(table, specs, marks, [*keys, *split], flagged)
    if agreement is not None:
        shown["ranks"] = agreement
    best = (marks == "best").reindex(columns=shown.columns, fill_value=False)
    numeric = [c for c in [*specs, "params total / active", "runs"] if c in shown.columns]
    return Board(task, shown, best, ties, numeric, table, specs, rankable, marks)


def ranking_label(specs: dict[str, Final]) -> str | None:
    """The measure a board is sorted by: fwd+bwd tokens/s where present, else fwd."""
    labels = [name for name, f in specs.items() if f.col.metric == schema.TOKENS_PER_S.name]
    return next((name for name in labels if "fwd+bwd" in name), labels[0] if labels else None)


def _ordered(table: pd.DataFrame, specs: dict[str, Final], ties: list[str]) -> pd.DataFrame:
    """Rows by settings, then fastest first where the board has tokens/s, else by arm."""
    rank = ranking_label(specs)
    if rank is None or table.empty:
        return table.sort_values([*ties, ARM], kind="stable", ignore_index=True)
    speed = table[rank].map(lambda e: -e.mean if not e.missing else math.inf)
    return (
        table.assign(_speed=speed)
        .sort_values([*ties, "_speed", ARM], kind="stable", ignore_index=True)
        .drop(columns="_speed")
    )


def _groups(table: pd.DataFrame, ties: list[str]) -> list[pd.Index]:
    return [p.index for _, p in table.groupby(ties, dropna=False)] if ties else [table.index]


def _rank_agreement(
    table: pd.DataFrame, specs: dict[str, Final], ties: list[str]
) -> list[str] | None:
    """Per row, whether ratio to dense ranks it where tokens/s does; None when the board lacks
    either. They can disagree: each arm's dense twin has its own active FLOPs and speed."""
    rank = ranking_label(specs)
    if rank is None:
        return None
    ratio = rank.replace("tokens/s", "ratio to dense").replace("[tok/s] ↑", "[×] ↓")
    if ratio not in table:
        return None
    out = [""] * len(table)
    for index in _groups(table, ties):
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
    table: pd.DataFrame, specs: dict[str, Final], ties: list[str], rankable: list[bool]
) -> pd.DataFrame:
    """Per cell: "best" (★) where a rankable row leads its column among rows with the same
    settings beyond the noise, "tie" for rows within the noise of the leader (or equal as
    printed), "unknown" (☆) for a leader whose noise was not measured; "" elsewhere. Failed,
    incomplete and noisy rows are never marked."""
    marks = pd.DataFrame("", index=table.index, columns=table.columns)
    for label, final in specs.items():
        col = final.col
        if col.better is None or not col.ranked:
            continue
        same = lambda a, b, fmt=col.fmt: fmt(a) == fmt(b)
        for index in _groups(table, ties):
            cells = [table.at[i, label] for i in index]
            v = stats.verdict(cells, col.better, [rankable[i] for i in index], same)
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
    specs: dict[str, Final],
    marks: pd.DataFrame,
    keys: list[str],
    flagged: list[bool],
) -> pd.DataFrame:
    shown = table.copy()
    shown[ARM] = [a + ("  ⚠ non-causal" if leak else "") for a, leak in zip(table[ARM], flagged)]
    for key in keys:
        shown[key] = table[key].map(lambda v: "—" if pd.isna(v) else frames.plain(v))
    for label, final in specs.items():
        shown[label] = [
            cell_text(cell, final.col.fmt) + MARK_TEXT[marks.at[i, label]]
            for i, cell in table[label].items()
        ]
    order = [ARM, *keys, *specs, "params total / active", "runs"]
    return shown[[c for c in order if c in shown.columns]]


def cell_text(cell: Estimate, fmt: Callable[[float], str]) -> str:
    """mean ± std over seeds; one timed job: value (± its 95% half-width)."""
    if cell.missing:
        return "—"
    if not math.isnan(cell.std):
        return f"{fmt(cell.mean)} ± {fmt(cell.std)}"
    if not math.isnan(cell.spread):
        return f"{fmt(cell.mean)} (95% ± {fmt(cell.spread)})"
    return fmt(cell.mean)


def styled(board: Board, classes_of: dict[str, str]) -> str:
    """The board as an HTML table (pandas Styler): cells escaped, best cells and arm swatches
    marked with CSS classes (`classes_of`: arm label -> its swatch class)."""
    shown = board.shown
    classes = board.best.replace({True: "best", False: ""}).astype(str)
    classes[board.numeric] = classes[board.numeric] + " num"
    classes[ARM] = [f"variant {classes_of.get(a, '')}".strip() for a in board.table[ARM]]
    styler = (
        shown.style.hide(axis="index")
        .format(escape="html")
        .set_td_classes(classes)
        .set_table_attributes('class="leaderboard"')
    )
    return styler.to_html(table_uuid=f"lb-{board.task}")
