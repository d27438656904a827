"""Report sections that read across tasks: what ran, identical untrained routers, expert
specialisation by domain, and the plain-words summary (one sentence per question a task's run
card asks, `card.task_answers`).

Each is a small function of the tidy rows (docs/contract.md §5) keyed by arm (`frames.ARM`);
none names a task or a variant: rows are told apart by their metrics and columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from moe_bench import schema

from . import frames, stats
from .frames import ARM, column, routed
from .leaderboards import Board, leaderboard
from .load import Answer, TaskCard
from .stats import Estimate, Verdict

# --- what ran ---------------------------------------------------------------------------------

# (heading, candidate dotted columns: the first with a value wins)
WHAT_RAN = (
    ("E (experts)", ("variant.num_experts",)),
    ("K (top-k)", ("variant.top_k",)),
    ("expert width", ("variant.expert_hidden", "variant.d_ff")),
    ("shared experts", ("variant.num_shared_experts",)),
    ("capacity factor", ("variant.capacity_factor",)),
)
# the balance coefficient each variant's config calls by its paper's name
COEFFICIENTS = (
    "variant.balance_coef",
    "variant.alpha1",
    "variant.alpha",
    "variant.importance_coef",
    "variant.load_coef",
    "variant.bias_update_rate",
)


def _first_value(rows: pd.DataFrame, names: tuple[str, ...]) -> Any:
    for name in names:
        values = column(rows, name).dropna()
        if len(values):
            return values.iloc[0]
    return None


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (int, float, np.number)):
        value = float(value)
        if value.is_integer() and abs(value) < 1e3:
            return str(int(value))
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= div:
                return f"{value / div:.2f}{suffix}"
        return f"{value:g}"
    return str(value)


def what_ran(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per arm (and task, when an arm label recurs with other sizes): E, K, expert
    width, shared experts, total/active parameters and FLOPs per token of one layer, capacity
    factor and balance coefficients, all read from the rows' own columns."""
    if frame.empty:
        return pd.DataFrame()
    frame = frame if ARM in frame else frames.with_arms(frame)
    sizes = [c for c in ("params_total", "params_active", "flops_per_token") if c in frame.columns]
    records = []
    for (arm, *_), part in frame.groupby([ARM, *sizes], dropna=False, sort=True):
        record: dict[str, str] = {ARM: arm}
        for heading, names in WHAT_RAN:
            record[heading] = _number(_first_value(part, names))
        record["params total"] = _number(_first_value(part, ("params_total",)))
        record["params active"] = _number(_first_value(part, ("params_active",)))
        record["FLOPs / token"] = _number(_first_value(part, ("flops_per_token",)))
        record["coefficient"] = _coefficient(part)
        records.append(record)
    return pd.DataFrame(records).drop_duplicates()


def _coefficient(rows: pd.DataFrame) -> str:
    found = [
        f"{name.split('.')[-1]} = {_number(value)}"
        for name in COEFFICIENTS
        if (value := _first_value(rows, (name,))) is not None
    ]
    return ", ".join(found) or "—"


# --- identical untrained routers --------------------------------------------------------------

BALANCE_METRICS = (schema.MAX_VIO_GLOBAL, schema.LOAD_ENTROPY, schema.MAX_VIO_BATCH)


def trained_jobs(frame: pd.DataFrame) -> set[str]:
    """Jobs that trained their router (they logged a train_loss)."""
    return set(frame.loc[frame["metric"] == schema.TRAIN_LOSS.name, "job_dir"])


