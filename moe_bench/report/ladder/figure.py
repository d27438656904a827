"""The ladder figure: paired d (dense - MoE final val loss; > 0: MoE better) against training
tokens on a log axis, one series per MoE arm, each point's 95% interval as its error bar, all
read from the ladder table (`ladder_rows`) the page prints beside it."""

from __future__ import annotations

import pandas as pd

from ..figures.draw import MARKERS, Drawn, Missing, panels, plotted, render_svg
from . import TOKENS

OFFSET = 1.06  # arms side by side at one budget: x multiplied by OFFSET^i around it


def draw(rows: pd.DataFrame) -> Drawn:
    shown = rows[rows["n"] >= 2]
    if shown.empty:
        raise Missing("no ladder budget with 2+ paired seeds")
    fig, (ax,) = panels(1, height=3.4)
    records = []
    arms = list(dict.fromkeys(shown["arm"]))
    for i, arm in enumerate(arms):
        mine = shown[shown["arm"] == arm].sort_values(TOKENS)
        shift = OFFSET ** (i - (len(arms) - 1) / 2)
        x = mine[TOKENS] * shift
        ax.errorbar(
            x, mine["d"], yerr=[mine["d"] - mine["low"], mine["high"] - mine["d"]],
            marker=MARKERS[i % len(MARKERS)], capsize=3, label=arm,
        )  # fmt: skip
        for tokens, d, low, high in zip(mine[TOKENS], mine["d"], mine["low"], mine["high"]):
            for series, y in ((arm, d), (f"{arm} · 95% low", low), (f"{arm} · 95% high", high)):
                records.append({"panel": "ladder", "series": series, "x": tokens, "y": y})
    ax.axhline(0, color="0.2", lw=0.9)
    ax.set_xscale("log")
    ax.set(
        xlabel="training tokens (log scale)",
        ylabel="d = dense - MoE val loss (nats/byte)",
        title="MoE vs dense at equal active FLOPs: paired d, 95% CI (> 0: MoE better)",
    )
    ax.legend(fontsize=8)
    return Drawn(fig, plotted(records))


def svg(rows: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The figure as SVG text, and the values it plots."""
    return render_svg(lambda: draw(rows), "ladder")
