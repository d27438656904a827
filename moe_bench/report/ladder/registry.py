"""The ladder's data: the arms it compares with dense and the causes it tests, named by their
variants and config columns (like the claims registry). Code elsewhere in the ladder report
reads these, never a name."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..claims.registry import Side


@dataclass(frozen=True)
class Arm:
    """An MoE arm of the ladder, matched on the rows' variant and config columns."""

    label: str
    side: Side


DENSE = Side("dense", {}, "dense")
ARMS = (
    Arm("switch dropless", Side("switch", {"variant.capacity_factor": (None,)})),
    Arm("switch cf 1.25", Side("switch", {"variant.capacity_factor": 1.25})),
    Arm("deepseek_moe", Side("deepseek_moe", {})),
)


# --- causes (+experiment=ladder_causes) and the grid (+experiment=ladder_grid) -----------

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
CAUSE_DENSE = side("dense")


@dataclass(frozen=True)
class Cause:
    id: str
    title: str
    source: str
    moe: Side  # the MoE with the cause's change
    base: Side  # the same MoE without it
    dense: Side = CAUSE_DENSE  # dense with the change (itself where the change has no dense effect)
    dense_base: Side = CAUSE_DENSE


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
            replace(CAUSE_DENSE, where={**CAUSE_DENSE.where, **HALF}),
        )
        for name, base in (("switch cf 1.25", SWITCH), ("deepseek_moe", DEEPSEEK))
    ),
)


GRID = ("task.lr", "task.warmup_steps")
DEFAULT_CELL = (1e-3, 25)  # the shared schedule the other presets use
GRID_ARMS = (
    ("dense", CAUSE_DENSE),
    ("switch cf 1.25", side("switch", 1.25)),
    ("deepseek_moe", side("deepseek_moe")),
)
