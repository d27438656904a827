"""Drawing helpers shared by the figures: panels, lines over seeds, bars from table cells,
colours per arm, the legend, and the SVG that goes inline into the page.

Every helper that draws values also returns them as rows (`panel, series, x, y`), so a test
can hold each figure against the table it illustrates.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections.abc import Callable
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # before pyplot: reports are built on headless machines

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes

from ..frames import ARM, column
from ..stats import Estimate, half_width

# Text stays text (small, crisp, selectable); fixed hash salt keeps the SVG reproducible.
STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "moe-bench",
    "font.size": 10,
    "axes.titlesize": 11,
    "figure.dpi": 100,
}
WIDTH_IN = 10.0  # one figure spans the page's text column
PANEL_HEIGHT_IN = 3.4
LEGEND_BESIDE = 8  # legend entries that fit beside the panels; more go below in two columns
BAND_NOTE = "lines are means over seeds, bands span min to max over seeds"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
DASHES = ("-", "--", "-.", ":")
EMA_POINTS = 15  # an EMA spans about 1/15 of a line's points: short runs barely lag
PLOTTED = ["panel", "series", "x", "y"]


class Missing(Exception):
    """A figure cannot be drawn from this sweep; the message says what rows it needs."""


class Drawn(NamedTuple):
    """A drawn figure and the values it plots (columns `PLOTTED`)."""

    figure: plt.Figure
    data: pd.DataFrame


def plotted(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(records, columns=PLOTTED)


def arm_colors(arm_variants: dict[str, str]) -> dict[str, str]:
    """One colour per arm: each variant a hue (variants in name order: tab10, then husl), its
    arms shades of it from dark to light, so a variant's arms read as one family."""
    variants = sorted(set(arm_variants.values()))
    palette = sns.color_palette("tab10", 10)
    palette += sns.color_palette("husl", max(0, len(variants) - len(palette)))
    hue = dict(zip(variants, palette))
    out = {}
    for variant in variants:
        arms = sorted(a for a, v in arm_variants.items() if v == variant)
        for i, arm in enumerate(arms):
            shade = 0.0 if len(arms) == 1 else -0.35 + 0.75 * i / (len(arms) - 1)
            out[arm] = matplotlib.colors.to_hex(_shade(hue[variant], shade))
    return out


def _shade(rgb: tuple, amount: float) -> tuple:
    """Towards black (amount < 0) or white (amount > 0)."""
    target = 1.0 if amount > 0 else 0.0
    return tuple(c + (target - c) * abs(amount) for c in rgb[:3])


def style_of(arm: str, colors: dict[str, str]) -> tuple[str, str]:
    """A fixed marker and line style per arm (its colour's position), so lines that lie on top
    of each other (identical untrained routers) stay distinguishable."""
    i = list(colors).index(arm) if arm in colors else 0
    return MARKERS[i % len(MARKERS)], DASHES[i % len(DASHES)]


def render_svg(draw: Callable[[], Drawn], prefix: str) -> tuple[str, pd.DataFrame]:
    """Draw one figure into an SVG element with ids unique to this figure; return it and the
    plotted values."""
    with sns.axes_style("whitegrid"), plt.rc_context(STYLE):
        drawn = draw()
        buffer = io.StringIO()
        drawn.figure.savefig(buffer, format="svg", metadata={"Date": None})
        plt.close(drawn.figure)
    return inline_svg(buffer.getvalue(), prefix), drawn.data


