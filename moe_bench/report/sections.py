"""Report sections that read across tasks: what ran, the plain-words summary, which differences
exceed the noise, identical untrained routers, and expert specialisation by domain.

Kept apart from `build.py` (page assembly, job counting) so each section is one small function
of the tidy rows (docs/contract.md §5), read through `moe_bench.schema`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from moe_bench import schema

from .figures import column, routed

LN2 = math.log(2.0)
NOISE_SEEDS = 2.0  # seed spread: a difference counts when it exceeds 2 standard errors


# --- noise ------------------------------------------------------------------------------------


class Estimate(NamedTuple):
    """One leaderboard cell before formatting: mean over seeds, their std and count, and the
    timing spread (IQR, same units as `mean`; NaN when the rows carry none)."""

    mean: float
    std: float = math.nan
    n: int = 1
    spread: float = math.nan

    @property
    def missing(self) -> bool:
        return math.isnan(self.mean)


def distinct(a: Estimate, b: Estimate) -> bool | None:
    """Whether a and b differ by more than their noise: seed spread (difference > 2 standard
    errors of the difference) when both have several seeds, else the timing spread (difference
    > the mean of the two IQRs: their middle halves do not overlap). None: no noise measured."""
    diff = abs(a.mean - b.mean)
    if a.n > 1 and b.n > 1 and not (math.isnan(a.std) or math.isnan(b.std)):
        return diff > NOISE_SEEDS * math.sqrt(a.std**2 / a.n + b.std**2 / b.n)
    if not (math.isnan(a.spread) or math.isnan(b.spread)):
        return diff > (a.spread + b.spread) / 2
    return None


class Verdict(NamedTuple):
    """The leader of a column among rankable rows: who, by how much over the runner-up, and
    whether that exceeds the noise (None: not measured, e.g. one seed without timing spread)."""

    leader: int  # row position
    runner_up: int | None
    margin: float  # leader - runner-up, in the column's units (NaN without a runner-up)
    beyond_noise: bool | None
    tied: list[int]  # rows within noise of the leader (the leader included) when not beyond


def verdict(
    cells: list[Estimate], better: str, rankable: list[bool], same: Callable[[float, float], bool]
) -> Verdict | None:
    """The best rankable cell, and whether it beats the runner-up beyond the noise. `same`
    says when two means print alike (then they are a tie whatever the noise)."""
    sign = 1.0 if better == "max" else -1.0
    order = sorted(
        (i for i, c in enumerate(cells) if rankable[i] and not c.missing),
        key=lambda i: -sign * cells[i].mean,
    )
    if len(order) < 2:
        return None
    lead, second = order[0], order[1]
    beyond = distinct(cells[lead], cells[second])
    if same(cells[lead].mean, cells[second].mean):
        beyond = False
    tied = [lead]
    if beyond is False:
        tied += [
            i
            for i in order[1:]
            if same(cells[lead].mean, cells[i].mean) or distinct(cells[lead], cells[i]) is False
        ]
    margin = cells[lead].mean - cells[second].mean
    return Verdict(lead, second, margin, beyond, tied)


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
)
METHOD = {
    "dense": "none (one FFN)",
    "switch": "aux loss f·P (top-1)",
    "gshard": "aux loss f·P (first choice)",
    "deepseek_moe": "aux loss f·P, expert + device",
    "deepseek_v2": "aux losses: expert, device, communication",
    "deepseek_v3": "loss-free bias + sequence loss",
    "mixtral": "aux loss f·P",
    "expert_choice": "experts choose tokens (balanced by construction)",
    "noisy_topk": "noisy gating, importance + load CV²",
}
SIZE_TASKS = ("throughput", "memory", "balance", "convergence")  # whose params are the layer's


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
    """One row per variant (and size, when a variant ran at several): E, K, expert width, shared
    experts, total/active parameters and FLOPs per token of one layer, capacity factor, balance
    method and coefficient, all read from the rows' own columns."""
    if frame.empty:
        return pd.DataFrame()
    task = next((t for t in SIZE_TASKS if (frame["task"] == t).any()), None)
    rows = frame[frame["task"] == task] if task else frame
    sizes = [c for c in ("params_total", "params_active", "flops_per_token") if c in rows.columns]
    records = []
    for (variant, *_), part in rows.groupby(["variant", *sizes], dropna=False, sort=True):
        record: dict[str, str] = {"variant": variant}
        for heading, names in WHAT_RAN:
            record[heading] = _number(_first_value(part, names))
        record["params total"] = _number(_first_value(part, ("params_total",)))
        record["params active"] = _number(_first_value(part, ("params_active",)))
        record["FLOPs / token"] = _number(_first_value(part, ("flops_per_token",)))
        record["balance method"] = METHOD.get(variant, "see Notes")
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


def identical_balance(frame: pd.DataFrame) -> list[list[str]]:
    """Groups of variants whose balance-task rows are equal value for value: with the same seed
    and an untrained router of the same shape, routing is the same whatever the method (the
    methods differ only in how training moves the router)."""
    rows = frame[(frame["task"] == "balance") & frame["metric"].isin(map(str, BALANCE_METRICS))]
    rows = routed(rows)
    if rows.empty:
        return []
    keys = [k for k in ("metric", "layer", "domain", "step", "seed") if k in rows.columns]
    signature = {}
    for variant, part in rows.groupby("variant", sort=True):
        ordered = part.assign(**{k: part[k].astype(str) for k in keys}).sort_values(keys)
        signature[variant] = tuple(zip(*(ordered[k] for k in keys), ordered["value"].round(9)))
    groups: dict[tuple, list[str]] = {}
    for variant, sig in signature.items():
        groups.setdefault(sig, []).append(variant)
    return [group for group in groups.values() if len(group) > 1]


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
    distributions of two domains at the job's last recorded step (columns variant, job_dir,
    layer, js); `attrs` name the domains and tasks. Empty without per-domain expert_load rows."""
    loads = routed(frame[frame["metric"] == schema.EXPERT_LOAD.name])
    if (loads["task"] == "convergence").any():  # trained routers specialise; untrained do not
        loads = loads[loads["task"] == "convergence"]
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
    for (variant, job, layer), part in loads.groupby(["variant", "job_dir", "layer"]):
        table = part.pivot_table(index="expert", columns="domain", values="value", aggfunc="sum")
        if first not in table or second not in table:
            continue
        table = table.fillna(0.0)
        js = _js_divergence(table[first].to_numpy(float), table[second].to_numpy(float))
        records.append({"variant": variant, "job_dir": job, "layer": layer, "js": js})
    per_job = pd.DataFrame(records)
    per_job.attrs["domains"] = (first, second)
    per_job.attrs["task"] = ", ".join(sorted(loads["task"].astype(str).unique()))
    return per_job


def specialisation(frame: pd.DataFrame) -> pd.DataFrame:
    """Per variant and layer, `job_specialisation` averaged over seeds; a `mean` column
    averages the layers. Empty without per-domain expert_load rows."""
    per_job = job_specialisation(frame)
    if per_job.empty:
        return pd.DataFrame()
    table = per_job.pivot_table(index="variant", columns="layer", values="js", aggfunc="mean")
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
    v = verdict(cells, better, rankable, same)
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
