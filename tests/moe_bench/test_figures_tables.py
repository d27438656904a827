"""Every figure kind plots the values of the table (or frame, or claims result) it illustrates.

The values are read back from the matplotlib artists (bar lengths, line data, image arrays,
error-bar points) and held against values this test computes itself from the source: the
leaderboard cells for bars and points, the ok rows of the frame for step curves and heatmaps
(plain pandas: mean over seeds per arm and step, load shares E · c_i / Σ c), the claims results
for the forest plot. A figure kind without a check here fails `test_every_kind_has_a_check`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from matplotlib import pyplot as plt
from matplotlib.container import ErrorbarContainer

from moe_bench.report import figures
from moe_bench.report.figures.draw import ema, smoothing_alpha
from moe_bench.report.frames import ARM
from moe_bench.report.render import Stages, stages
from tests.slow_cases import some_slow

from . import report_fixtures as fx
from .test_report import full_jobs

RTOL = 1e-9
CLAIM = "claim"  # the kind of every per-claim figure (figures.claim_figures)

# Kinds that cannot be held against an independent source, with the reason. Empty today: every
# kind is checked; a kind added here must say why.
UNCHECKED: dict[str, str] = {}


@pytest.fixture(scope="module")
def found() -> Stages:
    # timed rates that differ per variant, size and seed, so no two lines coincide
    jobs = [j for j in full_jobs() if j[0]["task"] != "throughput"]
    for v, variant in enumerate(("dense", "switch", "gshard")):
        for seed in (0, 1):
            for tokens in (256, 1024):
                for experts in (4, 8):
                    speed = 1e5 / (1 + v) * (1 + 0.013 * seed) * (tokens / 256) ** 0.37
                    speed *= 1.0 if variant == "dense" else (1 + 0.07 * experts)
                    jobs.append(fx.throughput_job(variant, seed, tokens, experts, speed=speed))
    for seed in (0, 1, 2):  # a claim with three paired seeds, for the forest plot
        jobs.append(fx.convergence_job("dense", seed))
        switch = fx.convergence_job("switch", seed)
        jobs.append([{**r, "variant.capacity_factor": 1.0} for r in switch])
    return stages(fx.frame([fx.closed(j) for j in jobs]))


def kind(key: str) -> str:
    return CLAIM if key.startswith("claim-") and key != "claims-forest" else key


def close(got, want, what) -> None:
    got, want = np.asarray(got, float), np.asarray(want, float)
    assert got.shape == want.shape, (what, got, want)
    assert np.allclose(got, want, rtol=RTOL, atol=1e-12, equal_nan=True), (what, got, want)


def visible_axes(fig: plt.Figure) -> dict[str, plt.Axes]:
    """Panel title -> axes (colorbars have no title)."""
    out = {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}
    assert out, "no titled panel"
    return out


def rows_of(found: Stages, metric: str) -> pd.DataFrame:
    rows = found.inputs.rows
    rows = rows[rows["metric"] == metric].copy()
    for name in ("step", "wall_s", "value"):
        if name in rows.columns:
            rows[name] = pd.to_numeric(rows[name], errors="coerce")
    return rows


def pooled(rows: pd.DataFrame) -> pd.DataFrame:
    """The whole-stack rows: no expert, and layer "mean" or none."""
    keep = rows["expert"].isna() if "expert" in rows.columns else True
    if "layer" in rows.columns:
        keep = keep & (rows["layer"].isna() | (rows["layer"].astype(str) == "mean"))
    return rows[keep]


def step_means(rows: pd.DataFrame, x: str = "step") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """arm -> (x, y): per step, the mean over seeds of x and of the value, by x."""
    out = {}
    for arm, part in rows.groupby(ARM):
        per_step = part.groupby("step").agg(x=(x, "mean"), y=("value", "mean")).sort_values("x")
        out[str(arm)] = (per_step["x"].to_numpy(), per_step["y"].to_numpy())
    return out


def labelled_lines(ax: plt.Axes) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
    """label -> (x, y) of each labelled line; x is None for a reference line spanning the axes
    (its x in axes coordinates)."""
    out = {}
    for line in ax.get_lines():
        if line.get_label().startswith("_"):
            continue
        in_data = line.get_transform().contains_branch_seperately(ax.transData)[0]
        x = np.asarray(line.get_xdata(), float) if in_data else None
        out[line.get_label()] = (x, np.asarray(line.get_ydata(), float))
    return out


def check_curves(ax: plt.Axes, want: dict, what: str) -> None:
    """The panel's labelled lines are exactly `want`'s arms, with its x and y (the EMA of y where
    the panel says it is smoothed, as its caption states)."""
    got = labelled_lines(ax)
    assert set(got) == set(want), (what, sorted(got), sorted(want))
    smoothed = ax.get_title().endswith("(EMA)")
    for arm, (x, y) in want.items():
        if smoothed:
            y = ema(pd.Series(y), smoothing_alpha(len(y))).to_numpy()
        close(got[arm][0], x, (what, arm, "x"))
        close(got[arm][1], y, (what, arm, "y"))


# --- bars: the leaderboard's cells ------------------------------------------------------------


def board_cells(found: Stages, metrics: set[str]) -> dict[str, tuple[str, list[float]]]:
    """Panel title -> (metric, the non-missing cells' means in table order), per board column."""
    out = {}
    for task, board in found.boards.items():
        for label, final in board.specs.items():
            if final.col.metric in metrics:
                cells = [c for c in board.table[label] if not c.missing]
                if cells:
                    out[f"{task} · {label}"] = (final.col.metric, [c.mean for c in cells])
    return out


def check_bars(metrics: set[str], share: str | None = None) -> Callable:
    def check(fig: plt.Figure, found: Stages) -> None:
        want = board_cells(found, metrics)
        axes = visible_axes(fig)
        for title, ax in axes.items():
            heights = [p.get_width() for p in ax.patches]  # horizontal bars: value = length
            if title in want:
                close(heights, want[title][1], title)
                continue
            # the share of the dense twin's rate: 1 / the table's ratio to dense
            source = next(
                (t for t, (m, _) in want.items() if m == share and shown(t) == title), None
            )
            assert source is not None, (title, sorted(want))
            close(heights, [1 / v for v in want[source][1]], title)
        primary = {t for t, (m, _) in want.items() if m != share}
        assert primary <= set(axes), sorted(primary - set(axes))

    return check


def shown(title: str) -> str:
    return title.replace("ratio to dense", "share of dense rate").replace("[×] ↓", "")


# --- points and curves ------------------------------------------------------------------------


def check_quality_cost(fig: plt.Figure, found: Stages) -> None:
    """Each point is (cost cell, final val loss cell) of one arm of the board named in the
    title; a title matched by variant takes the cost from the other board's row of that
    variant."""
    for title, ax in visible_axes(fig).items():
        task, rest = title.split(" · ", 1)
        loss_name, cost_part = rest.split(" vs ", 1)
        board = found.boards[task]
        cost_board = board
        matched = cost_part.endswith("(matched by variant)")
        if matched:
            other, cost_part = cost_part.removesuffix(" (matched by variant)").split(" · ", 1)
            cost_board = found.boards[other]
        loss = next(k for k in board.specs if k.split(" [")[0] == loss_name and "nats" in k)
        cost = next(k for k in cost_board.specs if k.split(" [")[0] == cost_part)
        key = "variant" if matched else ARM
        losses = dict(zip(board.table[key].astype(str), board.table[loss]))
        costs = dict(zip(cost_board.table[key].astype(str), cost_board.table[cost]))
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert bars, title
        points = []
        for container in bars:
            arm = container.get_label()
            line = container.lines[0]
            x, y = float(line.get_xdata()[0]), float(line.get_ydata()[0])
            close([x, y], [costs[arm].mean, losses[arm].mean], (title, arm))
            points.append((x, y))
        for line in ax.get_lines():  # the Pareto frontier joins plotted points only
            if line.get_label() == "Pareto frontier":
                for x, y in zip(line.get_xdata(), line.get_ydata()):
                    assert any(np.isclose([x, y], p, rtol=RTOL).all() for p in points), title


def check_losses(x: str) -> Callable:
    def check(fig: plt.Figure, found: Stages) -> None:
        axes = visible_axes(fig)
        seen = set()
        for metric in ("train_loss", "val_loss"):
            rows = pooled(rows_of(found, metric)).dropna(subset=["step", x])
            for task, part in rows.groupby("task"):
                title = f"{metric} · {task}"
                ax = axes.get(title) or axes.get(title + " (EMA)")
                assert ax is not None, (title, sorted(axes))
                check_curves(ax, step_means(part, x), title)
                seen.add(ax.get_title())
        assert seen == set(axes), sorted(set(axes) - seen)

    return check


def check_max_vio(fig: plt.Figure, found: Stages) -> None:
    axes = visible_axes(fig)
    rows = pooled(rows_of(found, "max_vio_batch")).dropna(subset=["step"])
    assert not rows.empty
    seen = set()
    for task, part in rows.groupby("task"):
        title = f"MaxVio_batch · {task}"
        ax = axes.get(title) or axes.get(title + " (untrained routers)")
        assert ax is not None, (title, sorted(axes))
        check_curves(ax, step_means(part), title)
        seen.add(ax.get_title())
    assert seen == set(axes)


def check_dynamics(fig: plt.Figure, found: Stages) -> None:
    axes = visible_axes(fig)
    trained = set(found.inputs.rows.loc[found.inputs.rows["metric"] == "train_loss", "job_dir"])
    seen = set()
    for metric in ("aux_loss", "drop_fraction", "dead_experts"):
        rows = pooled(rows_of(found, metric)).dropna(subset=["step"])
        rows = rows[rows["job_dir"].isin(trained)]
        if metric == "aux_loss" and "loss" in rows.columns:
            rows = rows[rows["loss"] == "total"]
        for task, part in rows.groupby("task"):
            if part["step"].nunique() > 1:
                title = f"{task} task · {metric}"
                assert title in axes, (title, sorted(axes))
                check_curves(axes[title], step_means(part), title)
                seen.add(title)
    assert seen and seen == set(axes)


def check_ep_imbalance(fig: plt.Figure, found: Stages) -> None:
    rows = rows_of(found, "rank_imbalance")
    rows = rows[(rows["phase"] == "train")].dropna(subset=["step"])
    (ax,) = [ax for ax in fig.axes if ax.get_visible()]  # its one panel has no title
    check_curves(ax, step_means(rows), "rank_imbalance · training")


def check_claim(fig: plt.Figure, found: Stages, result) -> None:
    rows = pooled(rows_of(found, "val_loss")).dropna(subset=["step"])
    treated, control = result.arms
    rows = rows[rows[ARM].isin([*treated, *control])]
    (ax,) = visible_axes(fig).values()
    check_curves(ax, step_means(rows), result.claim.id)


def check_throughput(x: str, other: str) -> Callable:
    """Per task and pass, one line per (variant, other swept size): the mean over seeds of the
    timed tokens/s at each value of `x`; an arm without `x` (dense) a flat line at its mean."""

    def check(fig: plt.Figure, found: Stages) -> None:
        rows = rows_of(found, "tokens_per_s")
        rows = rows[rows["step"].isna()] if "step" in rows.columns else rows
        rows = rows.assign(**{x: pd.to_numeric(rows[x]), other: pd.to_numeric(rows[other])})
        axes = visible_axes(fig)
        assert len(axes) == rows.groupby(["task", "pass"]).ngroups
        for (task, pass_), part in rows.groupby(["task", "pass"]):
            want = []
            for _, series in part.groupby(["variant", other], dropna=False):
                if series[x].isna().all():
                    want.append((None, [series["value"].mean()] * 2))
                else:
                    means = series.groupby(x)["value"].mean().sort_index()
                    want.append((list(means.index), list(means)))
            got = list(labelled_lines(axes[f"{task} · pass: {pass_}"]).values())
            assert len(got) == len(want), (task, pass_)
            for xs, ys in want:
                hits = [
                    g
                    for g in got
                    if len(g[1]) == len(ys)
                    and np.allclose(g[1], ys, rtol=RTOL)
                    and (g[0] is None if xs is None else np.allclose(g[0], xs, rtol=RTOL))
                ]
                assert len(hits) == 1, (task, pass_, xs, ys)

    return check


# --- heatmaps: load shares from the rows ------------------------------------------------------


def shares(counts: pd.DataFrame) -> pd.DataFrame:
    counts = counts.fillna(0.0)
    return counts.div(counts.sum(axis=1), axis=0) * counts.shape[1]


def check_images(want: dict[str, np.ndarray], fig: plt.Figure) -> None:
    axes = visible_axes(fig)
    assert set(axes) == set(want), (sorted(axes), sorted(want))
    for title, matrix in want.items():
        (image,) = axes[title].get_images()
        close(np.asarray(image.get_array(), float), matrix, title)


def expert_loads(found: Stages) -> pd.DataFrame:
    rows = rows_of(found, "expert_load").dropna(subset=["expert"])
    rows = rows[pd.to_numeric(rows["variant.num_experts"], errors="coerce") > 1]
    rows = rows[rows["layer"].astype(str) != "mean"]
    assert rows["task"].nunique() == 1  # titles are the arm alone
    return rows


def check_load_maps(by: str) -> Callable:
    """Per arm, at each job's last step: `by` × expert counts summed over seeds and the other
    of layer/domain, as shares of uniform."""

    def check(fig: plt.Figure, found: Stages) -> None:
        rows = expert_loads(found).dropna(subset=[by])
        last = rows.groupby("job_dir")["step"].transform("max")
        rows = rows[rows["step"] == last]
        want = {
            str(arm): shares(
                part.groupby([by, "expert"])["value"].sum().unstack("expert")
            ).to_numpy()
            for arm, part in rows.groupby(ARM)
        }
        check_images(want, fig)

    return check


def check_load_steps(fig: plt.Figure, found: Stages) -> None:
    rows = expert_loads(found).dropna(subset=["layer", "step"])
    want = {}
    for arm, part in rows.groupby(ARM):
        layers = sorted(part["layer"].unique())
        for layer in dict.fromkeys([layers[0], layers[-1]]):
            one = part[part["layer"] == layer]
            counts = one.groupby(["step", "expert"])["value"].sum().unstack("expert")
            want[f"{arm} · layer {layer}"] = shares(counts).to_numpy()
    check_images(want, fig)


def check_rank_tokens(fig: plt.Figure, found: Stages) -> None:
    rows = rows_of(found, "rank_tokens").dropna(subset=["src", "dst"])
    want = {
        str(arm): part.groupby(["src", "dst"])["value"].sum().unstack("dst").to_numpy()
        for arm, part in rows.groupby(ARM)
    }
    check_images(want, fig)


# --- the claims forest: each check's d and interval -------------------------------------------


def check_forest(fig: plt.Figure, found: Stages) -> None:
    want = {}
    for r in found.claims:
        for (measure, _, _), paired in zip(r.numbers, r.checks):
            if paired.n >= 2:
                want[f"{r.claim.id} · {measure.label}"] = (paired.mean, paired.low, paired.high)
    assert want
    got = {}
    for ax in visible_axes(fig).values():
        labels = {round(t.get_position()[1]): t.get_text() for t in ax.get_yticklabels()}
        for container in ax.containers:
            if not isinstance(container, ErrorbarContainer):
                continue
            line, _, (segments,) = container.lines
            d, y = float(line.get_xdata()[0]), float(line.get_ydata()[0])
            ((low, _), (high, _)) = segments.get_segments()[0]
            got[labels[round(y)]] = (d, low, high)
    assert set(got) == set(want), (sorted(got), sorted(want))
    for label, values in want.items():
        close(got[label], values, label)


CHECKS: dict[str, Callable[[plt.Figure, Stages], None]] = {
    "throughput-experts": check_throughput("variant.num_experts", "model.tokens"),
    "throughput-tokens": check_throughput("model.tokens", "variant.num_experts"),
    "speed": check_bars({"tokens_per_s"}),
    "efficiency": check_bars({"tflops", "ratio_to_dense"}, share="ratio_to_dense"),
    "peak-memory": check_bars({"peak_memory_bytes"}),
    "quality-cost": check_quality_cost,
    "loss-step": check_losses("step"),
    "loss-wall": check_losses("wall_s"),
    "dynamics": check_dynamics,
    "maxvio": check_max_vio,
    "load-layers": check_load_maps("layer"),
    "load-steps": check_load_steps,
    "load-domains": check_load_maps("domain"),
    "ep-traffic": check_bars(
        {"devices_per_token", "bytes_per_token", "remote_fraction", "rank_imbalance"}
    ),
    "ep-rank-tokens": check_rank_tokens,
    "ep-imbalance": check_ep_imbalance,
    "claims-forest": check_forest,
}

KINDS = [*(spec.key for spec in figures.FIGURES), CLAIM]


def test_every_kind_has_a_check() -> None:
    """A new figure kind fails here until it is checked (or listed, with why, in UNCHECKED)."""
    assert set(CHECKS) | {CLAIM} | set(UNCHECKED) == set(KINDS)
    assert not set(CHECKS) & set(UNCHECKED)


def draw_and_check(key: str, found: Stages, spoil: bool = False) -> None:
    """Draw every figure of `key` and run its check; `spoil`: first change one plotted value
    by 1e-6 relative, so the check must fail."""
    if key == CLAIM:
        specs = figures.claim_figures(found.claims)
        assert specs, "the fixture covers no claim"
        jobs = [
            (s, lambda fig, found, r=r: check_claim(fig, found, r))
            for s, r in zip(specs, found.claims)
        ]
    else:
        (spec,) = [s for s in figures.FIGURES if s.key == key]
        jobs = [(spec, CHECKS[key])]
    for spec, check in jobs:
        drawn = spec.draw(found.inputs)
        try:
            assert len(drawn.data), key
            if spoil:
                spoil_one(drawn.figure)
            check(drawn.figure, found)
        finally:
            plt.close(drawn.figure)


def spoil_one(fig: plt.Figure) -> None:
    ax = next(ax for ax in fig.axes if ax.get_visible() and (ax.lines or ax.patches or ax.images))
    factor = 1 + 1e-6
    if ax.images:
        array = np.array(ax.images[0].get_array(), float)
        array.flat[0] = array.flat[0] * factor + 1e-6
        ax.images[0].set_data(array)
    elif ax.patches:
        ax.patches[0].set_width(ax.patches[0].get_width() * factor)
    elif any(isinstance(c, ErrorbarContainer) for c in ax.containers):
        line = next(c for c in ax.containers if isinstance(c, ErrorbarContainer)).lines[0]
        line.set_xdata(np.asarray(line.get_xdata(), float) * factor + 1e-6)
    else:
        line = next(line for line in ax.lines if not line.get_label().startswith("_"))
        line.set_ydata(np.asarray(line.get_ydata(), float) * factor)


# one kind per way a figure plots its values, and `spoil_one` spoils them (bars, lines, heatmap,
# error bars), in the default run; the other kinds in the slow run (the default run's full page,
# test_report.py, draws every kind)
SPOILED_BY_KIND = {"speed", "loss-step", "load-layers", "claims-forest"}


@pytest.mark.parametrize("key", some_slow(KINDS, set(KINDS) - SPOILED_BY_KIND - {CLAIM}))
def test_figure_plots_its_sources_values(key: str, found: Stages) -> None:
    if key in UNCHECKED:
        pytest.fail(f"{key} unchecked: {UNCHECKED[key]}")  # listed, never silently skipped
    draw_and_check(key, found)


@pytest.mark.parametrize(
    "key",
    some_slow(
        [k for k in KINDS if k not in UNCHECKED],
        [k for k in KINDS if k not in UNCHECKED and k not in SPOILED_BY_KIND],
    ),
)
def test_a_mismatch_is_caught(key: str, found: Stages) -> None:
    """The checks bite: one plotted value off by 1e-6 relative fails its kind's check."""
    with pytest.raises(AssertionError):
        draw_and_check(key, found, spoil=True)
