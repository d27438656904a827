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

SHIFT = {
    REPRODUCED: "moves the gap towards MoE",
    CONTRADICTED: "moves the gap towards dense",
    INCONCLUSIVE: "within the noise",
    NO_VERDICT: NO_VERDICT,
}
BASE = {  # the baseline's values of every cause's column (None: the column is absent or null)
    "task.router_init_scale": (None,),
    "task.eval_capacity": (True, None),
    "task.batch_size": 16,
}


def side(variant: str, cf: Any = "any", **where: Any) -> Side:
    """A ladder_causes side: the variant, Switch's capacity factor, the baseline's values of
    every cause column except those `where` sets (dotted names with __ for the dot)."""
    columns = {**BASE, **{k.replace("__", "."): v for k, v in where.items()}}
    if cf != "any":
        columns["variant.capacity_factor"] = cf
    return Side(variant, columns)


SWITCH = side("switch", 1.25, variant__z_loss_coef=(0.0, None))
DEEPSEEK = side("deepseek_moe", variant__z_loss_coef=(0.0, None))
DENSE = side("dense")


@dataclass(frozen=True)
class Cause:
    id: str
    title: str
    source: str
    moe: Side  # the MoE with the cause's change
    base: Side  # the same MoE without it
    dense: Side = DENSE  # dense with the change (itself where the change has no dense effect)
    dense_base: Side = DENSE


def _both(cid: str, title: str, source: str, **where: Any) -> list[Cause]:
    """The cause on switch cf 1.25 and on deepseek_moe."""
    out = []
    for name, base in (("switch cf 1.25", SWITCH), ("deepseek_moe", DEEPSEEK)):
        columns = {**base.where, **{k.replace("__", "."): v for k, v in where.items()}}
        moe = replace(base, where=columns)
        out.append(Cause(f"{cid} · {name}", title, source, moe, base))
    return out


HALF = {"task.batch_size": 8}
CAUSES = (
    *_both(
        "init",
        "router init s = 0.1 instead of nn.Linear's (s = 1/3)",
        "Fedus et al. 2021, Switch Transformer, Sec. 2.4: std sqrt(s/n), s = 0.1",
        task__router_init_scale=0.1,
    ),
    *_both(
        "z-loss",
        "router z-loss 1e-3",
        "Zoph et al. 2022, ST-MoE, Eq. 5 and Sec. 3.1: coefficient 1e-3",
        variant__z_loss_coef=0.001,
    ),
    Cause(
        "eval capacity · switch cf 1.25",
        "evaluation without capacity (drops in training only)",
        "Fedus et al. 2021, Sec. 2.2 (capacity drops); dropless inference",
        replace(SWITCH, where={**SWITCH.where, "task.eval_capacity": False}),
        SWITCH,
    ),
    *(
        Cause(
            f"tokens per step · {name}",
            "1024 tokens per step for twice the steps (the same tokens)",
            "one batch size for all: 16 x 128 tokens per step",
            replace(base, where={**base.where, **HALF}),
            base,
            replace(DENSE, where={**DENSE.where, **HALF}),
        )
        for name, base in (("switch cf 1.25", SWITCH), ("deepseek_moe", DEEPSEEK))
    ),
)


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

GRID = ("task.lr", "task.warmup_steps")
DEFAULT_CELL = (1e-3, 25)  # the shared schedule the other presets use
GRID_ARMS = (("switch cf 1.25", side("switch", 1.25)), ("deepseek_moe", side("deepseek_moe")))


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
    for name, arm in GRID_ARMS:
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
