"""The ladder report (moe_bench/report/ladder/) on planted rows: d per budget with its interval,
the crossover between budgets, "no crossover", dense's flattening, the figure read from the
table, the cause verdicts and the learning-rate grid's pick; and the ladder presets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_bench.report import ladder
from moe_bench.report.ladder import causes as C
from moe_bench.report.ladder.__main__ import main as ladder_main
from moe_bench.report.ladder.figure import draw
from moe_bench.report.ladder.page import page
from moe_bench.report.ladder.registry import side
from tests.slow_cases import some_slow

from . import report_fixtures as fx
from .conftest import SWEEPS

SWITCH_DL = {"variant.capacity_factor": None}
SWITCH_CF = {"variant.capacity_factor": 1.25}
NOISE = (0.01, -0.01, 0.005, -0.005, 0.0)  # per seed, on the MoE: sd(d) ~ 0.008


def job(variant: str, seed: int, loss: float, steps: int = 250, **config) -> list[dict]:
    """A finished convergence job of `steps` x 16 x 128 tokens whose final val_loss is `loss`."""
    common = fx.base(
        variant, "convergence", seed, **{"task.steps": steps, "task.batch_size": 16,
                                         "task.seq_len": 128, **config}
    )  # fmt: skip
    rows = [fx.row(common, "val_loss", 5.0, step=0), fx.row(common, "val_loss", loss, step=steps)]
    return fx.closed(rows)


def ladder_frame(d_by_steps: dict[int, float], seeds: int = 5, arm: dict = SWITCH_DL):
    """Dense at 2.0 - 0.1 per budget; switch at dense - d (d > 0: switch better) + noise."""
    jobs = []
    for i, (steps, d) in enumerate(d_by_steps.items()):
        for seed in range(seeds):
            dense = 2.0 - 0.1 * i
            jobs.append(job("dense", seed, dense, steps))
            jobs.append(job("switch", seed, dense - d + NOISE[seed], steps, **arm))
    return fx.frame(jobs)


def test_d_per_budget_with_interval_and_a_crossover_between_budgets() -> None:
    rows = ladder.ladder_rows(ladder.jobs(ladder_frame({250: -0.1, 1000: 0.1, 4000: 0.2})))
    assert list(rows["tokens"]) == [512_000, 2_048_000, 8_192_000]
    assert list(rows["d"]) == pytest.approx([-0.1, 0.1, 0.2])
    assert list(rows["verdict"]) == ["dense better", "MoE better", "MoE better"]
    assert (rows["low"] < rows["d"]).all() and (rows["d"] < rows["high"]).all()
    cross = ladder.crossover(rows, "switch dropless")
    # d crosses 0 halfway between 512k and 2.05M in log tokens: their geometric mean
    assert cross.estimate == pytest.approx(math.sqrt(512_000 * 2_048_000))
    assert 512_000 < cross.earliest <= cross.estimate <= cross.latest < 2_048_000
    assert "crossover at ~1.0M tokens" in cross.text


def test_no_crossover_up_to_the_largest_budget() -> None:
    rows = ladder.ladder_rows(ladder.jobs(ladder_frame({250: -0.3, 1000: -0.2, 4000: -0.1})))
    cross = ladder.crossover(rows, "switch dropless")
    assert cross.estimate is None
    assert cross.text == (
        "switch dropless: no crossover up to 8.2M tokens (dense better beyond the noise there)"
    )
    tie = ladder.ladder_rows(ladder.jobs(ladder_frame({250: -0.3, 1000: -0.005})))
    assert ladder.crossover(tie, "switch dropless").text.startswith(
        "switch dropless: no crossover up to 2.0M tokens (tie; the intervals allow one from ~"
    )
    ahead = ladder.ladder_rows(ladder.jobs(ladder_frame({250: 0.005, 1000: 0.1})))
    assert ladder.crossover(ahead, "switch dropless").text == (
        "switch dropless: mean d > 0 already at the smallest budget, 512k tokens (tie there): "
        "no crossover within the ladder"
    )


def test_a_tie_at_the_top_is_not_a_crossover_and_one_seed_gives_none() -> None:
    rows = ladder.ladder_rows(ladder.jobs(ladder_frame({250: -0.2, 1000: 0.0})))
    assert list(rows["verdict"]) == ["dense better", "tie"]
    assert ladder.crossover(rows, "switch dropless").estimate is None
    one = ladder.ladder_rows(ladder.jobs(ladder_frame({250: 0.1}, seeds=1)))
    assert one["n"].tolist() == [1] and math.isnan(one["low"].iloc[0])
    assert "no budget with 2+ paired seeds" in ladder.crossover(one, "switch dropless").text


def test_arms_are_kept_apart_and_dense_flattens() -> None:
    frame = fx.frame(
        [
            *(job("dense", s, 2.0) for s in range(3)),
            *(job("switch", s, 1.9 + NOISE[s], **SWITCH_CF) for s in range(3)),
            *(job("switch", s, 2.3 + NOISE[s], **SWITCH_DL) for s in range(3)),
            *(job("dense", s, 1.8, 1000) for s in range(3)),
            *(job("dense", s, 1.75, 4000) for s in range(3)),
        ]
    )
    table = ladder.jobs(frame)
    rows = ladder.ladder_rows(table).set_index("arm")
    assert rows.loc["switch cf 1.25", "d"] == pytest.approx(0.1 - 0.005 / 3)
    assert rows.loc["switch dropless", "d"] == pytest.approx(-0.3 - 0.005 / 3)
    flat = ladder.dense_flattening(table)
    assert flat["gain_per_doubling"].tolist()[1:] == pytest.approx([0.1, 0.025])


def test_the_figure_plots_the_table_it_is_drawn_from() -> None:
    rows = ladder.ladder_rows(ladder.jobs(ladder_frame({250: -0.1, 1000: 0.05, 4000: 0.2})))
    plotted = draw(rows).data
    for _, r in rows.iterrows():
        at = plotted[plotted["x"] == r["tokens"]].set_index("series")["y"]
        assert at[r["arm"]] == pytest.approx(r["d"])
        assert at[f"{r['arm']} · 95% low"] == pytest.approx(r["low"])
        assert at[f"{r['arm']} · 95% high"] == pytest.approx(r["high"])


def causes_frame(shift: float):
    """ladder_causes' jobs: dense 2.0; switch cf 1.25 at 2.2, with z-loss at 2.2 - shift (so
    the gap shrinks by `shift`); the half-batch cause moves dense and switch alike."""
    jobs = []
    for s in range(5):
        jobs += [
            job("dense", s, 2.0),
            job("switch", s, 2.2 + NOISE[s], **SWITCH_CF),
            job("switch", s, 2.2 - shift, **SWITCH_CF, **{"variant.z_loss_coef": 0.001}),
            job("dense", s, 1.9 + NOISE[s], 500, **{"task.batch_size": 8}),
            job("switch", s, 2.1, 500, **SWITCH_CF, **{"task.batch_size": 8}),
        ]
    return fx.frame(jobs)


def test_cause_verdicts_towards_moe_and_within_the_noise() -> None:
    table = ladder.jobs(causes_frame(0.1))
    found = {s.cause.id: s for s in C.shifts(table)}
    z = found["z-loss · switch cf 1.25"]
    assert z.paired.mean == pytest.approx(0.1) and z.verdict == "moves the gap towards MoE"
    half = found["tokens per step · switch cf 1.25"]
    assert abs(half.paired.mean) < 0.01 and half.verdict == "within the noise"
    assert "init · switch cf 1.25" not in found  # not run: left out, not invented
    away = {s.cause.id: s for s in C.shifts(ladder.jobs(causes_frame(-0.1)))}
    assert away["z-loss · switch cf 1.25"].verdict == "moves the gap towards dense"


def test_grid_pick_per_arm_and_the_schedule_cause() -> None:
    jobs = []
    best = {"dense": (1e-3, 25), "switch": (2e-3, 5)}
    for s in range(3):
        for lr in (5e-4, 1e-3, 2e-3):
            for warmup in (5, 25):
                for variant, extra in (("dense", {}), ("switch", SWITCH_CF)):
                    on_pick = (lr, warmup) == best[variant]
                    loss = (2.0 if variant == "dense" else 2.2) - (0.15 if on_pick else 0.0)
                    cfg = {"task.lr": lr, "task.warmup_steps": warmup, **extra}
                    jobs.append(job(variant, s, loss + NOISE[s] * (variant == "switch"), **cfg))
    table = ladder.jobs(fx.frame(jobs))
    assert C.pick(C.grid(table, C.DENSE)) == (1e-3, 25)
    assert C.pick(C.grid(table, side("switch", 1.25))) == (2e-3, 5)
    ((name, mine, dense_pick, shift),) = C.tuned_shifts(table)
    assert (name, mine, dense_pick) == ("switch cf 1.25", (2e-3, 5), (1e-3, 25))
    assert shift.paired.mean == pytest.approx(0.15)
    text, _ = page(fx.frame(jobs[:2]), grid=fx.frame(jobs))
    # switch's pick is the largest lr of the grid, dense's its middle one
    assert "switch cf 1.25: pick lr 0.002, warm-up 5 (the grid's edge" in text
    assert "dense: pick lr 0.001, warm-up 25\n" in text


def test_cli_writes_the_page_and_the_figure(tmp_path: Path, capsys) -> None:
    frame = ladder_frame({250: -0.1, 1000: 0.1})
    saved = tmp_path / "rows.csv.gz"
    frame.drop(columns="job_dir").assign(job_dir=frame["job_dir"]).to_csv(saved, index=False)
    assert ladder_main([str(tmp_path / "out"), "--ladder", str(saved)]) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| switch dropless | 512k | 5 |" in text and "crossover at ~1.0M tokens" in text
    assert (tmp_path / "out" / "ladder.svg").read_text().startswith("<svg")
    assert ladder_main([str(tmp_path / "o2"), "--ladder", str(tmp_path / "nothing")]) == 2


LADDER_PRESETS = {
    "ladder": 20, "ladder_0p5m": 20, "ladder_2m": 20, "ladder_8m": 4, "ladder_causes": 55,
    "ladder_grid": 54,
}  # fmt: skip
# the rungs' own presets (ladder's settings at one budget each) in the slow run
RUNGS = ("ladder_0p5m", "ladder_2m", "ladder_8m")


@pytest.mark.parametrize(
    ("preset", "jobs"),
    some_slow(LADDER_PRESETS.items(), [c for c in LADDER_PRESETS.items() if c[0] in RUNGS]),
)
def test_ladder_presets_compose_every_job(compose_cfg, preset: str, jobs: int) -> None:
    cfg = compose_cfg(f"+experiment={preset}", hydra=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    count = 1
    for values in params.values():
        count *= len(str(values).split(","))
    assert count == jobs
    assert cfg.model.d_model == 64 and cfg.task.fused_optimizer
    for arm in str(params["ladder_arm"]).split(","):
        assert (SWEEPS / "ladder_arm" / f"{arm}.yaml").is_file()


def test_a_killed_job_is_not_read_as_final() -> None:
    """A job without its closing `job` row (killed mid-run) is left out: its last val_loss is
    not a final one."""
    killed = job("switch", 3, 9.0, **SWITCH_DL)[:-1]
    table = ladder.jobs(fx.frame([*(job("dense", s, 2.0) for s in range(4)), killed]))
    assert set(table["variant"]) == {"dense"} and len(table) == 4
