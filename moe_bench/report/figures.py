"""The report's figures: tidy results rows in, inline SVG out.

Every figure function takes the results frame (docs/contract.md §5 rows, `ok` rows only) and the
colour of each variant, and returns a matplotlib Figure, or raises `Missing` saying which rows
it lacked, so the report can state what it does not show instead of drawing empty axes.
`FIGURES` lists them in report order; `render` draws one into a self-contained SVG string.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # before pyplot: reports are built on headless machines

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import TwoSlopeNorm
from matplotlib.ticker import MaxNLocator

from moe_bench import schema

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
BAND_NOTE = "lines are means over seeds, bands span min to max over seeds"


class Missing(Exception):
    """A figure cannot be drawn from this sweep; the message says what rows it needs."""


class FigureSpec(NamedTuple):
    key: str
    title: str
    caption: str
    draw: Callable[[pd.DataFrame, dict[str, str]], plt.Figure]


def variant_colors(in_data: Iterable[str]) -> dict[str, str]:
    """One fixed colour per variant: registered names (sorted) first, then names seen only in
    the data (e.g. megablocks_dmoe), so a variant keeps its colour across figures and reports."""
    import variants  # lazily: the registry pulls in torch, which only this lookup needs

    known = variants.names()
    others = sorted(set(in_data) - set(known))
    # registered names: tab10, then husl for the rest (sized by the registry alone, so their
    # colours never depend on the data); names only in the data get a palette of their own
    palette = sns.color_palette("tab10", 10)
    palette += sns.color_palette("husl", max(0, len(known) - len(palette)))
    palette += sns.color_palette("dark", len(others))
    return {name: matplotlib.colors.to_hex(c) for name, c in zip(known + others, palette)}


def render(spec: FigureSpec, frame: pd.DataFrame, colors: dict[str, str]) -> str:
    """Draw one figure and return it as an SVG element with ids unique to this figure."""
    with sns.axes_style("whitegrid"), plt.rc_context(STYLE):
        fig = spec.draw(frame, colors)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
        plt.close(fig)
    return _inline_svg(buffer.getvalue(), prefix=f"fig-{spec.key}")


def _inline_svg(svg: str, prefix: str) -> str:
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


# --- selecting rows -------------------------------------------------------------------------


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column, or all-missing when no row has it (optional columns: layer, pass, ...)."""
    if name in frame.columns:
        return frame[name]
    return pd.Series(np.nan, index=frame.index, dtype=object)


POOL_KEYS = ("job_dir", "step", "domain", "pass")  # what a layer mean keeps apart


def summary_rows(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows of `metric` for the whole layer stack, not per expert: the `layer="mean"` rows (or
    rows without a layer); for a job that logged only per-layer rows, their mean."""
    rows = frame[(frame["metric"] == metric) & column(frame, "expert").isna()]
    layer = column(rows, "layer")
    pooled = layer.isna() | (layer.astype(str) == "mean")
    per_layer = rows[~pooled & ~rows["job_dir"].isin(rows.loc[pooled, "job_dir"])]
    if per_layer.empty:
        return rows[pooled]
    keys = [k for k in POOL_KEYS if k in rows.columns]
    first = {c: "first" for c in rows.columns if c not in keys}
    means = per_layer.groupby(keys, dropna=False, sort=False).agg({**first, "value": "mean"})
    return pd.concat([rows[pooled], means.reset_index().assign(layer="mean")], ignore_index=True)


def facets(rows: pd.DataFrame, title: str) -> list[tuple[str, pd.DataFrame]]:
    """Panels of `rows`: one per task when several tasks logged the metric, and one per
    domain when rows carry one ("all" for rows without)."""
    labels = pd.Series(title, index=rows.index)
    if rows["task"].nunique() > 1:
        labels = labels + " · " + rows["task"].astype(str)
    domain = column(rows, "domain")
    if domain.notna().any():
        labels = labels + " · " + domain.fillna("all").astype(str)
    return [(label, rows[labels == label]) for label in sorted(labels.unique())]


def find_column(frame: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    """The first config column whose last dotted part is one of `names` and has values, e.g.
    `variant.num_experts` for ("num_experts",)."""
    for name in names:
        for col in frame.columns:
            if col.split(".")[-1] == name and frame[col].notna().any():
                return col
    return None


EXPERTS = ("num_experts",)
TOKENS = ("tokens", "num_tokens")


def _require(rows: pd.DataFrame, what: str) -> pd.DataFrame:
    if rows.empty:
        raise Missing(f"no {what} rows in this sweep")
    return rows


def _modal(rows: pd.DataFrame, col: str) -> pd.DataFrame:
    """Each variant's rows at its most common value of `col` (iso-compute gives variants
    different expert counts), plus rows without the column (dense has no experts)."""
    values = pd.to_numeric(rows[col], errors="coerce")
    mode = values.groupby(rows["variant"]).transform(lambda v: v.mode().max())
    return rows[values.isna() | (values == mode)]


def routed(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of layers that route: with one expert (dense), balance is trivially perfect."""
    experts = find_column(rows, EXPERTS)
    if experts is None:
        return rows
    return rows[~(pd.to_numeric(rows[experts], errors="coerce") <= 1)]


