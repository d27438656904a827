"""The token ladder: does an MoE beat the dense FFN of equal active FLOPs, and from how many
training tokens (the `+experiment=ladder_*` presets), plus the cause table (`causes`).

Per budget (training tokens = task.steps x task.batch_size x task.seq_len) and MoE arm, the
paired d = dense's final val loss - the MoE's (nats/byte, same seed; positive: the MoE is
better) with its 95% t interval, by the claims' rule (`claims.paired_verdict`: the report's one
significance rule, moe_bench/report/stats.py). The crossover (`crossover`) reads those rows
only. Reads result rows (docs/contract.md §5), never the tasks; torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .. import frames
from ..claims import (
    CONTRADICTED,
    INCONCLUSIVE,
    REPRODUCED,
    Paired,
    paired_verdict,
    trained_rows,
)
from ..claims.registry import Side, final_val_loss
from .registry import ARMS, DENSE, Arm

TOKENS = "tokens"


MOE_BETTER = {REPRODUCED: "MoE better", CONTRADICTED: "dense better", INCONCLUSIVE: "tie"}


def jobs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per finished ok job with a validation loss (index job_dir): its config columns,
    `tokens` it trained on and `final` (its last val_loss)."""
    rows = trained_rows(frame)
    if rows.empty:
        return pd.DataFrame(columns=["variant", "seed", TOKENS, "final"])
    table = frames.job_configs(rows).sort_index()
    steps, batch, length = (
        pd.to_numeric(table[c]) for c in ("task.steps", "task.batch_size", "task.seq_len")
    )
    table[TOKENS] = (steps * batch * length).astype(int)
    finals = {str(job): final_val_loss(g) for job, g in rows.groupby("job_dir")}
    table["final"] = table.index.map(finals)
    return table


def per_seed(table: pd.DataFrame, side: Side, seeds: list[Any]) -> list[float]:
    """The side's final loss per seed (NaN where the seed has no job; the mean where several)."""
    mine = table[table.apply(side.matches, axis=1)]
    out = []
    for seed in seeds:
        values = mine.loc[mine["seed"] == seed, "final"].dropna()
        out.append(float(values.mean()) if len(values) else math.nan)
    return out


def ladder_rows(table: pd.DataFrame, arms: tuple[Arm, ...] = ARMS) -> pd.DataFrame:
    """Per (arm, budget) with both the arm and dense: the mean final losses, the paired d =
    dense - MoE (positive: MoE better) with n, interval and verdict (`MOE_BETTER`)."""
    out = []
    for tokens, at in table.groupby(TOKENS, sort=True):
        seeds = sorted(at["seed"].unique(), key=str)
        dense = per_seed(at, DENSE, seeds)
        for arm in arms:
            moe = per_seed(at, arm.side, seeds)
            if all(math.isnan(v) for v in moe) or all(math.isnan(v) for v in dense):
                continue
            p = paired_verdict(moe, dense, "min")
            out.append(
                {
                    "arm": arm.label,
                    TOKENS: int(tokens),
                    "dense_loss": np.nanmean(dense),
                    "moe_loss": np.nanmean(moe),
                    "n": p.n,
                    "d": p.mean,
                    "low": p.low,
                    "high": p.high,
                    "verdict": MOE_BETTER.get(p.verdict, p.verdict),
                }
            )
    columns = ["arm", TOKENS, "dense_loss", "moe_loss", "n", "d", "low", "high", "verdict"]
    return pd.DataFrame(out, columns=columns)


def _cross(x0: float, y0: float, x1: float, y1: float) -> float:
    """log-tokens where the line through (x0, y0), (x1, y1) meets 0 (y0 <= 0 < y1)."""
    return x0 + (0.0 - y0) * (x1 - x0) / (y1 - y0)


def _first_up(tokens: list[int], values: list[float], strict: bool) -> float | None:
    """Tokens where `values` first rises to >= 0 (> 0 when strict), log-linear between budgets;
    the first budget when it starts there; None when it never does."""
    logs = [math.log(t) for t in tokens]
    for i, v in enumerate(values):
        if (v > 0) if strict else (v >= 0):
            if i == 0:
                return float(tokens[0])
            return math.exp(_cross(logs[i - 1], values[i - 1], logs[i], v))
    return None


