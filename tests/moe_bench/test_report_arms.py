"""The report's arms, statistics, run card and figures: a sweep with two arms of one variant
shows two labelled arms everywhere; the t rule on planted differences; a report rebuilt from
results.csv.gz alone; every figure plots its table's values; the report imports no torch."""

from __future__ import annotations

import gzip
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib import pyplot as plt
from matplotlib.collections import PolyCollection
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

import variants
from moe_bench import identity, registry
from moe_bench.report import (
    build_report,
    claims,
    figures,
    frames,
    leaderboards,
    load,
    sections,
    stats,
)  # fmt: skip
from moe_bench.report.render import stages
from scripts import add_run_card

from . import report_fixtures as fx
from .test_report import full_jobs

REPO = Path(__file__).parents[2]
CF1 = "switch · capacity_factor=1"
DROPLESS = "switch · dropless"


def arm_jobs() -> list[list[dict]]:
    """dense and two arms of switch (capacity factor 1.0 and none), two seeds each."""
    jobs = []
    for seed in (0, 1):
        jobs.append(fx.convergence_job("dense", seed))
        for factor in (1.0, None):
            rows = fx.convergence_job("switch", seed)
            shift = 0.0 if factor else -0.2  # the dropless arm ends lower
            jobs.append(
                [
                    {**r, "variant.capacity_factor": factor, "value": r["value"] + shift}
                    if r["metric"] == "val_loss"
                    else {**r, "variant.capacity_factor": factor}
                    for r in rows
                ]
            )
    return jobs


# --- arms -------------------------------------------------------------------------------------


def test_arm_labels_name_what_varies_within_a_variant() -> None:
    arms = {
        "a": {"variant": "switch", "task": "t", "variant.capacity_factor": 1.0},
        "b": {"variant": "switch", "task": "t", "variant.capacity_factor": None},
        "c": {"variant": "deepseek_v3", "task": "t", "variant.bias_update_rate": 0},
        "d": {"variant": "deepseek_v3", "task": "t", "variant.bias_update_rate": 0.001},
        "e": {"variant": "dense", "task": "t"},
    }
    assert identity.arm_labels(arms) == {
        "a": CF1,
        "b": DROPLESS,
        "c": "deepseek_v3 · bias_update_rate=0",
        "d": "deepseek_v3 · bias_update_rate=0.001",
        "e": "dense",
    }
    # the arm leaves out the seed and run-only keys, and spells values one way
    one = {"variant": "switch", "seed": 0, "task.overwrite": True, "model.tokens": 512.0}
    other = {"variant": "switch", "seed": 3, "task.overwrite": False, "model.tokens": "512"}
    assert (
        identity.arm_key(one)
        == identity.arm_key(other)
        == {
            "variant": "switch",
            "model.tokens": 512,
        }
    )
    # card columns and derived counts never count
    assert identity.arm_key({**one, "env.cpu": "x", "params_total": 9}) == identity.arm_key(one)


def test_fields_added_later_leave_the_key_at_the_value_the_code_before_computed() -> None:
    """router_grad=topk and the convergence task's upcycling fields at their defaults are the
    code before them: rows without those columns are the same config and the same arm."""
    before = {"variant": "mixtral", "task": "convergence", "model.tokens": 512}
    now = {**before, "variant.router_grad": "topk", "variant.default_moe_decay": 0.9,
           "task.init_from": None, "task.upcycle": "copy", "task.upcycle_noise": 0.0,
           "task.save": False}  # fmt: skip
    assert identity.config_key(now) == identity.config_key(before)
    assert identity.arm_key(now) == identity.arm_key(before)
    dense_grad = {**now, "variant.router_grad": "default_moe"}
    assert identity.config_key(dense_grad)["variant.router_grad"] == "default_moe"
    labels = identity.arm_labels({"a": identity.arm_key(now), "b": identity.arm_key(dense_grad)})
    assert labels == {"a": "mixtral · router_grad=topk", "b": "mixtral · router_grad=default_moe"}


