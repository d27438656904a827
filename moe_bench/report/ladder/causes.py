"""Candidate causes of the MoE-vs-dense gap, each one change against the baseline
(`+experiment=ladder_causes`), and the learning-rate x warm-up grid (`+experiment=ladder_grid`).

A cause names four sides: the MoE and dense with the change, and without it (dense is its own
baseline where the change touches no dense weight: router init, z-loss, evaluation capacity).
Per seed, gap = MoE final val loss - dense's; d = gap without - gap with the cause (positive:
the cause moves the gap towards the MoE). Over the paired seeds, d's 95% t interval by the
claims' rule (`claims.paired_verdict`): "moves the gap towards MoE" when it lies above 0,
"towards dense" below, "within the noise" when it holds 0. This file is data plus that rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from ..claims import CONTRADICTED, INCONCLUSIVE, NO_VERDICT, REPRODUCED, Paired, paired_verdict
from ..claims.registry import Side
from . import per_seed
from .registry import CAUSE_DENSE as DENSE
from .registry import CAUSES, DEFAULT_CELL, GRID, GRID_ARMS, Cause

SHIFT = {
    REPRODUCED: "moves the gap towards MoE",
    CONTRADICTED: "moves the gap towards dense",
    INCONCLUSIVE: "within the noise",
    NO_VERDICT: NO_VERDICT,
}


@dataclass(frozen=True)
class Shift:
    cause: Cause
    seeds: list[Any]
    gap_base: list[float]  # MoE - dense per seed, without the cause
    gap: list[float]  # with it
    paired: Paired  # d = gap_base - gap (positive: towards MoE)

    @property
    def verdict(self) -> str:
        return SHIFT[self.paired.verdict]


def _gaps(table: pd.DataFrame, moe: Side, dense: Side, seeds: list[Any]) -> list[float]:
    return [m - d for m, d in zip(per_seed(table, moe, seeds), per_seed(table, dense, seeds))]


def shifts(table: pd.DataFrame, causes: tuple[Cause, ...] = CAUSES) -> list[Shift]:
    """Every cause the jobs cover on all four sides (for at least one seed)."""
    seeds = sorted(table["seed"].unique(), key=str)
    out = []
    for cause in causes:
        gap = _gaps(table, cause.moe, cause.dense, seeds)
        gap_base = _gaps(table, cause.base, cause.dense_base, seeds)
        if all(math.isnan(a) or math.isnan(b) for a, b in zip(gap, gap_base)):
            continue
        # paired_verdict(treatment, control, "min"): d = control - treatment = gap_base - gap
        out.append(Shift(cause, seeds, gap_base, gap, paired_verdict(gap, gap_base, "min")))
    return out


# --- the learning rate x warm-up grid ---------------------------------------------------------


def grid(table: pd.DataFrame, arm: Side) -> pd.DataFrame:
    """Mean final loss per (lr, warm-up) cell of one arm (rows: lr, columns: warm-up)."""
    mine = table[table.apply(arm.matches, axis=1)]
    return mine.pivot_table(index=GRID[0], columns=GRID[1], values="final", aggfunc="mean")


def pick(cells: pd.DataFrame) -> tuple[float, int]:
    """The (lr, warm-up) of the lowest mean final loss."""
    lr, warmup = cells.stack().idxmin()
    return float(lr), int(warmup)


def at_cell(arm: Side, cell: tuple[float, int]) -> Side:
    return replace(arm, where={**arm.where, GRID[0]: cell[0], GRID[1]: cell[1]})


def tuned_shifts(table: pd.DataFrame) -> list[tuple[str, tuple, tuple, Shift]]:
    """Per MoE arm, the cause "one schedule for all": the gap with each arm at its own pick
    against the gap with both at DEFAULT_CELL; (arm, its pick, dense's pick, shift)."""
    if table.empty or not set(GRID) <= set(table.columns):
        return []
    dense_pick = pick(grid(table, DENSE))
    out = []
    for name, arm in GRID_ARMS[1:]:  # the MoEs
        cells = grid(table, arm)
        if cells.empty:
            continue
        mine = pick(cells)
        cause = Cause(
            f"schedule · {name}",
            "learning rate and warm-up tuned per arm (ladder_grid's pick)",
            "one schedule for all: lr 1e-3, warm-up 25 steps",
            at_cell(arm, mine),
            at_cell(arm, DEFAULT_CELL),
            at_cell(DENSE, dense_pick),
            at_cell(DENSE, DEFAULT_CELL),
        )
        found = shifts(table, (cause,))
        if found:
            out.append((name, mine, dense_pick, found[0]))
    return out