@dataclass(frozen=True)
class Crossover:
    """Where an arm's d first reaches 0 between budgets, with the range the pointwise intervals
    allow: from where the upper bounds first reach 0 to where the lower bounds pass it."""

    arm: str
    estimate: float | None  # tokens where the mean d crosses 0 upward; None: it does not
    earliest: float | None  # upper bounds first >= 0
    latest: float | None  # lower bounds first > 0; None: not within the ladder
    largest: int  # the largest budget with a d
    smallest: int
    text: str = field(default="")


def crossover(rows: pd.DataFrame, arm: str) -> Crossover:
    """The arm's crossover from its ladder rows with 2+ seeds (log-linear interpolation of d,
    and of each interval bound, in log tokens), and its sentence."""
    mine = rows[(rows["arm"] == arm) & (rows["n"] >= 2)].sort_values(TOKENS)
    if mine.empty:
        return Crossover(arm, None, None, None, 0, 0, f"{arm}: no budget with 2+ paired seeds")
    tokens = [int(t) for t in mine[TOKENS]]
    d, low, high = (list(mine[c]) for c in ("d", "low", "high"))
    largest, smallest = tokens[-1], tokens[0]
    estimate = _first_up(tokens, d, strict=True)
    earliest, latest = _first_up(tokens, high, strict=False), _first_up(tokens, low, strict=True)
    verdicts = list(mine["verdict"])
    if estimate is None:
        there = "dense better beyond the noise there" if high[-1] < 0 else verdicts[-1]
        allow = "" if earliest is None else f"; the intervals allow one from ~{short(earliest)}"
        text = f"{arm}: no crossover up to {short(largest)} tokens ({there}{allow})"
    elif estimate == smallest and d[0] > 0:
        text = (
            f"{arm}: mean d > 0 already at the smallest budget, {short(smallest)} tokens "
            f"({verdicts[0]} there): no crossover within the ladder"
        )
    else:
        last = "beyond the ladder" if latest is None else short(latest)
        first = "before the ladder" if earliest == smallest else short(earliest)
        text = (
            f"{arm}: crossover at ~{short(estimate)} tokens (the 95% intervals allow "
            f"{first} to {last})"
        )
    return Crossover(arm, estimate, earliest, latest, largest, smallest, text)


def dense_flattening(table: pd.DataFrame) -> pd.DataFrame:
    """Dense's mean final loss per budget and its gain per doubling of tokens since the
    previous budget (nats/byte): a shrinking gain is the flattening of a parameter-limited
    model."""
    dense = table[table.apply(DENSE.matches, axis=1)]
    means = dense.groupby(TOKENS)["final"].agg(["mean", "count"]).sort_index()
    gain = -means["mean"].diff() / np.log2(means.index.to_series()).diff()
    return pd.DataFrame(
        {TOKENS: means.index, "dense_loss": means["mean"].values, "seeds": means["count"].values,
         "gain_per_doubling": gain.values}
    )  # fmt: skip


def short(tokens: float | None) -> str:
    """2048000 -> '2.0M', 512000 -> '512k'."""
    if tokens is None or math.isnan(tokens):
        return "—"
    if tokens >= 1e6:
        return f"{tokens / 1e6:.1f}M"
    return f"{tokens / 1e3:.0f}k"


def interval(row: Mapping[str, Any], digits: int = 3) -> str:
    if row["n"] < 2:
        return f"{row['d']:+.{digits}f} (n = {row['n']})"
    return f"{row['d']:+.{digits}f} [{row['low']:+.{digits}f}, {row['high']:+.{digits}f}]"


def paired_text(p: Paired, digits: int = 3) -> str:
    if p.n < 2:
        return f"{p.mean:+.{digits}f} (n = {p.n})"
    return f"{p.mean:+.{digits}f} [{p.low:+.{digits}f}, {p.high:+.{digits}f}], n = {p.n}"
