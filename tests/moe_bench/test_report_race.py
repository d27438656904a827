"""The race in the report: a race job writes several variants' rows into one job folder (each
raced variant's rows carry its own columns, the dense reference's rows `reference` true), and
the report shows one arm per raced variant, with its own values, plus the reference as its own
arm ("dense (reference)"), never their mean."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from matplotlib import pyplot as plt

from moe_bench import results
from moe_bench.__main__ import execute
from moe_bench.report import build_report, figures, frames, leaderboards
from moe_bench.report.render import stages
from tests.moe_bench.test_race import RACE

from . import report_fixtures as fx

RACERS = {"switch": 3e5, "gshard": 2e5, "deepseek_moe": 1e5}  # fwd+bwd tokens/s
REFERENCE_SPEED = 5e5
REFERENCE = "dense (reference)"
FWD_BWD = "tokens/s fwd+bwd [tok/s] ↑"
RACE_CARD = {
    "card.task_order": 5,
    "card.task_ask": "Which layer is fastest, timed in the same rounds?",
    "card.task_measure": "Measure: tokens/s of each layer; the reference: shown, never ranked.",
    "card.task_answers": json.dumps(
        [fx.answer("fastest", "tokens_per_s", "forward + backward tokens/s", "fwd_bwd")]
    ),
}


def race_job(seed: int = 0, own: str = "switch", racers: dict[str, float] | None = None) -> list:
    """One race job's rows: each racer's timing rows with its own variant and sizes (the job's
    own variant first), then the dense reference's rows (`reference` true, no ratio)."""
    racers = RACERS if racers is None else racers
    raced = ",".join(name for name in racers if name != own)
    rows = []
    for n, (name, speed) in enumerate([*racers.items(), ("dense", REFERENCE_SPEED)]):
        reference = n == len(racers)
        common = fx.base(
            name, "race", seed, **{"task.variants": raced, "variant.num_experts": 8 * (n + 1)}
        )
        if reference:  # the dense FFN of the job's active FLOPs: no experts
            common["variant.num_experts"] = None
        speed *= 1 + 0.01 * seed
        flags = {"reference": reference, "noisy": False}
        for pass_, factor in (("fwd", 3.0), ("fwd_bwd", 1.0)):
            rate, at = speed * factor, {"pass": pass_, **flags}
            rows.append(fx.row(common, "tokens_per_s", rate, **at))
            rows.append(fx.row(common, f"{pass_}_ms", 512 / rate * 1e3, iqr_ms=0.01, **at))
            if not reference:
                ratio = REFERENCE_SPEED / speed
                rows.append(fx.row(common, "ratio_to_dense", ratio, ratio_ci95=0.01, **at))
    done = fx.closed(rows)
    done[-1] = {**done[-1], **RACE_CARD}
    return done


