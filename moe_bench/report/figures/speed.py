"""Figures of timed and measured cost, drawn from the leaderboards' own cells: tokens/s and
peak memory per arm (one panel per task and pass: no panel mixes tasks), TFLOP/s and the share
of the dense twin's rate, and tokens/s against a swept size (lines from the rows)."""

from __future__ import annotations

import math

import pandas as pd

from moe_bench import identity, schema

from .. import frames
from ..frames import ARM, column, find_column, summary_rows
from ..leaderboards import ranking_label
from ..stats import Estimate
from .draw import (
    Drawn,
    Inputs,
    Missing,
    bar_panels,
    bars,
    legend,
    lines,
    log_x_if_wide,
    panels,
    plotted,
)


def board_panels(inp: Inputs, metric: str) -> list[tuple[str, list[str], list[Estimate]]]:
    """(title, arm labels, cells) per board column of `metric`: one panel per task and pass,
    every arm row of that table (no bar averages arms)."""
    out = []
    for task, board in inp.boards.items():
        for label, final in board.specs.items():
            if final.col.metric != metric:
                continue
            cells = board.table[label]
            keep = [i for i, c in cells.items() if not c.missing]
            if keep:
                arms = [str(board.table.at[i, ARM]) for i in keep]
                out.append((f"{task} · {label}", arms, [cells[i] for i in keep]))
    return out


def _bar_figure(inp: Inputs, metric: str, ylabel: str) -> Drawn:
    found = board_panels(inp, metric)
    if not found:
        raise Missing(f"no {metric} column in any leaderboard")
    fig, axes = bar_panels(len(found), max(len(arms) for _, arms, _ in found))
    records = []
    for ax, (title, arms, cells) in zip(axes, found):
        records += bars(ax, arms, cells, inp.colors, title)
        ax.set(xlabel=ylabel, title=title)
        ax.title.set_fontsize(9)
    return Drawn(fig, plotted(records))


def speed(inp: Inputs) -> Drawn:
    return _bar_figure(inp, schema.TOKENS_PER_S.name, "tokens / s")


def memory(inp: Inputs) -> Drawn:
    return _bar_figure(inp, schema.PEAK_MEMORY_BYTES.name, "peak memory (MiB)")


def efficiency(inp: Inputs) -> Drawn:
    """TFLOP/s of each timed arm (analytic FLOPs per token over its median time) and the share
    of its dense twin's rate (1 / ratio to dense: 1 = as fast as the dense FFN of the same
    active FLOPs), for boards that time their arms (a tokens/s column beside the ratio)."""
    found = [("TFLOP/s", p) for p in board_panels(inp, schema.TFLOPS.name)]
    timed = {t for t, b in inp.boards.items() if ranking_label(b.specs) is not None}
    for title, arms, cells in board_panels(inp, schema.RATIO_TO_DENSE.name):
        if title.split(" · ")[0] in timed:  # a peak-memory ratio is no rate
            shown = title.replace("ratio to dense", "share of dense rate").replace("[×] ↓", "")
            found.append(
                ("share of dense twin's rate", (shown, arms, [_inverse(c) for c in cells]))
            )
    if not any(kind == "TFLOP/s" for kind, _ in found):
        raise Missing("no tflops rows (timed rows of a sweep that logs TFLOP/s)")
    fig, axes = bar_panels(len(found), max(len(p[1]) for _, p in found))
    records = []
    for ax, (xlabel, (title, arms, cells)) in zip(axes, found):
        records += bars(ax, arms, cells, inp.colors, title)
        ax.set(xlabel=xlabel, title=title)
        ax.title.set_fontsize(9)
    return Drawn(fig, plotted(records))


def _inverse(cell: Estimate) -> Estimate:
    """1 / a ratio, its spread carried to first order (relative widths are kept)."""
    if cell.missing or cell.mean == 0:
        return Estimate(math.nan)
    inv = 1.0 / cell.mean
    return Estimate(inv, cell.std * inv / cell.mean, cell.n, cell.spread * inv / cell.mean)


def _labels_without(rows: pd.DataFrame, x: str) -> pd.Series:
    """Per row: its arm's label with column `x` left out of the arm (the lines' series)."""
    configs = frames.job_configs(rows).drop(columns=[x], errors="ignore")
    keys = {job: identity.arm_key(r.to_dict()) for job, r in configs.iterrows()}
    ids = {job: identity.config_hash(k) for job, k in keys.items()}
    labels = identity.arm_labels({ids[j]: k for j, k in keys.items()})
    return rows["job_dir"].map({j: labels[i] for j, i in ids.items()})


def _throughput_vs(inp: Inputs, names: tuple[str, ...], label: str) -> Drawn:
    rows = summary_rows(inp.rows, schema.TOKENS_PER_S.name)
    rows = rows[column(rows, "step").isna()]  # timed layers: one rate per job, not per step
    x = find_column(rows, names)
    if rows.empty or x is None or rows.groupby("variant")[x].nunique().max() < 2:
        raise Missing(f"no variant ran at two or more values of {label}")
    rows = rows.assign(series=_labels_without(rows, x))
    found = []
    for task, part in rows.groupby("task", sort=True):
        for pass_ in sorted(column(part, "pass").dropna().unique()) or [None]:
            chosen = part if pass_ is None else part[part["pass"] == pass_]
            found.append((f"{task} · pass: {pass_ or 'all'}", chosen))
    fig, axes = panels(len(found))
    records = []
    for ax, (title, part) in zip(axes, found):
        flat = part[part[x].isna()]  # an arm without this field (dense): a reference line
        records += lines(ax, part.dropna(subset=[x]), x, "value", inp.colors, x, title, "series")
        for name, ref in flat.groupby("series"):
            value = float(pd.to_numeric(ref["value"]).mean())
            ax.axhline(value, color=inp.colors.get(ref[ARM].iloc[0], "0.3"), ls="--", label=name)
            records.append({"panel": title, "series": name, "x": math.nan, "y": value})
        log_x_if_wide(ax, part[x])
        ax.set(xlabel=label, ylabel="tokens / s", title=title)
    legend(fig, axes)
    return Drawn(fig, plotted(records))


def throughput_vs_experts(inp: Inputs) -> Drawn:
    return _throughput_vs(inp, frames.EXPERTS, "number of experts")


def throughput_vs_tokens(inp: Inputs) -> Drawn:
    return _throughput_vs(inp, frames.TOKENS, "tokens per batch")
