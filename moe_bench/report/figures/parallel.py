"""Expert-parallel figures (docs/expert_parallel.md): traffic per token from the leaderboard's
cells, the rank-to-rank token matrix and the received-token imbalance during training, one bar,
matrix or line per arm."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from moe_bench import schema

from ..frames import ARM, column, plain
from .draw import Drawn, Inputs, Missing, bar_panels, legend, lines, panels, plotted
from .speed import board_panels

TRAFFIC = (
    (schema.DEVICES_PER_TOKEN, "ranks per token"),
    (schema.BYTES_PER_TOKEN, "off-rank bytes per token"),
    (schema.REMOTE_FRACTION, "remote assignments / kept"),
    (schema.RANK_IMBALANCE, "max / mean rows received"),
)


def ep_traffic(inp: Inputs) -> Drawn:
    """One bar per arm (mean over seeds, as the leaderboard's cell) for each traffic metric."""
    found = [
        (label, panel) for metric, label in TRAFFIC for panel in board_panels(inp, metric.name)
    ]
    if not found:
        raise Missing("no expert-parallel traffic columns (devices_per_token, ...) in any table")
    return bar_panels(found, inp.colors)


def _rows(inp: Inputs, metric: str, **where: str) -> pd.DataFrame:
    rows = inp.rows[inp.rows["metric"] == metric]
    for key, value in where.items():
        rows = rows[column(rows, key).astype(str) == value]
    if rows.empty:
        raise Missing(f"no {metric} rows in this sweep")
    return rows


def ep_rank_tokens(inp: Inputs) -> Drawn:
    """Small multiples, one [src, dst] matrix of token rows per arm (seeds summed)."""
    rows = _rows(inp, schema.RANK_TOKENS.name).dropna(subset=["src", "dst"])
    maps = {
        arm: part.pivot_table(index="src", columns="dst", values="value", aggfunc="sum")
        for arm, part in rows.groupby(ARM, sort=True)
    }
    vmax = max(float(np.nanmax(m.to_numpy())) for m in maps.values())
    fig, axes = panels(len(maps), ncols=4, height=2.6)
    records = []
    for ax, (arm, matrix) in zip(axes, maps.items()):
        image = ax.imshow(
            matrix.to_numpy(), cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest"
        )
        ax.set_title(arm, color=inp.colors.get(arm, "0.2"), fontsize=8, fontweight="bold")
        ax.set_xticks(range(matrix.shape[1]), [plain(v) for v in matrix.columns])
        ax.set_yticks(range(matrix.shape[0]), [plain(v) for v in matrix.index])
        ax.set(xlabel="dst rank", ylabel="src rank")
        ax.grid(False)
        records += [
            {"panel": arm, "series": plain(src), "x": float(dst), "y": float(v)}
            for src, line in matrix.iterrows()
            for dst, v in line.items()
        ]
    fig.colorbar(image, ax=axes, label="token rows sent", shrink=0.9)
    return Drawn(fig, plotted(records))


def ep_imbalance_vs_step(inp: Inputs) -> Drawn:
    """rank_imbalance per training step, one line per arm (mean over seeds)."""
    rows = _rows(inp, schema.RANK_IMBALANCE.name, phase="train").dropna(subset=["step"])
    fig, axes = panels(1, height=3.8)
    ax = axes[0]
    title = "rank_imbalance · training"
    records = lines(ax, rows, "step", "value", inp.colors, "step", title)
    ax.axhline(1, color="0.3", lw=0.8)
    ax.set(xlabel="training step", ylabel="max / mean token rows received per rank", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    legend(fig, axes)
    return Drawn(fig, plotted(records))