def test_two_arms_of_one_variant_are_two_rows_everywhere(tmp_path: Path, no_figures: None) -> None:
    html = build_report(fx.write_sweep(tmp_path, arm_jobs())).read_text()
    board = html[html.index('<section id="leaderboards">') : html.index('<section id="figures">')]
    legend = html[html.index('<div class="legend">') : html.index("<nav>")]
    ran = html[html.index('<section id="what-ran">') : html.index('<section id="run">')]
    summary = html[html.index('<section id="findings">') : html.index('<section id="what-ran">')]
    for arm in (CF1, DROPLESS):
        for part in (board, legend, ran):
            assert f">{arm}<" in part or f"> {arm} <" in part or f">{arm} <" in part, arm
    assert f"Best quality: {DROPLESS}" in summary
    # figure legends: one line per arm, never their mean
    found = stages(fx.frame([fx.closed(j) for j in arm_jobs()]))
    for spec in figures.FIGURES:
        if spec.key in ("loss-step", "maxvio", "dynamics", "load-layers"):
            drawn = spec.draw(found.inputs)
            series = set(drawn.data["series"]) | set(drawn.data["panel"])
            assert any(CF1 in s for s in series) and any(DROPLESS in s for s in series), spec.key
            labels = {t.get_text() for leg in drawn.figure.legends for t in leg.get_texts()}
            if labels:
                assert {CF1, DROPLESS} <= labels, spec.key


def test_claim_figures_show_only_their_arms() -> None:
    jobs = []
    for seed in (0, 1, 2):
        jobs.append(fx.convergence_job("dense", seed))
        for factor in (1.0, 2.0):
            rows = fx.convergence_job("switch", seed)
            jobs.append([{**r, "variant.capacity_factor": factor} for r in rows])
    found = stages(fx.frame([fx.closed(j) for j in jobs]))
    ids = [r.claim.id for r in found.claims]
    assert "1a" in ids and "4" in ids
    specs = figures.claim_figures(found.claims)
    for spec, result in zip(specs, found.claims):
        drawn = spec.draw(found.inputs)
        assert set(drawn.data["series"]) == {*result.arms[0], *result.arms[1]}
    one_a = found.claims[ids.index("1a")]
    assert one_a.arms == (["switch · capacity_factor=1"], ["dense"])
    forest = figures.FIGURES[-1].draw(found.inputs)
    assert {"claims 1", "claims 4"} <= set(forest.data["panel"])


# --- the t rule -------------------------------------------------------------------------------


def test_t_critical_values() -> None:
    assert stats.t_critical(2) == pytest.approx(4.303, abs=1e-3)
    assert stats.t_critical(4) == pytest.approx(2.776, abs=1e-3)
    assert stats.t_critical(1e6) == pytest.approx(1.960, abs=1e-3)


def planted(n: int, ratio: float) -> np.ndarray:
    """n paired differences with mean 1 and mean / SE = ratio."""
    spread = np.linspace(-1, 1, n)
    spread = spread / spread.std(ddof=1)
    return 1.0 + spread * math.sqrt(n) / ratio


def test_paired_verdict_is_the_t_interval_not_2_se() -> None:
    d = planted(3, 2.5)  # 2.5 SE: "reproduced" by 2 SE, inside t(0.975, 2) = 4.30 SE
    control = np.full(3, 3.0)
    paired = claims.paired_verdict(list(control - d), list(control), "min")
    assert paired.mean == pytest.approx(1.0) and paired.mean / paired.se == pytest.approx(2.5)
    assert paired.verdict == claims.INCONCLUSIVE
    assert paired.low < 0 < paired.high
    assert paired.detectable == pytest.approx(4.303 * paired.se, rel=1e-3)
    assert paired.needed is not None and paired.needed > 3
    # the seeds it asks for resolve this d at this spread; one fewer does not
    sd = paired.se * math.sqrt(3)
    assert stats.detectable(sd, paired.needed) < 1.0 <= stats.detectable(sd, paired.needed - 1)
    # the same d at 5 SE is beyond the t interval: reproduced; mirrored: contradicted
    strong = planted(3, 5.0)
    assert claims.paired_verdict(list(control - strong), list(control), "min").verdict == (
        claims.REPRODUCED
    )
    assert claims.paired_verdict(list(control + strong), list(control), "min").verdict == (
        claims.CONTRADICTED
    )


