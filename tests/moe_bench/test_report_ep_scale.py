"""The simulated-scale figures (task=ep_sim) plot their rows' values, and the page shows the
table of those values beside each figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moe_bench.report.figures import SCALE_FIGURES, Missing
from moe_bench.report.render import build_report, stages

from . import report_fixtures as fx

RANKS = (8, 32, 128)
RULES = ("topk", "device:2")
PLACEMENTS = ("contiguous", "eplb")


def ep_sim_job(source: str) -> list[dict]:
    common = fx.base("deepseek_v3", "ep_sim", 0, **{"task.source": source})
    rows = []
    for i, P in enumerate(RANKS):
        for j, rule in enumerate(RULES):
            for k, place in enumerate(PLACEMENTS):
                where = {"ranks": P, "nodes": P // 8, "rule": rule, "placement": place}
                v = (1 + i) * (1 + 0.3 * j) / (1 + k) + (0.1 if source == "router" else 0)
                rows += [
                    fx.row(common, "sim_straggler", 1 + v, **where),
                    fx.row(common, "sim_bytes_per_token", 1000 * v, **where),
                    fx.row(common, "sim_a2a_us", 100 * v, **where),
                    fx.row(common, "sim_step_us", 150 * v, comm_us=100 * v, compute_us=50 * v,
                           **where),
                ]  # fmt: skip
    return rows


def expected(frame: pd.DataFrame, metric: str, field: str) -> dict[tuple, float]:
    rows = frame[frame["metric"] == metric]
    return {
        (arm, f"{r} · {p}", float(P)): float(v)
        for arm, r, p, P, v in zip(rows["arm"], rows["rule"], rows["placement"], rows["ranks"],
                                   rows[field])
    }  # fmt: skip


@pytest.mark.parametrize("spec", SCALE_FIGURES, ids=lambda s: s.key)
def test_each_scale_figure_draws_its_rows(spec) -> None:
    found = stages(fx.frame([ep_sim_job("trace"), ep_sim_job("router")]))
    drawn = spec.draw(found.inputs)
    lines = [line for ax in drawn.figure.axes for line in ax.get_lines()]
    assert lines and all(ax.get_xscale() == "log" for ax in drawn.figure.axes if ax.get_lines())
    measures = (
        [("sim_straggler", "value"), ("sim_bytes_per_token", "value"), ("sim_a2a_us", "value")]
        if spec.key == "ep-scale"
        else [("sim_step_us", "comm_us"), ("sim_step_us", "compute_us")]
    )
    frame = found.frame
    want = {}
    for n, (metric, field) in enumerate(measures):
        for key, value in expected(frame, metric, field).items():
            want[(n, *key)] = value
    arms = sorted(frame["arm"].unique())
    got = {}
    for idx, ax in enumerate(drawn.figure.axes[: len(measures) * len(arms)]):
        n, arm = divmod(idx, len(arms))
        for line in ax.get_lines():
            for x, y in zip(*line.get_data()):
                got[(n, arms[arm], line.get_label(), float(x))] = float(y)
    assert got.keys() == want.keys()
    assert np.allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-12)
    # the table beside the figure is what was drawn
    data = drawn.data
    assert len(data) == len(want)
    spoiled = found.inputs.rows.copy()
    spoiled.loc[spoiled["metric"] == measures[0][0], measures[0][1]] *= 2
    respoiled = spec.draw(found.inputs._replace(rows=spoiled)).data
    assert not np.allclose(respoiled["y"], data["y"])


def test_no_ep_sim_rows_is_missing_not_empty() -> None:
    found = stages(fx.frame([fx.expert_parallel_job("switch")]))
    with pytest.raises(Missing, match="no sim_straggler rows"):
        SCALE_FIGURES[0].draw(found.inputs)


@pytest.mark.slow  # a whole page: seconds
def test_the_page_shows_each_scale_figure_with_its_table(tmp_path) -> None:
    jobs = [ep_sim_job("trace"), ep_sim_job("router")]
    root = fx.write_sweep(tmp_path, jobs, ["task=ep_sim", "task.source=trace,router"])
    html = build_report(root).read_text()
    for spec in SCALE_FIGURES:
        assert f'<figure id="{spec.key}">' in html
    assert "could not be drawn" not in html
    assert "<th>panel</th><th>series</th><th>8</th><th>32</th><th>128</th>" in html
