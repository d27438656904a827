"""Claims figures: a forest plot per claims section (each check's paired difference d with its
95% t interval against zero) and, per claim, the validation loss of that claim's arms only."""

from __future__ import annotations

from collections.abc import Callable

from matplotlib.ticker import MaxNLocator

from moe_bench import schema

from ..frames import ARM, summary_rows
from .draw import Drawn, Inputs, Missing, legend, lines, panels, plotted

VERDICT_COLOR = {"reproduced": "#2f855a", "contradicted": "#c53030"}


def section(claim_id: str) -> str:
    """A claim's section: its leading number ("1" for 1a, 1b, 1c)."""
    digits = "".join(ch for ch in claim_id if ch.isdigit())
    return digits or claim_id


def forest(inp: Inputs) -> Drawn:
    """One panel per claims section; one row per claim and check: mean paired d (positive: the
    paper's direction) and its 95% interval, a line at 0."""
    rows = []
    for r in inp.claims:
        for (measure, _, _), paired in zip(r.numbers, r.checks):
            if paired.n >= 2:
                label = f"{r.claim.id} · {measure.label}"
                rows.append((section(r.claim.id), label, paired))
    if not rows:
        raise Missing("no claim with 2+ paired seeds in this sweep")
    sections = list(dict.fromkeys(s for s, _, _ in rows))
    height = max(1.6, 0.45 * max(sum(s == x for s, _, _ in rows) for x in sections) + 1.2)
    fig, axes = panels(len(sections), ncols=2, height=height)
    records = []
    for ax, name in zip(axes, sections):
        mine = [(label, p) for s, label, p in rows if s == name]
        for y, (label, p) in enumerate(reversed(mine)):
            color = VERDICT_COLOR.get(p.verdict, "0.45")
            ax.errorbar(
                p.mean, y, xerr=[[p.mean - p.low], [p.high - p.mean]], fmt="o", color=color,
                capsize=3,
            )  # fmt: skip
            records.append({"panel": f"claims {name}", "series": label, "x": p.mean, "y": y})
        ax.axvline(0, color="0.2", lw=0.9)
        ax.set_yticks(range(len(mine)), [label for label, _ in reversed(mine)], fontsize=8)
        ax.set(xlabel="paired d (> 0: as the paper says), 95% CI", title=f"claims {name}")
        ax.grid(axis="y", visible=False)
    return Drawn(fig, plotted(records))


def claim_loss(result: object) -> Callable[[Inputs], Drawn]:
    """The validation loss against step of one claim's arms (its treatment and control)."""

    def draw(inp: Inputs) -> Drawn:
        treated, control = result.arms
        rows = summary_rows(inp.rows, schema.VAL_LOSS.name).dropna(subset=["step"])
        rows = rows[rows[ARM].isin([*treated, *control])]
        if rows.empty:
            raise Missing(f"no val_loss rows of claim {result.claim.id}'s arms")
        fig, axes = panels(1, height=3.2)
        title = f"claim {result.claim.id} · val_loss"
        records = lines(axes[0], rows, "step", "value", inp.colors, "step", title)
        axes[0].set(xlabel="step", ylabel="val loss (nats)", title=title)
        axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
        legend(fig, axes)
        return Drawn(fig, plotted(records))

    return draw