def identical_balance(frame: pd.DataFrame) -> dict[str, list[list[str]]]:
    """Per task: groups of arms whose untrained-router balance rows are equal value for value
    (jobs that logged no train_loss). With the same seed and an untrained router of the same
    shape, routing is the same whatever the method: methods differ in how training moves it."""
    rows = frame[frame["metric"].isin(map(str, BALANCE_METRICS))]
    rows = routed(rows[~rows["job_dir"].isin(trained_jobs(frame))])
    if rows.empty:
        return {}
    rows = rows if ARM in rows else frames.with_arms(rows)
    keys = [k for k in ("metric", "layer", "domain", "step", "seed") if k in rows.columns]
    out: dict[str, list[list[str]]] = {}
    for task, by_task in rows.groupby("task", sort=True):
        groups: dict[tuple, list[str]] = {}
        for arm, part in by_task.groupby(ARM, sort=True):
            ordered = part.assign(**{k: part[k].astype(str) for k in keys}).sort_values(keys)
            sig = tuple(zip(*(ordered[k] for k in keys), ordered["value"].round(9)))
            groups.setdefault(sig, []).append(str(arm))
        found = [group for group in groups.values() if len(group) > 1]
        if found:
            out[str(task)] = found
    return out


# --- specialisation by domain -----------------------------------------------------------------


def _js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits: 0 = same distribution, 1 = disjoint experts."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return (kl(p) + kl(q)) / 2


def job_specialisation(frame: pd.DataFrame) -> pd.DataFrame:
    """Per job and MoE layer: the Jensen-Shannon divergence (bits) between the expert-load
    distributions of two domains at the job's last recorded step (columns arm, job_dir,
    layer, js); `attrs` name the domains and tasks. Empty without per-domain expert_load rows."""
    loads = routed(frame[frame["metric"] == schema.EXPERT_LOAD.name])
    trained = loads["job_dir"].isin(trained_jobs(frame))
    if trained.any():  # trained routers specialise; untrained do not
        loads = loads[trained]
    loads = loads if ARM in loads else frames.with_arms(loads)
    loads = loads.assign(
        layer=column(loads, "layer"), domain=column(loads, "domain"), expert=column(loads, "expert")
    ).dropna(subset=["layer", "domain", "expert"])
    loads = loads[loads["layer"].astype(str) != "mean"]
    if loads.empty or loads["domain"].nunique() < 2:
        return pd.DataFrame()
    step = column(loads, "step")
    last = step.groupby(loads["job_dir"]).transform("max")
    loads = loads[(step == last) | last.isna()]
    first, second = sorted(loads["domain"].astype(str).unique())[:2]
    records = []
    for (arm, job, layer), part in loads.groupby([ARM, "job_dir", "layer"]):
        table = part.pivot_table(index="expert", columns="domain", values="value", aggfunc="sum")
        if first not in table or second not in table:
            continue
        table = table.fillna(0.0)
        js = _js_divergence(table[first].to_numpy(float), table[second].to_numpy(float))
        records.append({ARM: arm, "job_dir": job, "layer": layer, "js": js})
    per_job = pd.DataFrame(records)
    per_job.attrs["domains"] = (first, second)
    per_job.attrs["task"] = ", ".join(sorted(loads["task"].astype(str).unique()))
    return per_job


def specialisation(frame: pd.DataFrame) -> pd.DataFrame:
    """Per arm and layer, `job_specialisation` averaged over seeds; a `mean` column
    averages the layers. Empty without per-domain expert_load rows."""
    per_job = job_specialisation(frame)
    if per_job.empty:
        return pd.DataFrame()
    table = per_job.pivot_table(index=ARM, columns="layer", values="js", aggfunc="mean")
    table.columns = [f"layer {c}" for c in table.columns]
    table["mean"] = table.mean(axis=1)
    table.attrs = dict(per_job.attrs)
    return table.sort_values("mean", ascending=False)


# --- the plain-words summary ------------------------------------------------------------------


class Finding(NamedTuple):
    question: str  # "fastest", "most balanced", "best quality"
    text: str  # one sentence, generated from the data


def _noise_words(v: Verdict, n_seeds: int) -> str:
    if v.beyond_noise is True:
        return "beyond the noise"
    if v.beyond_noise is False:
        return "within the noise: a tie"
    return "noise not measured (one seed, no timing spread)" if n_seeds <= 1 else "noise unknown"