def _numeric(rows: pd.DataFrame, *names: str) -> dict[str, pd.Series]:
    # Columns that mix numbers and missing values (dense has no num_experts) load as object.
    return {name: pd.to_numeric(rows[name], errors="coerce") for name in names}


def _series_label(frame: pd.DataFrame) -> pd.Series:
    """Legend label of each row: the variant, plus the backend when the sweep has several."""
    if column(frame, "backend").nunique() > 1:
        return frame["variant"] + " / " + frame["backend"].astype(str)
    return frame["variant"]


# --- drawing helpers ------------------------------------------------------------------------


def _panels(n: int, ncols: int = 2, height: float = PANEL_HEIGHT_IN) -> tuple[plt.Figure, list]:
    ncols = min(n, ncols)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(WIDTH_IN, height * nrows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _lines(
    ax, rows: pd.DataFrame, x: str, y: str, colors: dict[str, str], by: str, smooth: bool = False
) -> None:
    """One line per series: mean of `y` over seeds at each `by` value, plotted at the mean `x`
    (so `x` may be wall time, which differs per seed), with a min-max band over seeds;
    `smooth`: an EMA line over the raw one drawn faint."""
    rows = rows.assign(series=_series_label(rows), **_numeric(rows, x, y))
    backends = sorted(column(rows, "backend").dropna().astype(str).unique())
    dashes = dict(zip(backends, ["-", "--", ":", "-."] * 4))
    for order, (series, part) in enumerate(rows.groupby("series", sort=True)):
        stats = (
            part.groupby(by)
            .agg(x=(x, "mean"), mid=(y, "mean"), lo=(y, "min"), hi=(y, "max"))
            .sort_values("x")
        )
        variant = part["variant"].iloc[0]
        # later lines thinner with smaller markers: identical lines still show both
        size = max(2.5, 7.0 - 1.2 * order)
        width = max(1.0, 2.8 - 0.5 * order)
        color = colors[variant]
        style = dashes.get(str(column(part, "backend").iloc[0]), "-")
        if len(backends) <= 1:  # one backend: the line style tells variants apart instead
            style = variant_style(variant, colors)[1]
        if smooth:
            ax.plot(stats["x"], stats["mid"], color=color, ls="-", lw=0.6, alpha=0.25)
            stats = stats.assign(mid=ema(stats["mid"], smoothing_alpha(len(stats))))
        marker = variant_style(variant, colors)[0]
        every = max(1, len(stats) // 10)  # a few markers per line, enough to tell lines apart
        ax.plot(
            stats["x"], stats["mid"], color=color, ls=style, lw=width, marker=marker, ms=size,
            markevery=every, label=series,
        )  # fmt: skip
        if part["seed"].nunique() > 1:
            ax.fill_between(stats["x"], stats["lo"], stats["hi"], color=color, alpha=0.18, lw=0)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
DASHES = ("-", "--", "-.", ":")
EMA_POINTS = 15  # an EMA spans about 1/15 of a line's points: short runs barely lag


def smoothing_alpha(points: int) -> float:
    """EMA weight of the newest point for a line of `points` points (span = points / 15)."""
    span = max(2.0, points / EMA_POINTS)
    return 2.0 / (span + 1.0)


def variant_style(variant: str, colors: dict[str, str]) -> tuple[str, str]:
    """A fixed marker and line style per variant (its colour's position), so lines that lie on
    top of each other (identical untrained routers) stay distinguishable."""
    i = list(colors).index(variant) if variant in colors else 0
    return MARKERS[i % len(MARKERS)], DASHES[i % len(DASHES)]


def ema(values: pd.Series, alpha: float) -> pd.Series:
    """Exponential moving average (no look-ahead: each point uses only earlier ones)."""
    return values.ewm(alpha=alpha, adjust=True).mean()


def _bars(
    ax, rows: pd.DataFrame, y: str, colors: dict[str, str], spread: pd.Series | None = None
) -> None:
    """One bar per series (mean over seeds), its value written on it, and an error bar: min to
    max over seeds when there are several, else the per-job `spread` (an IQR width, same units
    as y) when given. A log axis when the bars span more than a decade."""
    rows = rows.assign(series=_series_label(rows), **_numeric(rows, y))
    if spread is not None:
        rows = rows.assign(_spread=rows["job_dir"].map(spread).astype(float))
    else:
        rows = rows.assign(_spread=np.nan)
    stats = rows.groupby("series", sort=True).agg(
        variant=("variant", "first"),
        mid=(y, "mean"),
        lo=(y, "min"),
        hi=(y, "max"),
        spread=("_spread", "mean"),
    )
    pos = np.arange(len(stats))
    if rows["seed"].nunique() > 1:
        err = np.vstack([stats["mid"] - stats["lo"], stats["hi"] - stats["mid"]])
    elif stats["spread"].notna().any():
        half = stats["spread"].fillna(0.0).to_numpy() / 2
        err = np.vstack([np.minimum(half, stats["mid"] * 0.999), half])  # stays > 0 on log axes
    else:
        err = None
    color = [colors[v] for v in stats["variant"]]
    bars = ax.bar(pos, stats["mid"], color=color, yerr=err, capsize=3)
    ax.bar_label(bars, labels=[_short(v) for v in stats["mid"]], padding=2, fontsize=8)
    positive = stats["mid"][stats["mid"] > 0]
    if len(positive) and positive.max() / positive.min() >= 10:
        ax.set_yscale("log")
    ax.margins(y=0.15)
    ax.set_xticks(pos, stats.index, rotation=30, ha="right")
    ax.grid(axis="x", visible=False)


def _short(value: float) -> str:
    """Bar labels: 3 significant digits with k/M, so a label fits its bar."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:.3g}"


def timing_spread(frame: pd.DataFrame, pass_: str | None) -> pd.Series:
    """Per job: IQR / median of the pass's timed repeats (`iqr_ms` on its fwd_ms / fwd_bwd_ms
    rows); min/max (`min_ms`, `max_ms`) when there is no IQR. Relative: multiply by a rate."""
    name = {"fwd": schema.FWD_MS.name, "fwd_bwd": schema.FWD_BWD_MS.name}.get(str(pass_))
    timed = frame[(frame["metric"] == name) & (column(frame, "pass") == pass_)]
    if timed.empty:
        return pd.Series(dtype=float)
    median = pd.to_numeric(timed["value"], errors="coerce")
    width = pd.to_numeric(column(timed, "iqr_ms"), errors="coerce")
    full = pd.to_numeric(column(timed, "max_ms"), errors="coerce") - pd.to_numeric(
        column(timed, "min_ms"), errors="coerce"
    )
    return (width.fillna(full) / median).groupby(timed["job_dir"]).mean()


def _legend(fig: plt.Figure, axes: list) -> None:
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", frameon=False)


def _log_x_if_wide(ax, values: pd.Series) -> None:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if len(values) and values.min() > 0 and values.max() / values.min() >= 8:
        ax.set_xscale("log", base=2)


# --- figures --------------------------------------------------------------------------------


def _throughput_vs(
    frame: pd.DataFrame,
    colors: dict[str, str],
    names: tuple[str, ...],
    other: tuple[str, ...],
    label: str,
) -> plt.Figure:
    rows = _require(summary_rows(frame, schema.TOKENS_PER_S.name), schema.TOKENS_PER_S.name)
    x = find_column(rows, names)
    if x is None or rows.groupby("variant")[x].nunique().max() < 2:
        raise Missing(f"no variant ran at two or more values of {label}")
    held = find_column(rows, other)
    if held is not None:
        rows = _modal(rows, held)
    passes = sorted(column(rows, "pass").dropna().unique()) or [None]
    fig, axes = _panels(len(passes))
    for ax, pass_ in zip(axes, passes):
        part = rows if pass_ is None else rows[rows["pass"] == pass_]
        flat = part[part[x].isna()]  # a variant without this field (dense): a reference line
        _lines(ax, part.dropna(subset=[x]), x, "value", colors, by=x)
        for variant, ref in flat.groupby("variant"):
            ax.axhline(ref["value"].mean(), color=colors[variant], ls="--", label=variant)
        _log_x_if_wide(ax, part[x])
        ax.set(xlabel=label, ylabel="tokens / s", title=f"pass: {pass_ or 'all'}")
    _legend(fig, axes)
    return fig


def throughput_vs_experts(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    return _throughput_vs(frame, colors, EXPERTS, TOKENS, "number of experts")


def throughput_vs_tokens(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    return _throughput_vs(frame, colors, TOKENS, EXPERTS, "tokens per batch")


def throughput_bars(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    """The throughput task's layer tokens/s (never the convergence task's training rate)."""
    tasks = frame[frame["task"] == "throughput"]
    rows = _require(summary_rows(tasks, schema.TOKENS_PER_S.name), "throughput-task tokens_per_s")
    for names in (EXPERTS, TOKENS):
        col = find_column(rows, names)
        if col is not None:
            rows = _modal(rows, col)
    passes = sorted(column(rows, "pass").dropna().unique()) or [None]
    fig, axes = _panels(len(passes))
    for ax, pass_ in zip(axes, passes):
        part = rows if pass_ is None else rows[rows["pass"] == pass_]
        values = pd.to_numeric(part["value"], errors="coerce").groupby(part["job_dir"]).mean()
        _bars(ax, part, "value", colors, spread=values * timing_spread(tasks, pass_))
        ax.set(ylabel="layer tokens / s", title=f"throughput task · pass: {pass_ or 'all'}")
    return fig


def training_throughput(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    """The convergence task's training tokens/s: mean over the logged steps per job, with the
    IQR over steps as the error bar."""
    tasks = frame[frame["task"] == "convergence"]
    rows = summary_rows(tasks, schema.TOKENS_PER_S.name).dropna(subset=["value"])
    _require(rows, "convergence-task tokens_per_s")
    per_step = pd.to_numeric(rows["value"], errors="coerce").groupby(rows["job_dir"])
    spread = per_step.quantile(0.75) - per_step.quantile(0.25)
    means = rows.groupby("job_dir", as_index=False).first()
    means["value"] = means["job_dir"].map(per_step.mean())
    fig, axes = _panels(1)
    _bars(axes[0], means, "value", colors, spread=spread)
    axes[0].set(ylabel="training tokens / s", title="convergence task · mean over the run")
    return fig


def memory(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    name = schema.PEAK_MEMORY_BYTES.name
    rows = _require(summary_rows(frame, name), name)
    rows = rows.assign(mib=rows["value"] / 2**20)
    tokens = find_column(rows, TOKENS)
    passes = sorted(column(rows, "pass").dropna().unique()) or [None]
    fig, axes = _panels(len(passes))
    for ax, pass_ in zip(axes, passes):
        part = rows if pass_ is None else rows[rows["pass"] == pass_]
        if tokens is not None and part[tokens].nunique() > 1:
            _lines(ax, part, tokens, "mib", colors, by=tokens)
            _log_x_if_wide(ax, part[tokens])
            ax.set_xlabel("tokens per batch")
        else:
            _bars(ax, part, "mib", colors)
        ax.set(ylabel="peak memory (MiB)", title=f"pass: {pass_ or 'all'}")
    _legend(fig, axes)
    return fig


def _loss_panels(frame: pd.DataFrame, colors: dict[str, str], x: str, xlabel: str) -> plt.Figure:
    frame = frame.assign(**{x: column(frame, x)})
    panels = [
        panel
        for name in (schema.TRAIN_LOSS.name, schema.VAL_LOSS.name)
        for panel in facets(summary_rows(frame, name).dropna(subset=["step", x]), name)
    ]
    if not panels:
        needs = "a step" if x == "step" else f"a step and {x}"
        raise Missing(f"no train_loss or val_loss rows with {needs} in this sweep")
    fig, axes = _panels(len(panels))
    for ax, (title, rows) in zip(axes, panels):
        smooth = title.startswith(schema.TRAIN_LOSS.name) and rows["step"].nunique() > 20
        _lines(ax, rows, x, "value", colors, by="step", smooth=smooth)
        ax.set(xlabel=xlabel, ylabel="loss (nats)", title=title + (" (EMA)" if smooth else ""))
        if x == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.set_xlim(0, wall_limit(rows, x))
    _legend(fig, axes)
    return fig


def wall_limit(rows: pd.DataFrame, x: str) -> float:
    """The wall-time axis ends where the shortest job ends (at least the 25th percentile of the
    jobs' ends), so one slow job does not squeeze every other line to the left."""
    ends = pd.to_numeric(rows[x], errors="coerce").groupby(rows["job_dir"]).max().dropna()
    return float(max(ends.min(), ends.quantile(0.25))) * 1.02 if len(ends) else 1.0


def loss_vs_step(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    return _loss_panels(frame, colors, "step", "step")


def loss_vs_wall(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    return _loss_panels(frame, colors, "wall_s", "wall time (s)")


def max_vio_vs_step(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    rows = summary_rows(routed(frame), schema.MAX_VIO_BATCH.name).dropna(subset=["step"])
    _require(rows, schema.MAX_VIO_BATCH.name)
    panels = facets(rows, "MaxVio_batch")
    fig, axes = _panels(len(panels))
    for ax, (title, part) in zip(axes, panels):
        # the balance task never trains: say so where its panels are read
        title = title.replace("· balance", "· balance task, untrained routers")
        _lines(ax, part, "step", "value", colors, by="step")
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set(xlabel="step (batch)", ylabel="MaxVio_batch, mean over layers", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(fig, axes)
    return fig


DYNAMICS = (  # (metric, extra row filter column and value, y label)
    (schema.AUX_LOSS.name, ("loss", "total"), "aux loss (weighted total)"),
    (schema.DROP_FRACTION.name, None, "drop fraction"),
    (schema.DEAD_EXPERTS.name, None, "dead experts"),
)


def training_dynamics(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    """Aux loss, drop fraction and dead experts against training step (convergence task), one
    panel per metric present, mean over layers."""
    rows = routed(frame[frame["task"] == "convergence"])
    panels = []
    for name, where, label in DYNAMICS:
        part = rows[rows["metric"] == name]
        if where is not None and where[0] in part.columns and (part[where[0]] == where[1]).any():
            part = part[part[where[0]] == where[1]]
        part = summary_rows(part, name).dropna(subset=["step"])
        if part["step"].nunique() > 1:
            panels.append((name, label, part))
    if not panels:
        raise Missing("no aux_loss, drop_fraction or dead_experts rows over training steps")
    fig, axes = _panels(len(panels))
    for ax, (name, label, part) in zip(axes, panels):
        _lines(ax, part, "step", "value", colors, by="step", smooth=part["step"].nunique() > 20)
        ax.set(xlabel="step", ylabel=label, title=f"convergence task · {name}")
    _legend(fig, axes)
    return fig


def _load_maps(frame: pd.DataFrame, colors: dict[str, str], rows_by: str) -> plt.Figure:
    """Small multiples, one heatmap per variant: each expert's share of a row's assignments
    relative to uniform (E * c_i / sum c), so 1 is perfect balance whatever E is."""
    frame = frame.assign(expert=column(frame, "expert"), **{rows_by: column(frame, rows_by)})
    loads = frame[frame["metric"] == schema.EXPERT_LOAD.name]
    rows = routed(loads).dropna(subset=["expert", rows_by])
    rows = rows[rows[rows_by].astype(str) != "mean"]
    if rows.empty:
        raise Missing(f"no expert_load rows with a {rows_by} and an expert in this sweep")
    step = column(rows, "step")
    last = step.groupby(rows["job_dir"]).transform("max")
    rows = rows[(step == last) | last.isna()]
    several_tasks = rows["task"].nunique() > 1
    maps = {}
    for variant, part in rows.groupby("variant", sort=True):
        counts = part.pivot_table(
            index=["task", rows_by], columns="expert", values="value", aggfunc="sum"
        ).fillna(0.0)
        counts.index = [
            f"{task} · {plain(value)}" if several_tasks else plain(value)
            for task, value in counts.index
        ]
        maps[variant] = counts.div(counts.sum(axis=1), axis=0) * counts.shape[1]
    if rows_by == "layer" and max(len(m) for m in maps.values()) < 2:
        raise Missing("expert_load rows cover a single layer (its load is shown by domain)")
    vmax = max(2.0, max(float(np.nanmax(m.to_numpy())) for m in maps.values()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    height = 0.35 * max(len(m) for m in maps.values()) + 1.5
    fig, axes = _panels(len(maps), ncols=3, height=height)
    for ax, (variant, share) in zip(axes, maps.items()):
        image = ax.imshow(share.to_numpy(), cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_title(variant, color=colors[variant], fontweight="bold")
        ax.set_yticks(range(len(share)), share.index)
        ax.set_xlabel("expert")
        ax.grid(False)
    fig.colorbar(image, ax=axes, label="load / uniform load", shrink=0.9)
    return fig


def plain(value: object) -> str:
    """0.0 -> "0": integer-valued floats (JSON numbers through pandas) print as integers."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def load_heatmaps(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    return _load_maps(frame, colors, "layer")


def domain_load(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    return _load_maps(frame, colors, "domain")


FIGURES = (
    FigureSpec(
        "throughput-experts",
        "Throughput vs number of experts",
        "Tokens per second at the most common batch size of the sweep; a variant without "
        "experts (dense) is a dashed reference line. " + BAND_NOTE + ".",
        throughput_vs_experts,
    ),
    FigureSpec(
        "throughput-tokens",
        "Throughput vs tokens per batch",
        "Tokens per second at the most common number of experts of the sweep; " + BAND_NOTE + ".",
        throughput_vs_tokens,
    ),
    FigureSpec(
        "throughput",
        "Throughput task: layer tokens/s by variant",
        "One layer's tokens per second at each variant's most common size (tokens / median of "
        "the timed repeats); error bars: min to max over seeds when there are several, else "
        "the IQR of the timed repeats; a log axis when bars span a decade or more.",
        throughput_bars,
    ),
    FigureSpec(
        "training-throughput",
        "Convergence task: training tokens/s by variant",
        "Tokens per second of whole training steps of the small LM (forward, backward, "
        "optimizer), mean over the run's logged steps; error bars: IQR over those steps.",
        training_throughput,
    ),
    FigureSpec(
        "memory",
        "Memory task: peak memory",
        "Peak memory of one forward + backward step of the layer (MiB) as measured by the "
        "memory task; values on the bars.",
        memory,
    ),
    FigureSpec(
        "loss-step",
        "Convergence task: loss vs step",
        "Training and validation loss (nats per byte; bits per byte = nats / ln 2); the train "
        "loss is an EMA over a faint raw line when there are many steps; " + BAND_NOTE + ".",
        loss_vs_step,
    ),
    FigureSpec(
        "loss-wall",
        "Convergence task: loss vs wall time",
        "The same losses against wall-clock seconds since training started (mean over seeds "
        "at each step); the axis ends where the shortest run ends, so one slow job does not "
        "stretch it; " + BAND_NOTE + ".",
        loss_vs_wall,
    ),
    FigureSpec(
        "dynamics",
        "Convergence task: aux loss, drops and dead experts vs step",
        "Routing during training, mean over layers: the weighted auxiliary loss, the share of "
        "demanded assignments dropped by capacity, and experts under 1% of the mean load; "
        "EMA-smoothed lines over faint raw ones when there are many steps.",
        training_dynamics,
    ),
    FigureSpec(
        "maxvio",
        "MaxVio_batch vs step",
        "E · max_i p_i − 1 per batch (training steps of the convergence task; input batches "
        "of the balance task, whose routers are untrained, on real text and skewed inputs), "
        "mean over layers; variants with the same untrained router draw the same line there "
        "(markers and line styles tell them apart); 0 is perfect balance (Wang et al. 2024, "
        "Eq. 4); " + BAND_NOTE + ".",
        max_vio_vs_step,
    ),
    FigureSpec(
        "load-layers",
        "Expert load per layer",
        "Share of assignments each expert received in each layer, relative to a uniform share "
        "(1, white); red experts are overloaded, blue ones starved. Summed over seeds and "
        "domains, at the last recorded step.",
        load_heatmaps,
    ),
    FigureSpec(
        "load-domains",
        "Expert load by domain (specialisation)",
        "Share of each domain's assignments per expert relative to uniform, summed over layers "
        "and seeds. Distinct rows mean experts specialise by domain.",
        domain_load,
    ),
)


# --- expert parallelism (task=expert_parallel, docs/expert_parallel.md) -----------------------


def _ep_settings(rows: pd.DataFrame) -> pd.Series:
    """Label of each row's setting: the variant plus the variant fields that vary within it in
    these rows (max_devices, num_groups, alpha3, ...), e.g. `deepseek_v2 max_devices=2`."""
    fields = [
        c
        for c in rows.columns
        if c.startswith("variant.") and rows.groupby("variant")[c].nunique(dropna=True).max() > 1
    ]
    labels = rows["variant"].astype(str)
    for c in fields:
        varies = rows.groupby("variant")[c].transform("nunique") > 1
        text = " " + c.split(".", 1)[1] + "=" + rows[c].map(plain)
        labels = labels + text.where(varies, "")
    return labels


def _ep_rows(frame: pd.DataFrame, metric: str, **where: str) -> pd.DataFrame:
    rows = frame[(frame["task"] == "expert_parallel") & (frame["metric"] == metric)]
    for key, value in where.items():
        rows = rows[column(rows, key).astype(str) == value]
    if rows.empty:
        raise Missing(f"no task=expert_parallel {metric} rows in this sweep")
    return rows.assign(setting=_ep_settings(rows))


EP_TRAFFIC = (
    (schema.DEVICES_PER_TOKEN, "ranks per token (● max)", {}),
    (schema.BYTES_PER_TOKEN, "off-rank bytes per token", {}),
    (schema.REMOTE_FRACTION, "remote assignments / kept", {}),
    (schema.RANK_IMBALANCE, "max / mean rows received", {"phase": "eval"}),
)


def ep_traffic(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    """One bar per setting (mean over seeds) for each traffic metric of an eval forward."""
    panels = [
        (m, label, _ep_rows(frame, m.name, layer="mean", **where)) for m, label, where in EP_TRAFFIC
    ]
    fig, axes = _panels(len(panels), height=PANEL_HEIGHT_IN + 0.6)
    for ax, (metric_, label, rows) in zip(axes, panels):
        stats = rows.assign(value=pd.to_numeric(rows["value"])).groupby("setting", sort=True)
        mid = stats["value"].mean()
        pos = np.arange(len(mid))
        variant = stats["variant"].first()
        ax.bar(pos, mid.to_numpy(), color=[colors[v] for v in variant])
        if metric_ is schema.DEVICES_PER_TOKEN and "devices_per_token_max" in rows:
            top = pd.to_numeric(rows["devices_per_token_max"]).groupby(rows["setting"]).max()
            ax.plot(pos, top.reindex(mid.index).to_numpy(), "o", color="0.2", ms=4)
        ax.set_xticks(pos, mid.index, rotation=35, ha="right", fontsize=8)
        ax.set(ylabel=label, title=metric_.name)
        ax.grid(axis="x", visible=False)
    return fig


def ep_rank_tokens(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    """Small multiples, one [src, dst] matrix of token rows per setting (seeds summed)."""
    rows = _ep_rows(frame, schema.RANK_TOKENS.name).dropna(subset=["src", "dst"])
    maps = {
        setting: part.pivot_table(index="src", columns="dst", values="value", aggfunc="sum")
        for setting, part in rows.groupby("setting", sort=True)
    }
    vmax = max(float(np.nanmax(m.to_numpy())) for m in maps.values())
    fig, axes = _panels(len(maps), ncols=4, height=2.6)
    for ax, (setting, matrix) in zip(axes, maps.items()):
        image = ax.imshow(matrix.to_numpy(), cmap="viridis", vmin=0, vmax=vmax)
        variant = setting.split()[0]
        ax.set_title(setting, color=colors.get(variant, "0.2"), fontsize=8, fontweight="bold")
        ax.set_xticks(range(matrix.shape[1]), [plain(v) for v in matrix.columns])
        ax.set_yticks(range(matrix.shape[0]), [plain(v) for v in matrix.index])
        ax.set(xlabel="dst rank", ylabel="src rank")
        ax.grid(False)
    fig.colorbar(image, ax=axes, label="token rows sent", shrink=0.9)
    return fig


def ep_imbalance_vs_step(frame: pd.DataFrame, colors: dict[str, str]) -> plt.Figure:
    """rank_imbalance per training step, one line per setting (mean over seeds)."""
    rows = _ep_rows(frame, schema.RANK_IMBALANCE.name, phase="train").dropna(subset=["step"])
    rows = rows.assign(**_numeric(rows, "step", "value"))
    fig, axes = _panels(1, height=PANEL_HEIGHT_IN + 0.6)
    ax = axes[0]
    palette = sns.color_palette("tab20", rows["setting"].nunique())
    for color, (setting, part) in zip(palette, rows.groupby("setting", sort=True)):
        line = part.groupby("step")["value"].mean()
        ax.plot(line.index, line.to_numpy(), color=color, label=setting, lw=1.4)
    ax.axhline(1, color="0.3", lw=0.8)
    ax.set(xlabel="training step", ylabel="max / mean token rows received per rank")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(fig, axes)
    return fig


EP_FIGURES = (
    FigureSpec(
        "ep-traffic",
        "Expert parallelism: traffic per token",
        "One eval forward of the global batch over task.ep_size ranks (exact counts): ranks a "
        "token is sent to (mean; dots: max), off-rank bytes of dispatch and combine per token, "
        "the fraction of kept assignments whose expert is on another rank, and the received-"
        "token imbalance across ranks (1 = balanced). DeepSeek-V2 bounds ranks per token by "
        "max_devices (arXiv:2405.04434 Sec. 2.1.3).",
        ep_traffic,
    ),
    FigureSpec(
        "ep-rank-tokens",
        "Expert parallelism: rank-to-rank token matrix",
        "Token rows each source rank (row) sends to each destination rank (column) in one eval "
        "forward; the diagonal stays on its rank.",
        ep_rank_tokens,
    ),
    FigureSpec(
        "ep-imbalance",
        "Expert parallelism: received-token imbalance during training",
        "rank_imbalance per step of the task's short training run on inputs skewed toward rank "
        "0's experts; balance losses (e.g. DeepSeek-V2's communication-balance loss, Sec. "
        "2.1.4) pull it toward 1.",
        ep_imbalance_vs_step,
    ),
)
FIGURES = (*FIGURES, *EP_FIGURES)