def test_leaderboard_beyond_the_noise_is_welch_t() -> None:
    # two arms, 3 seeds each, means 2.5 Welch SEs apart: 2 SE would star it, t does not
    a = stats.Estimate(1.0, 0.4, 3)
    se = math.sqrt(2 * 0.4**2 / 3)
    b = stats.Estimate(1.0 + 2.5 * se, 0.4, 3)
    assert stats.distinct(a, b) is False
    assert stats.distinct(a, stats.Estimate(1.0 + 6 * se, 0.4, 3)) is True
    jobs = []
    for variant, mean in (("switch", 3.0), ("gshard", 3.0 + 2.5 * se)):
        for seed, noise in enumerate((-0.4, 0.0, 0.4)):
            common = fx.base(variant, "convergence", seed)
            jobs.append([fx.row(common, "val_loss", mean + noise, step=10)])
    board = leaderboards.leaderboard("convergence", fx.frame(jobs))
    assert set(board.marks["final val loss [nats] ↓"]) == {"tie"}


def test_timing_star_comes_from_the_interleaved_ratio_interval() -> None:
    # 10% apart: a tie when the ratio's interval is ±8% each, a star at ±2%; the IQRs
    # (whole-job spreads) are the same in both and play no part
    for half, mark in ((0.08, "tie"), (0.02, "best")):
        jobs = [
            fx.throughput_job("switch", speed=1.1e5, iqr=0.5),
            fx.throughput_job("gshard", speed=1.0e5, iqr=0.5),
        ]
        for job in jobs:
            for r in job:
                if r["metric"] == "ratio_to_dense":
                    r["ratio_ci95"] = half * r["value"]
        board = leaderboards.leaderboard("throughput", fx.frame(jobs))
        assert board.marks.loc[0, "tokens/s fwd+bwd [tok/s] ↑"] == mark


# --- the run card and the saved table ---------------------------------------------------------


def test_report_rebuilt_from_the_gzipped_table_alone(tmp_path: Path, no_figures: None) -> None:
    jobs = [
        fx.throughput_job("switch"),
        fx.memory_job("dense"),
        fx.failed_job("switch", "memory", "RuntimeError: out of memory"),
    ]
    sweep = fx.write_sweep(tmp_path / "sweep", jobs)
    build_report(sweep, gzip_csv=True)
    saved = tmp_path / "empty"
    saved.mkdir()
    (saved / "results.csv.gz").write_bytes((sweep / "results.csv.gz").read_bytes())
    html = build_report(saved).read_text()
    assert "<h3>throughput</h3>" in html and "<h3>memory</h3>" in html
    jobs = len(jobs)
    assert f"<li>{jobs} jobs</li>" in html and f"<li>{jobs - 1} ok</li>" in html
    assert '<li class="bad">1 failed</li>' in html
    run = html[html.index('<section id="run">') :]
    for key, value in (("cpu", "Synthetic CPU"), ("torch", "2.13.0"), ("commit", "abc1234")):
        assert re.search(rf"<dt>{key}</dt><dd><code>{re.escape(value)}</code>", run), key
    assert "2026-01-02 03:04:05 UTC" in run and "<dt>dtype</dt>" in run
    with gzip.open(saved / "results.csv.gz", "rt") as table:
        header = table.readline()
    assert "env.torch" in header and "card.task_ask" in header  # the card travels


def test_rows_without_the_card_still_render_and_say_so(tmp_path: Path, no_figures: None) -> None:
    jobs = [fx.convergence_job("switch"), fx.throughput_job("switch")]
    html = build_report(fx.write_sweep(tmp_path, jobs, carded=False)).read_text()
    assert "Run card of convergence, throughput" in html
    assert html.index("<h3>convergence</h3>") < html.index("<h3>throughput</h3>")  # by name
    assert "Synthetic CPU" in html  # env.json, the older home of the machine


def test_task_order_and_texts_come_from_the_card() -> None:
    rows = fx.frame([fx.closed(fx.convergence_job("switch")), fx.closed(fx.memory_job("switch"))])
    cards = load.task_cards(rows)
    assert [c.task for c in cards] == ["memory", "convergence"]  # card.task_order 1, 3
    assert cards[1].ask == fx.TASK_CARDS["convergence"][1]
    assert [a.question for a in cards[1].answers] == [
        "most balanced after training",
        "best quality",
    ]


