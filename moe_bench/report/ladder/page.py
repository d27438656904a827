"""The ladder section as markdown: the d-per-budget table with the figure drawn from it, the
crossovers, dense's flattening, the cause table with verdicts and the learning-rate grid."""

from __future__ import annotations

import math

import pandas as pd

from ..claims import RULE
from . import TOKENS, crossover, dense_flattening, interval, jobs, ladder_rows, short
from . import causes as C

FIGURE = "ladder.svg"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


def ladder_section(table: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """Markdown lines of the ladder, and the rows the figure is drawn from."""
    rows = ladder_rows(table)
    if rows.empty:
        return ["No ladder budget has both dense and an MoE arm."], rows
    lines = [
        "## MoE vs dense per token budget",
        "",
        f"![d against tokens]({FIGURE})",
        "",
        "d = dense's final val loss - the MoE's (nats/byte, paired by seed; > 0: MoE better), "
        "with its 95% t interval; the figure plots exactly these rows.",
        "",
    ]
    body = [
        [r["arm"], short(r[TOKENS]), str(r["n"]), f"{r['dense_loss']:.3f}", f"{r['moe_loss']:.3f}",
         interval(r), r["verdict"]]
        for _, r in rows.iterrows()
    ]  # fmt: skip
    header = ["arm", "tokens", "seeds", "dense loss", "MoE loss", "d [95% CI]", "verdict"]
    lines += _table(header, body)
    lines += ["", "### Crossover", ""]
    lines += [f"- {crossover(rows, arm).text}" for arm in dict.fromkeys(rows["arm"])]
    flat = dense_flattening(table)
    if len(flat) > 1:
        lines += ["", "### Dense's flattening (gain per doubling of tokens)", ""]
        body = [
            [short(r[TOKENS]), str(int(r["seeds"])), f"{r['dense_loss']:.3f}",
             "—" if math.isnan(r["gain_per_doubling"]) else f"{r['gain_per_doubling']:.3f}"]
            for _, r in flat.iterrows()
        ]  # fmt: skip
        lines += _table(["tokens", "seeds", "dense val loss", "gain per doubling"], body)
    return lines, rows


def causes_section(table: pd.DataFrame, grid: pd.DataFrame) -> list[str]:
    """The cause table (ladder_causes' jobs `table`, ladder_grid's `grid`), one budget each."""
    found = [s for _, at in table.groupby(TOKENS) for s in C.shifts(at)]
    tuned = [t for _, at in grid.groupby(TOKENS) for t in C.tuned_shifts(at)]
    if not found and not tuned:
        return []
    budgets = ", ".join(short(t) for t in sorted({*table[TOKENS], *grid[TOKENS]}))
    lines = [
        "## Causes of the gap",
        "",
        "Per seed, gap = MoE - dense final val loss; d = gap without the cause - gap with it "
        "(> 0: the cause moves the gap towards the MoE), 95% t interval over paired seeds; "
        f"each at one budget: {budgets} tokens.",
        "",
    ]
    body = []
    for s in [*found, *(t[3] for t in tuned)]:
        p = s.paired
        ci = f"[{p.low:+.3f}, {p.high:+.3f}]" if p.n >= 2 else "—"
        base = [g for g in s.gap_base if not math.isnan(g)]
        gap = [g for g in s.gap if not math.isnan(g)]
        body.append(
            [s.cause.id, s.cause.title, s.cause.source, f"{sum(base) / len(base):+.3f}",
             f"{sum(gap) / len(gap):+.3f}", f"{p.mean:+.3f} {ci}", str(p.n), s.verdict]
        )  # fmt: skip
    lines += _table(
        ["cause", "change", "source", "gap without", "gap with", "d [95% CI]", "seeds",
         "verdict"], body,
    )  # fmt: skip
    if tuned:
        lines += ["", "### Learning rate x warm-up grid (mean final val loss)", ""]
        for name, arm in C.GRID_ARMS:
            cells = C.grid(grid, arm)
            if cells.empty:
                continue
            lr, warmup = C.pick(cells)
            # a pick on the grid's edge is a bound, not an optimum: the best lies there or beyond
            on_edge = lr in (cells.index.min(), cells.index.max())
            edge = " (the grid's edge: the best lr may lie beyond it)" if on_edge else ""
            lines += [f"{name}: pick lr {lr:g}, warm-up {warmup}{edge}", ""]
            body = [[f"{lr_:g}", *(f"{v:.3f}" for v in cells.loc[lr_])] for lr_ in cells.index]
            lines += _table(["lr \\ warm-up", *(str(int(w)) for w in cells.columns)], body)
            lines.append("")
        lines.append(
            "The pick is made on the seeds it is judged on: the schedule rows lean towards a shift."
        )
    return lines


def page(
    ladder: pd.DataFrame, causes: pd.DataFrame | None = None, grid: pd.DataFrame | None = None
) -> tuple[str, pd.DataFrame]:
    """The whole section as markdown and the figure's rows, from the rows of the ladder's
    sweeps, of ladder_causes and of ladder_grid (each kept apart: their arms share configs)."""
    empty = pd.DataFrame(columns=["job_dir", "metric", "status"])
    lines, rows = ladder_section(jobs(ladder))
    cause_jobs, grid_jobs = (jobs(empty if f is None else f) for f in (causes, grid))
    lines += ["", *causes_section(cause_jobs, grid_jobs), "", f"Rule: {' '.join(RULE.split())}"]
    lines.append(
        'Here the treatment is the MoE (ladder) or the cause: "reproduced" reads "MoE better" or '
        '"moves the gap towards MoE", "contradicted" "dense better" or "towards dense", '
        '"inconclusive" "tie" or "within the noise".'
    )
    return "\n".join(["# The token ladder", "", *lines]) + "\n", rows
