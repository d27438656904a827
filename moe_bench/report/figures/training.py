"""Figures of training and routing: losses against step and wall time, routing dynamics,
MaxVio per batch, expert load (last step per layer and by domain, and over training steps),
and quality against cost. One line, heatmap or point per arm; panels never mix tasks."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.ticker import MaxNLocator

from moe_bench import schema

from ..frames import ARM, column, plain, routed, summary_rows
from ..leaderboards import ranking_label
from ..stats import Estimate
from .draw import (
    Drawn,
    Inputs,
    Missing,
    facets,
    half_ci,
    legend,
    lines,
    panels,
    plotted,
    require,
    wrapped,
)


def wall_limit(rows: pd.DataFrame, x: str) -> float:
    """The wall-time axis ends where the shortest job ends (at least the 25th percentile of the
    jobs' ends), so one slow job does not squeeze every other line to the left."""
    ends = pd.to_numeric(rows[x], errors="coerce").groupby(rows["job_dir"]).max().dropna()
    return float(max(ends.min(), ends.quantile(0.25))) * 1.02 if len(ends) else 1.0


def _loss_panels(inp: Inputs, x: str, xlabel: str) -> Drawn:
    frame = inp.rows.assign(**{x: column(inp.rows, x)})
    found = [
        panel
        for name in (schema.TRAIN_LOSS.name, schema.VAL_LOSS.name)
        for panel in facets(summary_rows(frame, name).dropna(subset=["step", x]), name)
    ]
    if not found:
        needs = "a step" if x == "step" else f"a step and {x}"
        raise Missing(f"no train_loss or val_loss rows with {needs} in this sweep")
    fig, axes = panels(len(found))
    records = []
    for ax, (title, rows) in zip(axes, found):
        smooth = title.startswith(schema.TRAIN_LOSS.name) and rows["step"].nunique() > 20
        records += lines(ax, rows, x, "value", inp.colors, "step", title, smooth=smooth)
        ax.set(xlabel=xlabel, ylabel="loss (nats)", title=title + (" (EMA)" if smooth else ""))
        if x == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.set_xlim(0, wall_limit(rows, x))
    legend(fig, axes)
    return Drawn(fig, plotted(records))


def loss_vs_step(inp: Inputs) -> Drawn:
    return _loss_panels(inp, "step", "step")


def loss_vs_wall(inp: Inputs) -> Drawn:
    return _loss_panels(inp, "wall_s", "wall time (s)")


def trained(rows: pd.DataFrame) -> pd.Series:
    """Per row: whether its job trained (logged a train_loss)."""
    jobs = set(rows.loc[rows["metric"] == schema.TRAIN_LOSS.name, "job_dir"])
    return rows["job_dir"].isin(jobs)


def max_vio_vs_step(inp: Inputs) -> Drawn:
    rows = summary_rows(routed(inp.rows), schema.MAX_VIO_BATCH.name).dropna(subset=["step"])
    require(rows, schema.MAX_VIO_BATCH.name)
    taught = trained(inp.rows).groupby(inp.rows["task"]).any()
    untrained = set(taught[~taught].index)
    found = facets(rows, "MaxVio_batch")
    fig, axes = panels(len(found))
    records = []
    for ax, (title, part) in zip(axes, found):
        if set(part["task"]) <= untrained:  # say where routers never trained
            title += " (untrained routers)"
        records += lines(ax, part, "step", "value", inp.colors, "step", title)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set(xlabel="step (batch)", ylabel="MaxVio_batch, mean over layers", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    legend(fig, axes)
    return Drawn(fig, plotted(records))


DYNAMICS = (  # (metric, extra row filter column and value, y label)
    (schema.AUX_LOSS.name, ("loss", "total"), "aux loss (weighted total)"),
    (schema.DROP_FRACTION.name, None, "drop fraction"),
    (schema.DEAD_EXPERTS.name, None, "dead experts"),
)


def training_dynamics(inp: Inputs) -> Drawn:
    """Aux loss, drop fraction and dead experts against training step of the jobs that
    trained, one panel per metric and task, mean over layers."""
    rows = routed(inp.rows[trained(inp.rows)])
    found = []
    for name, where, label in DYNAMICS:
        part = rows[rows["metric"] == name]
        if where is not None and where[0] in part.columns and (part[where[0]] == where[1]).any():
            part = part[part[where[0]] == where[1]]
        part = summary_rows(part, name).dropna(subset=["step"])
        for task, by_task in part.groupby("task", sort=True):
            if by_task["step"].nunique() > 1:
                found.append((f"{task} task · {name}", label, by_task))
    if not found:
        raise Missing("no aux_loss, drop_fraction or dead_experts rows over training steps")
    fig, axes = panels(len(found))
    records = []
    for ax, (title, label, part) in zip(axes, found):
        smooth = part["step"].nunique() > 20
        records += lines(ax, part, "step", "value", inp.colors, "step", title, smooth=smooth)
        ax.set(xlabel="step", ylabel=label, title=title)
    legend(fig, axes)
    return Drawn(fig, plotted(records))


def _last_loads(inp: Inputs, rows_by: str) -> pd.DataFrame:
    frame = inp.rows.assign(
        expert=column(inp.rows, "expert"), **{rows_by: column(inp.rows, rows_by)}
    )
    loads = frame[frame["metric"] == schema.EXPERT_LOAD.name]
    rows = routed(loads).dropna(subset=["expert", rows_by])
    rows = rows[rows[rows_by].astype(str) != "mean"]
    if rows.empty:
        raise Missing(f"no expert_load rows with a {rows_by} and an expert in this sweep")
    step = column(rows, "step")
    last = step.groupby(rows["job_dir"]).transform("max")
    return rows[(step == last) | last.isna()]


def share_of_uniform(counts: pd.DataFrame) -> pd.DataFrame:
    """Each expert's share of a row's assignments relative to uniform (E · c_i / Σ c)."""
    return counts.div(counts.sum(axis=1), axis=0) * counts.shape[1]


def _load_maps(inp: Inputs, rows_by: str) -> Drawn:
    """Small multiples, one heatmap per arm (and task): each expert's share of a row's
    assignments relative to uniform, so 1 is perfect balance whatever E is."""
    rows = _last_loads(inp, rows_by)
    maps = {}
    for (arm, task), part in rows.groupby([ARM, "task"], sort=True):
        counts = part.pivot_table(index=rows_by, columns="expert", values="value", aggfunc="sum")
        counts.index = [plain(v) for v in counts.index]
        title = arm if rows["task"].nunique() == 1 else f"{arm} · {task}"
        maps[title] = (arm, share_of_uniform(counts.fillna(0.0)))
    if rows_by == "layer" and max(len(m) for _, m in maps.values()) < 2:
        raise Missing("expert_load rows cover a single layer (its load is shown by domain)")
    vmax = max(2.0, max(float(np.nanmax(m.to_numpy())) for _, m in maps.values()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    height = 0.35 * max(len(m) for _, m in maps.values()) + 1.5
    fig, axes = panels(len(maps), ncols=3, height=height)
    records = []
    for ax, (title, (arm, share)) in zip(axes, maps.items()):
        image = ax.imshow(
            share.to_numpy(), cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest"
        )
        ax.set_title(
            wrapped(title, 40), color=inp.colors.get(arm, "0.2"), fontweight="bold", fontsize=8
        )
        ax.set_yticks(range(len(share)), share.index)
        ax.set_xlabel("expert")
        ax.grid(False)
        records += [
            {"panel": title, "series": r, "x": float(e), "y": float(v)}
            for r, line in share.iterrows()
            for e, v in line.items()
        ]
    fig.colorbar(image, ax=axes, label="load / uniform load", shrink=0.9)
    return Drawn(fig, plotted(records))


def load_heatmaps(inp: Inputs) -> Drawn:
    return _load_maps(inp, "layer")


def domain_load(inp: Inputs) -> Drawn:
    return _load_maps(inp, "domain")


LAYERS_OVER_STEPS = 2  # the first and the last MoE layer: enough to see load drift


def load_over_steps(inp: Inputs) -> Drawn:
    """Per arm and a few layers: each expert's load relative to uniform at every recorded step
    (domains and seeds summed), one row per step, drawn without interpolation."""
    frame = inp.rows.assign(expert=column(inp.rows, "expert"), layer=column(inp.rows, "layer"))
    rows = routed(frame[frame["metric"] == schema.EXPERT_LOAD.name]).dropna(
        subset=["expert", "layer", "step"]
    )
    rows = rows[rows["layer"].astype(str) != "mean"]
    several = rows.groupby("job_dir")["step"].nunique()
    rows = rows[rows["job_dir"].isin(several[several > 1].index)]
    if rows.empty:
        raise Missing("no expert_load rows at two or more steps of one job")
    maps = {}
    for (arm, task), part in rows.groupby([ARM, "task"], sort=True):
        layers = sorted(part["layer"].unique(), key=lambda v: (str(type(v)), v))
        for layer in dict.fromkeys([layers[0], layers[-1]][:LAYERS_OVER_STEPS]):
            one = part[part["layer"] == layer]
            counts = one.pivot_table(index="step", columns="expert", values="value", aggfunc="sum")
            title = f"{arm} · layer {plain(layer)}" + (
                f" · {task}" if rows["task"].nunique() > 1 else ""
            )
            maps[title] = (arm, share_of_uniform(counts.fillna(0.0)))
    vmax = max(2.0, max(float(np.nanmax(m.to_numpy())) for _, m in maps.values()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    fig, axes = panels(len(maps), ncols=3, height=2.8)
    records = []
    for ax, (title, (arm, share)) in zip(axes, maps.items()):
        image = ax.imshow(
            share.to_numpy(), cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest"
        )
        ax.set_title(
            wrapped(title, 40), color=inp.colors.get(arm, "0.2"), fontweight="bold", fontsize=8
        )
        ticks = list(range(0, len(share), max(1, len(share) // 6)))
        ax.set_yticks(ticks, [plain(share.index[i]) for i in ticks])
        ax.set(xlabel="expert", ylabel="step")
        ax.grid(False)
        records += [
            {"panel": title, "series": plain(s), "x": float(e), "y": float(v)}
            for s, line in share.iterrows()
            for e, v in line.items()
        ]
    fig.colorbar(image, ax=axes, label="load / uniform load", shrink=0.9)
    return Drawn(fig, plotted(records))


def _ci95(cell: Estimate) -> float:
    return half_ci(cell) if cell.n > 1 else math.nan


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher x, lower y), by x."""
    keep = [
        i
        for i, (x, y) in enumerate(points)
        if not any(
            (x2 >= x and y2 <= y) and (x2 > x or y2 < y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
    ]
    return sorted(keep, key=lambda i: points[i][0])


class CostPanel(NamedTuple):
    title: str
    arms: list[str]
    loss: list[Estimate]
    cost: list[Estimate]
    better: str  # of the cost: "max" (tokens/s) or "min" (ratio to dense)
    xlabel: str
    ylabel: str


def _label_of(board, metric: str, unit: str | None = None) -> str | None:
    labels = [
        lab
        for lab, f in board.specs.items()
        if f.col.metric == metric and (unit is None or f.col.unit == unit)
    ]
    return next((lab for lab in labels if "fwd+bwd" in lab), labels[0] if labels else None)


def _single_arm_cells(board, label: str) -> dict[str, Estimate]:
    """variant -> its cell, for variants with exactly one arm (row) in the board."""
    counts = board.table["variant"].value_counts()
    return {
        str(v): board.table.at[i, label]
        for i, v in board.table["variant"].items()
        if counts[v] == 1 and not board.table.at[i, label].missing
    }


def _cost_panels(inp: Inputs) -> list[CostPanel]:
    """Loss against the same board's tokens/s and ratio to dense; where the loss board has no
    ratio, against a timed board's ratio for variants with one arm in each (matched by
    variant, said in the title)."""
    found = []
    timed = {t: b for t, b in inp.boards.items() if ranking_label(b.specs) is not None}
    for task, board in inp.boards.items():
        loss = _label_of(board, schema.VAL_LOSS.name, "nats")
        if loss is None:
            continue
        rows = [i for i in board.table.index if not board.table.at[i, loss].missing]
        own = [
            (ranking_label(board.specs), "max"),
            (_label_of(board, schema.RATIO_TO_DENSE.name), "min"),
        ]
        for cost, better in own:
            if cost is None:
                continue
            keep = [i for i in rows if not board.table.at[i, cost].missing]
            found.append(
                CostPanel(
                    f"{task} · {loss.split(' [')[0]} vs {cost.split(' [')[0]}",
                    [str(board.table.at[i, ARM]) for i in keep],
                    [board.table.at[i, loss] for i in keep],
                    [board.table.at[i, cost] for i in keep],
                    better,
                    cost,
                    loss,
                )
            )
        if own[1][0] is not None:
            continue
        losses = _single_arm_cells(board, loss)
        for other, timed_board in timed.items():
            ratio = _label_of(timed_board, schema.RATIO_TO_DENSE.name)
            if other == task or ratio is None:
                continue
            ratios = _single_arm_cells(timed_board, ratio)
            both = sorted(set(losses) & set(ratios))
            if len(both) >= 2:
                found.append(
                    CostPanel(
                        f"{task} · {loss.split(' [')[0]} vs {other} · {ratio.split(' [')[0]} "
                        "(matched by variant)",
                        both,
                        [losses[v] for v in both],
                        [ratios[v] for v in both],
                        "min",
                        f"{other} · {ratio}",
                        loss,
                    )
                )
    return found


def quality_vs_cost(inp: Inputs) -> Drawn:
    """Final validation loss (mean ± 95% CI over seeds) against training tokens/s and against
    ratio to dense: one point per arm, the Pareto frontier (faster and lower loss) drawn."""
    found = _cost_panels(inp)
    if not found:
        raise Missing("no leaderboard holds both a final val loss and tokens/s or ratio to dense")
    fig, axes = panels(len(found), height=4.0)
    records = []
    for ax, panel in zip(axes, found):
        sign = 1.0 if panel.better == "max" else -1.0
        points = [(sign * x.mean, y.mean) for x, y in zip(panel.cost, panel.loss)]
        for arm, x, y in zip(panel.arms, panel.cost, panel.loss):
            color = inp.colors.get(arm, "0.3")
            ax.errorbar(
                x.mean, y.mean, yerr=_ci95(y), xerr=_ci95(x), fmt="o", color=color, label=arm,
                capsize=3, ms=7,
            )  # fmt: skip
            records.append({"panel": panel.title, "series": arm, "x": x.mean, "y": y.mean})
        front = pareto(points)
        if len(front) > 1:
            xs = [sign * points[i][0] for i in front]
            ax.plot(
                xs,
                [points[i][1] for i in front],
                color="0.4",
                ls=":",
                lw=1.2,
                label="Pareto frontier",
            )
        ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel, title=wrapped(panel.title, 48))
        ax.title.set_fontsize(9)
    legend(fig, axes)
    return Drawn(fig, plotted(records))