def test_a_race_job_is_one_arm_per_raced_variant(tmp_path: Path, no_figures: None) -> None:
    jobs = [race_job(seed) for seed in (0, 1)]
    frame = frames.with_arms(fx.frame(jobs))
    # one run per raced variant and one for the reference, in each job folder
    assert frame.groupby("job_dir")[frames.RUN].nunique().tolist() == [4, 4]
    board = leaderboards.leaderboard("race", frame)
    table = dict(zip(board.table[frames.ARM], board.table[FWD_BWD]))
    assert set(table) == {*RACERS, REFERENCE}
    for name, speed in {**RACERS, REFERENCE: REFERENCE_SPEED}.items():
        assert table[name].mean == pytest.approx(speed * 1.005) and table[name].n == 2, name
    assert list(board.shown["runs"]) == ["2"] * 4
    # fastest first: the reference, then the racers by their own speed
    assert list(board.table[frames.ARM]) == [REFERENCE, "switch", "gshard", "deepseek_moe"]
    ratio = dict(zip(board.table[frames.ARM], board.table["ratio to dense fwd+bwd [×] ↓"]))
    assert ratio[REFERENCE].missing and ratio["deepseek_moe"].mean == pytest.approx(
        (5 / 1 + 5 / 1.01) / 2
    )

    html = build_report(fx.write_sweep(tmp_path, jobs, ["task=race", "seed=0,1"])).read_text()
    shown = html[html.index('<section id="leaderboards">') : html.index('<section id="figures">')]
    legend = html[html.index('<div class="legend">') : html.index("<nav>")]
    ran = html[html.index('<section id="what-ran">') : html.index('<section id="run">')]
    for arm in [*RACERS, REFERENCE]:
        for part in (shown, legend, ran):
            assert f">{arm}<" in part or f"> {arm} <" in part or f">{arm} <" in part, arm
    for text in ("502,500 ± 3,536<", "301,500 ± 2,121", "201,000 ± 1,414", "100,500 ± 707"):
        assert text in shown, text  # the reference shown, never starred: the ranking is the arms'
    assert "301,500 ± 2,121 ★" in shown
    assert "Fastest" in html and "Fastest: dense" not in html

    # the speed figure: one bar per arm, at that arm's own value
    found = stages(fx.frame(jobs))
    spec = next(s for s in figures.FIGURES if s.key == "speed")
    drawn = spec.draw(found.inputs)
    bars = drawn.data[drawn.data["panel"].str.startswith("race · tokens/s fwd+bwd")]
    assert dict(zip(bars["series"], bars["y"])) == pytest.approx(
        {k: v * 1.005 for k, v in {**RACERS, REFERENCE: REFERENCE_SPEED}.items()}
    )
    plt.close(drawn.figure)


def test_a_dense_race_keeps_its_dense_arm_apart_from_the_reference() -> None:
    # variant=dense: the raced dense layer and the reference have the same columns but one
    racers = {"dense": 4e5, "switch": 2e5}
    rows = [
        {**r, "variant.num_experts": None} if r["variant"] == "dense" else r
        for r in race_job(own="dense", racers=racers)
    ]
    frame = frames.with_arms(fx.frame([rows]))
    board = leaderboards.leaderboard("race", frame)
    table = dict(zip(board.table[frames.ARM], board.table[FWD_BWD]))
    assert {k: v.mean for k, v in table.items()} == {
        REFERENCE: REFERENCE_SPEED,
        "dense": 4e5,
        "switch": 2e5,
    }
    # the job's closing row is its own variant's (dense), never the reference's
    job_row = frame[frame["metric"] == "job"]
    assert list(job_row[frames.ARM]) == ["dense"]


def test_ordinary_jobs_keep_one_run_per_job_folder() -> None:
    jobs = [fx.throughput_job(v, seed) for v in ("dense", "switch") for seed in (0, 1)]
    frame = frames.with_arms(fx.frame([fx.closed(j) for j in jobs]))
    assert (frame[frames.RUN] == frame["job_dir"]).all()
    assert list(frames.job_arms(frame).index) == ["0", "1", "2", "3"]


def test_a_real_race_job_builds_a_report(compose_cfg, tmp_path: Path, no_figures: None) -> None:
    cfg = compose_cfg(*RACE, "variant=switch", "task.variants=[gshard]")
    assert execute(cfg, tmp_path / "0", "race") == "ok"
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - task=race\n    - variant=switch\n"
    )
    rows = results.load(tmp_path)
    html = build_report(tmp_path).read_text()
    board = leaderboards.leaderboard("race", frames.with_arms(rows[rows["status"] == "ok"]))
    table = dict(zip(board.table[frames.ARM], board.table[FWD_BWD]))
    assert set(table) == {"switch", "gshard", REFERENCE}
    timed = rows[(rows["metric"] == "tokens_per_s") & (rows["pass"] == "fwd_bwd")]
    speeds = timed.assign(arm=timed["variant"].where(~timed["reference"].astype(bool), REFERENCE))
    for arm, speed in speeds.groupby("arm")["value"].first().items():
        assert table[arm].mean == pytest.approx(speed), arm
    shown = html[html.index('<section id="leaderboards">') : html.index('<section id="figures">')]
    for arm in table:
        assert f">{arm}<" in shown, arm
    assert isinstance(rows, pd.DataFrame)
