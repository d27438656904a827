"""Simulated expert parallelism at scale (task=ep_sim, docs/expert_parallel.md): straggler
factor, bytes per token and estimated all-to-all time against the number of ranks, and the
step time split into compute and communication; one line per routing rule and placement, one
panel per measure and arm. Each plotted value is a row's value (the mean over the replayed
steps and layers; a mean over seeds where an arm has several), so the table beside each figure
is the values it draws."""

from __future__ import annotations

import pandas as pd

from moe_bench import schema

from ..frames import ARM, column
from .draw import DASHES, MARKERS, Drawn, Inputs, Missing, legend, panels, plotted

SCALE = (
    (schema.SIM_STRAGGLER.name, "value", "straggler: max / mean rows a rank"),
    (schema.SIM_BYTES_PER_TOKEN.name, "value", "off-rank bytes per token"),
    (schema.SIM_A2A_US.name, "value", "est. dispatch + combine (us)"),
)
SPLIT = (
    (schema.SIM_STEP_US.name, "comm_us", "est. communication (us)"),
    (schema.SIM_STEP_US.name, "compute_us", "est. expert compute (us)"),
)
SERIES = "series"


def _sim_rows(inp: Inputs, metric: str, field: str) -> pd.DataFrame:
    rows = inp.rows[inp.rows["metric"] == metric]
    if rows.empty:
        raise Missing(f"no {metric} rows (task=ep_sim) in this sweep")
    rows = rows.assign(
        ranks=column(rows, "ranks").astype(float),
        y=column(rows, field).astype(float),
        **{
            SERIES: column(rows, "rule").astype(str) + " · " + column(rows, "placement").astype(str)
        },
    )
    return rows.groupby([ARM, SERIES, "ranks"], as_index=False)["y"].mean()


def _draw(inp: Inputs, measures: tuple) -> Drawn:
    frames = [(label, _sim_rows(inp, metric, field)) for metric, field, label in measures]
    arms = sorted(frames[0][1][ARM].unique())
    series = sorted({s for _, f in frames for s in f[SERIES]})
    rules = sorted({s.split(" · ")[0] for s in series})
    placements = sorted({s.split(" · ")[1] for s in series})
    fig, axes = panels(len(frames) * len(arms), ncols=len(arms), height=3.0)
    records = []
    for i, (label, frame) in enumerate(frames):
        for j, arm in enumerate(arms):
            ax, title = axes[i * len(arms) + j], f"{arm} · {label}"
            for name, line in frame[frame[ARM] == arm].groupby(SERIES, sort=True):
                rule, place = name.split(" · ")
                line = line.sort_values("ranks")
                ax.plot(
                    line["ranks"], line["y"], label=name, color=f"C{rules.index(rule) % 10}",
                    linestyle=DASHES[placements.index(place) % len(DASHES)],
                    marker=MARKERS[rules.index(rule) % len(MARKERS)], markersize=4,
                )  # fmt: skip
                records += [
                    {"panel": title, "series": name, "x": x, "y": y}
                    for x, y in zip(line["ranks"], line["y"])
                ]
            ax.set_xscale("log", base=2)
            ax.set(xlabel="ranks (8 a node)", title=title)
    legend(fig, axes)
    return Drawn(fig, plotted(records))


def ep_scale(inp: Inputs) -> Drawn:
    """Straggler factor, bytes per token and all-to-all time against ranks."""
    return _draw(inp, SCALE)


def ep_scale_split(inp: Inputs) -> Drawn:
    """Communication and compute of the step's critical path against ranks."""
    return _draw(inp, SPLIT)