def test_expert_parallel_traffic_is_compared_per_unit_of_k() -> None:
    jobs = [
        fx.expert_parallel_job("switch", **{"variant.top_k": 1}),
        fx.expert_parallel_job("gshard", **{"variant.top_k": 2}),
    ]
    rows = fx.frame([fx.closed(j) for j in jobs])
    text = " ".join(sections.findings(rows, load.task_cards(rows)))
    assert "Least traffic:" in text and "per unit of K" in text
    assert "Best rank balance:" in text


def test_add_run_card_script(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = fx.frame([fx.closed(fx.convergence_job("switch"), carded=False)])
    path = tmp_path / "results.csv.gz"
    rows.to_csv(path, index=False)
    texts = tmp_path / "texts.json"
    texts.write_text(
        '{"tasks": {"convergence": {"order": 3, "ask": "How well?", "measure": "val loss",'
        ' "answers": [{"question": "best quality", "metric": "val_loss", "pass": null,'
        ' "unit": "bits/byte", "words": "bits per byte"}]}},'
        ' "variants": {"switch": "top-1 f·P"}}'
    )
    argv = [str(path), "--cpu", "EPYC", "--torch", "2.13.0", "--python", "3.11.7"]
    argv += ["--commit", "abc1234", "--date", "2026-01-02 03:04:05 UTC", "--texts", str(texts)]
    assert add_run_card.main(argv) == 0
    first = path.read_bytes()
    assert add_run_card.main(argv) == 0 and path.read_bytes() == first  # idempotent, stable
    table = pd.read_csv(path)
    end = table[table["metric"] == "job"].iloc[0]
    assert end["env.cpu"] == "EPYC" and end["env.commit"] == "abc1234"
    assert end["card.task_ask"] == "How well?" and end["card.variant_note"] == "top-1 f·P"
    assert table.loc[table["metric"] != "job", "env.cpu"].isna().all()  # closing rows only
    cards = load.task_cards(table.astype(object).where(table.notna(), None))
    assert cards[0].answers[0].unit == "bits/byte"
    bad = tmp_path / "bad.json"
    bad.write_text('{"tasks": {"convergence": {"question": "x"}}}')
    assert add_run_card.main([str(path), "--texts", str(bad)]) == 2
    assert "tasks.convergence has question" in capsys.readouterr().err


# --- figures equal their tables ---------------------------------------------------------------


def artist_values(fig) -> list[float]:
    """Every number the figure draws: line points, bar heights, image cells, marker places."""
    found: list[float] = []
    for ax in fig.axes:
        for line in ax.get_lines():
            if isinstance(line, Line2D):
                found += [float(v) for v in np.asarray(line.get_ydata(), float).ravel()]
                found += [float(v) for v in np.asarray(line.get_xdata(), float).ravel()]
        for patch in ax.patches:  # a bar's value is its length: along x for horizontal bars
            if isinstance(patch, Rectangle):
                level = patch.get_x() == 0 and patch.get_y() != 0
                found.append(float(patch.get_width() if level else patch.get_height()))
        for image in ax.get_images():
            if isinstance(image, AxesImage):
                found += [float(v) for v in np.asarray(image.get_array(), float).ravel()]
        for coll in ax.collections:
            if not isinstance(coll, PolyCollection):
                found += [float(v) for v in np.asarray(coll.get_offsets(), float).ravel()]
    return found


BAR_FIGURES = {"speed", "peak-memory", "efficiency", "ep-traffic"}


def shown_as(label: str) -> str:
    """A board column's panel name (the efficiency figure shows 1 / ratio as a share)."""
    if "ratio to dense" not in label:
        return label
    return label.replace("ratio to dense", "share of dense rate").replace("[×] ↓", "")


@pytest.mark.slow  # test_figures_tables.py holds every figure kind to its source by default
def test_every_figure_plots_its_tables_values() -> None:
    jobs = full_jobs()
    for seed in (0, 1, 2):  # a claim, for the forest plot
        jobs.append(fx.convergence_job("dense", seed))
        switch = fx.convergence_job("switch", seed)
        jobs.append([{**r, "variant.capacity_factor": 1.0} for r in switch])
    found = stages(fx.frame([fx.closed(j) for j in jobs]))
    drawn_keys = set()
    for spec in [*figures.FIGURES, *figures.claim_figures(found.claims)]:
        drawn = spec.draw(found.inputs)
        drawn_keys.add(spec.key)
        values = artist_values(drawn.figure)
        assert len(drawn.data), spec.key
        for y in drawn.data["y"].dropna():
            assert np.isclose(values, y, rtol=1e-9, atol=1e-12).any(), (spec.key, y)
        if spec.key in BAR_FIGURES:  # bars are the table's cells, one per arm, one task a panel
            for panel, part in drawn.data.groupby("panel"):
                task, label = panel.split(" · ", 1)
                assert task in found.boards, panel
                board = found.boards[task]
                label = next(k for k in board.specs if shown_as(k) == label)
                table = dict(zip(board.table[frames.ARM], board.table[label]))
                for arm, y in zip(part["series"], part["y"]):
                    want = table[arm].mean
                    want = 1 / want if "share" in panel else want
                    assert y == pytest.approx(want, rel=1e-12), (panel, arm)
        plt.close(drawn.figure)
    assert drawn_keys >= {spec.key for spec in figures.FIGURES}


# --- the house --------------------------------------------------------------------------------


@pytest.mark.slow  # a fresh process (test_layout checks the import graph by default)
def test_report_imports_no_torch_and_no_task_or_variant_code() -> None:
    code = (
        "import sys, moe_bench.report, moe_bench.report.claims, moe_bench.report.compare; "
        "bad = [m for m in ('torch', 'variants', 'moe_bench.tasks', 'moe_bench.components') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_report_names_no_task_and_no_variant() -> None:
    """No report code special-cases a name: tasks and variants are data of the rows. The claims
    registry is the one exception by design: the papers' claims name their variants."""
    names = {*variants.names(), *registry.names()}
    found = []
    for path in sorted((REPO / "moe_bench" / "report").rglob("*")):
        if path.suffix not in (".py", ".j2", ".css") or path.name == "registry.py":
            continue
        text = path.read_text()
        for name in names:
            for match in re.finditer(rf"[\"'`]{re.escape(name)}[\"'`]", text):
                found.append(f"{path.name}:{text[: match.start()].count(chr(10)) + 1}: {name}")
    assert found == []


def test_sweeper_expansion_matches_the_basic_sweeper() -> None:
    overrides = ["+claims=dense,switch_cf1", "seed=0,1,2", "task=convergence", "seed=3,4"]
    assert load.expand(overrides) == [
        [f"+claims={c}", f"seed={s}", "task=convergence"]
        for c in ("dense", "switch_cf1")
        for s in (3, 4)
    ]


def test_quality_against_the_timed_tasks_ratio_to_dense() -> None:
    """Loss from one task's table, ratio to dense from a timed task's, matched by variant where
    each has one arm in both: the points are the two tables' cells."""
    jobs = [fx.convergence_job(v, seed) for v in ("dense", "switch", "gshard") for seed in (0, 1)]
    jobs += [fx.throughput_job(v) for v in ("dense", "switch", "gshard")]
    found = stages(fx.frame([fx.closed(j) for j in jobs]))
    spec = next(s for s in figures.FIGURES if s.key == "quality-cost")
    drawn = spec.draw(found.inputs)
    matched = drawn.data[drawn.data["panel"].str.endswith("(matched by variant)")]
    assert set(matched["series"]) == {"dense", "switch", "gshard"}
    loss_board, timed = found.boards["convergence"], found.boards["throughput"]
    ratio = "ratio to dense fwd+bwd [×] ↓"
    for arm, x, y in zip(matched["series"], matched["x"], matched["y"]):
        want_x = timed.table.loc[timed.table["arm"] == arm, ratio].item().mean
        want_y = loss_board.table.loc[loss_board.table["arm"] == arm, "final val loss [nats] ↓"]
        assert x == pytest.approx(want_x) and y == pytest.approx(want_y.item().mean)
    plt.close(drawn.figure)