def inline_svg(svg: str, prefix: str) -> str:
    # An inline SVG shares the page's id space: matplotlib reuses ids such as "patch_1" in
    # every figure, so prefix them (and number repeats, which references never point to
    # since the first one wins). The XML prologue and the RDF metadata (which names URLs)
    # are dropped; nothing in the result refers outside the page.
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.S)
    seen: dict[str, int] = {}

    def unique(match: re.Match) -> str:  # identical images share an id within one SVG
        seen[match[1]] = seen.get(match[1], 0) + 1
        repeat = f"-{seen[match[1]]}" if seen[match[1]] > 1 else ""
        return f'id="{prefix}-{match[1]}{repeat}"'

    svg = re.sub(r'\bid="([^"]+)"', unique, svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", svg)
    return re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', svg)


def panels(n: int, ncols: int = 2, height: float = PANEL_HEIGHT_IN) -> tuple[plt.Figure, list]:
    ncols = max(1, min(n, ncols))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(WIDTH_IN, height * nrows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def wrapped(title: str, width: int) -> str:
    """A panel title in lines of about `width` characters, broken at its " · " separators
    (then at spaces), so that titles of narrow panels never run into their neighbours."""
    lines: list[str] = []
    for part in title.split(" · "):
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    return "\n".join(textwrap.fill(line, width, break_on_hyphens=False) for line in lines)


def smoothing_alpha(points: int) -> float:
    """EMA weight of the newest point for a line of `points` points (span = points / 15)."""
    span = max(2.0, points / EMA_POINTS)
    return 2.0 / (span + 1.0)


def ema(values: pd.Series, alpha: float) -> pd.Series:
    """Exponential moving average (no look-ahead: each point uses only earlier ones)."""
    return values.ewm(alpha=alpha, adjust=True).mean()


def numeric(rows: pd.DataFrame, *names: str) -> dict[str, pd.Series]:
    # Columns that mix numbers and missing values (dense has no num_experts) load as object.
    return {name: pd.to_numeric(rows[name], errors="coerce") for name in names}


def lines(
    ax: Axes,
    rows: pd.DataFrame,
    x: str,
    y: str,
    colors: dict[str, str],
    by: str,
    panel: str,
    series: str = ARM,
    smooth: bool = False,
) -> list[dict]:
    """One line per series (an arm by default): mean of `y` over seeds at each `by` value,
    plotted at the mean `x` (so `x` may be wall time, which differs per seed), with a min-max
    band over seeds; `smooth`: an EMA line over the raw one drawn faint. Returns the plotted
    means."""
    rows = rows.assign(**numeric(rows, x, y))
    out = []
    for order, (name, part) in enumerate(rows.groupby(series, sort=True)):
        stats = (
            part.groupby(by)
            .agg(x=(x, "mean"), mid=(y, "mean"), lo=(y, "min"), hi=(y, "max"))
            .sort_values("x")
        )
        arm = str(part[ARM].iloc[0])
        color = colors.get(arm, "0.3")
        marker, style = style_of(arm, colors)
        # later lines thinner with smaller markers: identical lines still show both
        size, width = max(2.5, 7.0 - 1.2 * order), max(1.0, 2.8 - 0.5 * order)
        if smooth:
            ax.plot(stats["x"], stats["mid"], color=color, ls="-", lw=0.6, alpha=0.25)
            stats = stats.assign(mid=ema(stats["mid"], smoothing_alpha(len(stats))))
        every = max(1, len(stats) // 10)  # a few markers per line, enough to tell lines apart
        ax.plot(
            stats["x"], stats["mid"], color=color, ls=style, lw=width, marker=marker, ms=size,
            markevery=every, label=str(name),
        )  # fmt: skip
        if part["seed"].nunique() > 1:
            ax.fill_between(stats["x"], stats["lo"], stats["hi"], color=color, alpha=0.18, lw=0)
        out += [
            {"panel": panel, "series": str(name), "x": float(a), "y": float(b)}
            for a, b in zip(stats["x"], stats["mid"])
        ]
    return out


def half_ci(cell: Estimate) -> float:
    """The 95% half-width of a table cell: t over seeds, else its timing half-width, else 0."""
    if cell.n > 1 and not math.isnan(cell.std):
        return half_width(cell.std, cell.n)
    return 0.0 if math.isnan(cell.spread) else cell.spread


def bars(
    ax: Axes, labels: list[str], cells: list[Estimate], colors: dict[str, str], panel: str
) -> list[dict]:
    """One horizontal bar per table row (an arm), in the table's order from the top: the
    cell's mean, its value written at its end, and its 95% interval as the error bar (t over
    seeds, or the timed job's half-width). Horizontal, so that long arm labels read level and
    never overlap. A log axis when the bars span more than a decade. Returns the plotted
    values."""
    means = np.array([c.mean for c in cells], float)
    half = np.array([half_ci(c) for c in cells], float)
    pos = np.arange(len(cells))
    err = np.vstack([np.minimum(half, np.abs(means) * 0.999), half])  # stays > 0 on log axes
    colored = [colors.get(a, "0.5") for a in labels]
    drawn = ax.barh(pos, means, color=colored, xerr=err, capsize=2, height=0.7)
    ax.bar_label(drawn, labels=[short(v) for v in means], padding=3, fontsize=8)
    positive = means[means > 0]
    if len(positive) and positive.max() / positive.min() >= 10:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.5 / max(1, len(cells)))
    ax.set_yticks(pos, labels, fontsize=8)
    ax.invert_yaxis()  # the table's first row on top
    ax.grid(axis="y", visible=False)
    return [
        {"panel": panel, "series": a, "x": i, "y": float(m)}
        for i, (a, m) in enumerate(zip(labels, means))
    ]


def bar_panels(
    found: list[tuple[str, tuple[str, list[str], list[Estimate]]]], colors: dict[str, str]
) -> Drawn:
    """One bar panel (`bars`) per (value label, (title, arms, cells)) of leaderboard cells: one
    panel per row, tall enough for a level label per bar."""
    most = max(len(arms) for _, (_, arms, _) in found)
    fig, axes = panels(len(found), ncols=1, height=1.1 + 0.24 * max(1, most))
    records = []
    for ax, (xlabel, (title, arms, cells)) in zip(axes, found):
        records += bars(ax, arms, cells, colors, title)
        ax.set(xlabel=xlabel, title=title)
        ax.title.set_fontsize(9)
    return Drawn(fig, plotted(records))


def short(value: float) -> str:
    """Bar labels: 3 significant digits with k/M, so a label fits its bar."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:.3g}"


def legend(fig: plt.Figure, axes: list) -> None:
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if not handles:
        return
    if len(handles) <= LEGEND_BESIDE:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", frameon=False)
    else:  # beside the panels a long legend squeezes them and runs off the figure's foot
        fig.set_figheight(fig.get_figheight() + 0.22 * math.ceil(len(handles) / 2))
        fig.legend(
            handles.values(), handles.keys(), loc="outside lower center", ncols=2, frameon=False
        )


def log_x_if_wide(ax: Axes, values: pd.Series) -> None:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if len(values) and values.min() > 0 and values.max() / values.min() >= 8:
        ax.set_xscale("log", base=2)


def facets(rows: pd.DataFrame, title: str) -> list[tuple[str, pd.DataFrame]]:
    """Panels of `rows`: one per task (no panel mixes tasks), and one per domain when rows
    carry one ("all" for rows without)."""
    labels = title + " · " + rows["task"].astype(str)
    domain = column(rows, "domain")
    if domain.notna().any():
        labels = labels + " · " + domain.fillna("all").astype(str)
    return [(label, rows[labels == label]) for label in sorted(labels.unique())]


def require(rows: pd.DataFrame, what: str) -> pd.DataFrame:
    if rows.empty:
        raise Missing(f"no {what} rows in this sweep")
    return rows


class Inputs(NamedTuple):
    """What every figure draws from: the rows behind the tables, the tables themselves."""

    rows: pd.DataFrame  # ok rows of finished jobs, each with its arm (frames.with_arms)
    boards: dict  # task -> its leaderboards.Board: bars draw their table's cells
    colors: dict[str, str]  # arm -> colour
    claims: list  # claims.Result of each covered claim