def finding(
    question: str,
    measure: str,
    labels: list[str],
    cells: list[Estimate],
    better: str,
    rankable: list[bool],
    fmt: Callable[[float], str],
) -> Finding | None:
    """One summary sentence: who leads `measure`, by how much over the runner-up, in noise?"""
    same = lambda a, b: fmt(a) == fmt(b)
    v = stats.verdict(cells, better, rankable, same)
    if v is None:
        return None
    lead, second = cells[v.leader], cells[v.runner_up]
    rel = abs(v.margin) / abs(second.mean) * 100 if second.mean else math.nan
    if v.beyond_noise is False and len(v.tied) > 1:
        names = ", ".join(labels[i] for i in v.tied)
        text = (
            f"{question.capitalize()}: no clear winner on {measure}; {names} are within the "
            f"noise of each other ({fmt(lead.mean)} vs {fmt(second.mean)})."
        )
        return Finding(question, text)
    text = (
        f"{question.capitalize()}: {labels[v.leader]}, {measure} {fmt(lead.mean)} vs "
        f"{fmt(second.mean)} for {labels[v.runner_up]} (runner-up), a margin of "
        f"{fmt(abs(v.margin))} ({rel:.1f}%), {_noise_words(v, lead.n)}."
    )
    return Finding(question, text)


# words for answers whose metric counts per routed assignment: with K experts per token an arm
# sends up to K copies, so traffic is compared per unit of K where the arms' K differ
PER_K = {schema.DEVICES_PER_TOKEN.name, schema.BYTES_PER_TOKEN.name}
TOP_K = "variant.top_k"


def _answer_label(board: Board, answer: Answer) -> str | None:
    for label, final in board.specs.items():
        if final.col.metric != answer.metric or (answer.pass_ or None) != final.pass_:
            continue
        if answer.unit is None or final.col.unit == answer.unit:
            return label
    return None


def answer_group(board: Board) -> tuple[pd.DataFrame, list[bool]]:
    """The board rows one summary sentence compares: those sharing settings (the largest such
    block), since stars are per block too."""
    table = board.table.assign(_rankable=board.rankable)
    if board.ties:
        blocks = [part for _, part in table.groupby(board.ties, dropna=False, sort=False)]
        table = max(blocks, key=len)
    table = table.reset_index(drop=True)
    return table, table.pop("_rankable").astype(bool).tolist()


def _per_k(table: pd.DataFrame, label: str, rows: pd.DataFrame) -> tuple[list[Estimate], str]:
    """The cells divided by each arm's K (its rows' variant.top_k) when the arms' K differ."""
    cells = list(table[label])
    if TOP_K not in rows:
        return cells, ""
    k_of = rows.groupby(ARM)[TOP_K].first()
    ks = [pd.to_numeric(k_of.get(a), errors="coerce") for a in table[ARM]]
    known = [k for k in ks if not pd.isna(k) and k > 0]
    if len(set(known)) < 2 or len(known) < len(ks):
        return cells, ""
    scaled = [Estimate(c.mean / k, c.std / k, c.n, c.spread / k) for c, k in zip(cells, ks)]
    return scaled, " per unit of K (the arms route to different numbers of experts K)"


def findings(
    frame: pd.DataFrame, cards: list[TaskCard], boards: dict[str, Board] | None = None
) -> list[str]:
    """The summary: one generated sentence per question a task's card asks that its board can
    answer (`boards`: the tasks' leaderboards where already built from these rows)."""
    frame = frame if ARM in frame else frames.with_arms(frame)
    out = []
    for card in cards:
        rows = frame[frame["task"] == card.task]
        if rows.empty or not card.answers:
            continue
        board = boards[card.task] if boards is not None else leaderboard(card.task, rows)
        for answer in card.answers:
            label = _answer_label(board, answer)
            if label is None:
                continue
            table, rankable = answer_group(board)
            final = board.specs[label]
            cells, per = (
                _per_k(table, label, rows) if answer.metric in PER_K else (list(table[label]), "")
            )
            names = [str(a) for a in table[ARM]]
            found = finding(
                answer.question, answer.words + per, names, cells, final.col.better, rankable,
                final.col.fmt,
            )  # fmt: skip
            if found is not None:
                out.append(found.text)
    return out
