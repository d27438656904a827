"""Paper claims (moe_bench/report/claims/): the verdict rule on planted seeds, combined checks,
the steps-to-dense-loss measure, the report's Claims section, and the claims presets."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import variants
from moe_bench.config import resolve
from moe_bench.report import build_report, claims, load
from moe_bench.report.claims.__main__ import main as claims_main
from tests.slow_cases import some_slow

from . import report_fixtures as fx
from .conftest import SWEEPS

STEPS = (0, 10, 20)


def job(variant: str, seed: int, loss: float, vio: float = 0.5, **config) -> list[dict]:
    """A finished convergence job: val_loss falling linearly from 5.0 to `loss` over STEPS,
    MaxVio_global `vio` at the end, and `config` as dotted columns."""
    common = fx.base(variant, "convergence", seed, **config)
    rows = []
    for step in STEPS:
        value = 5.0 + (loss - 5.0) * step / STEPS[-1]
        rows.append(fx.row(common, "val_loss", value, step=step))
    if variant != "dense":
        rows.append(fx.row(common, "max_vio_global", vio, step=STEPS[-1], layer="mean"))
    return rows


def frame(*jobs: list[dict]):
    return fx.frame([fx.closed(rows) for rows in jobs])


SWITCH = {"variant.capacity_factor": 1.0}


def test_reproduced_contradicted_inconclusive_and_one_seed() -> None:
    lower = claims.paired_verdict([3.0, 3.1, 2.9], [3.5, 3.55, 3.45], "min")
    assert lower.verdict == claims.REPRODUCED and lower.n == 3
    assert lower.mean == pytest.approx(0.5)
    assert claims.paired_verdict([3.6, 3.7, 3.5], [3.0, 3.1, 2.9], "min").verdict == (
        claims.CONTRADICTED
    )
    # differences of both signs: the t interval of mean d holds 0
    noisy = claims.paired_verdict([3.0, 3.4, 3.1], [3.2, 3.1, 3.15], "min")
    assert noisy.verdict == claims.INCONCLUSIVE
    assert claims.paired_verdict([3.0], [3.5], "min").verdict == claims.NO_VERDICT
    # a seed missing on one side is not paired
    assert claims.paired_verdict([3.0, float("nan")], [3.5, 3.6], "min").verdict == (
        claims.NO_VERDICT
    )
    # higher is better: the direction flips the sign of d
    assert claims.paired_verdict([0.3, 0.31], [0.1, 0.12], "max").verdict == claims.REPRODUCED


def test_zero_standard_error() -> None:
    """Identical values on both sides: d = 0, SE = 0, inconclusive (not reproduced)."""
    assert claims.paired_verdict([3.0, 3.0], [3.0, 3.0], "min").verdict == claims.INCONCLUSIVE
    assert claims.paired_verdict([3.0, 3.0], [3.5, 3.5], "min").verdict == claims.REPRODUCED


def test_claim_1_from_rows_with_steps_to_dense_loss() -> None:
    rows = [job("dense", s, 4.0) for s in range(3)]
    rows += [job("switch", s, 3.5 + 0.01 * s, **SWITCH) for s in range(3)]
    (result,) = claims.evaluate(frame(*rows))
    assert result.claim.id == "1a"
    assert result.verdict == claims.REPRODUCED
    # switch's curve 5.0 -> 3.5 is at 4.25 at step 10: reaches dense's 4.0 at step 20
    assert result.steps == [20, 20, 20] and result.control_steps == 20
    assert "not reached" not in claims.steps_text(result)


def test_steps_to_loss() -> None:
    rows = fx.frame([job("switch", 0, 3.0)])
    assert claims.steps_to_loss(rows, 4.0) == 10  # val_loss 5.0, 4.0, 3.0 at steps 0, 10, 20
    assert claims.steps_to_loss(rows, 5.0) == 0
    assert claims.steps_to_loss(rows, 2.9) is None


def test_moe_that_never_reaches_dense_is_contradicted_and_says_so() -> None:
    rows = [job("dense", s, 3.5) for s in range(2)]
    rows += [job("switch", s, 3.9 + 0.01 * s, **SWITCH) for s in range(2)]
    (result,) = claims.evaluate(frame(*rows))
    assert result.verdict == claims.CONTRADICTED
    assert result.steps == [None, None]
    assert "not reached" in claims.steps_text(result)


def v3(seed: int, loss: float, vio: float, rate: float) -> list[dict]:
    cfg = {"variant.bias_update_rate": rate, "variant.alpha": 1e-4}
    return job("deepseek_v3", seed, loss, vio, **cfg)


@pytest.mark.parametrize(
    ("loss_on", "verdict"),
    [
        ([3.5, 3.52, 3.49], claims.REPRODUCED),  # loss within noise: not worse
        ([3.45, 3.46, 3.44], claims.REPRODUCED),  # loss better too
        ([3.9, 3.92, 3.91], claims.CONTRADICTED),  # balanced, but loss worse beyond noise
    ],
)
def test_claim_3_combines_maxvio_with_loss_not_worse(loss_on: list[float], verdict: str) -> None:
    loss_off = [3.5, 3.49, 3.52]
    rows = [v3(s, loss_on[s], 0.1, 1e-3) for s in range(3)]
    rows += [v3(s, loss_off[s], 0.8 + 0.01 * s, 0.0) for s in range(3)]
    (result,) = claims.evaluate(frame(*rows))
    assert result.claim.id == "3"
    assert result.checks[0].verdict == claims.REPRODUCED  # MaxVio_global lower
    assert result.verdict == verdict


def test_claim_3_needs_maxvio_to_win() -> None:
    rows = [v3(s, 3.5, 0.5 + 0.01 * s, 1e-3) for s in range(3)]
    rows += [v3(s, 3.5, 0.5 - 0.01 * s, 0.0) for s in range(3)]
    (result,) = claims.evaluate(frame(*rows))
    assert result.verdict == claims.INCONCLUSIVE


def test_same_variant_claims_pair_only_jobs_that_differ_in_the_compared_field() -> None:
    """The loss_free preset sweeps alpha too: one result per alpha, never mixed."""
    rows = []
    for alpha in (1e-4, 0.0):
        for s in range(2):
            cfg = {"variant.alpha": alpha}
            rows.append(
                job("deepseek_v3", s, 3.5, 0.1, **cfg, **{"variant.bias_update_rate": 1e-3})
            )
            rows.append(job("deepseek_v3", s, 3.5, 0.9, **cfg, **{"variant.bias_update_rate": 0.0}))
    results = claims.evaluate(frame(*rows))
    assert [r.claim.id for r in results] == ["3", "3"]
    assert all("variant.alpha=" in r.setting for r in results)


def test_only_covered_claims_render(tmp_path: Path, no_figures: None) -> None:
    jobs = [job("dense", s, 4.0) for s in range(2)] + [
        job("switch", s, 3.5, **SWITCH) for s in range(2)
    ]
    html = build_report(fx.write_sweep(tmp_path / "c", jobs)).read_text()
    assert 'id="claims"' in html
    assert "Switch (top-1) beats dense" in html
    assert "Loss-free bias balancing" not in html and "Expert choice converges" not in html
    assert "t(0.975, n - 1) · sd(d) / sqrt(n)" in html  # the rule, under the table
    assert "What the papers do that we do not" in html


def test_unrelated_sweep_has_no_claims_section(tmp_path: Path, no_figures: None) -> None:
    jobs = [fx.throughput_job(v) for v in ("dense", "switch")]
    html = build_report(fx.write_sweep(tmp_path / "t", jobs)).read_text()
    assert 'id="claims"' not in html and 'href="#claims"' not in html


def expand(cfg) -> list[list[str]]:
    params = cfg.hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return BasicSweeper.split_arguments(parsed, None)[0]


SELECTION_SCOPE = "selection_scope" in variants.make_config("expert_choice").__dataclass_fields__


CLAIMS_PRESETS = {"claims": 39, "claims_gpu": 39, "claims_training": 15}


def claim_options(batches: list[list[str]]) -> list[str]:
    """The claims files a preset's jobs name (`+claims=<name>`), sorted."""
    return sorted({o.split("=", 1)[1] for b in batches for o in b if o.startswith("+claims=")})


def check_claim_option(compose_cfg, preset: str, name: str) -> None:
    assert (SWEEPS / "claims" / f"{name}.yaml").is_file()
    if name == "expert_choice_position" and not SELECTION_SCOPE:
        return  # variant.selection_scope arrives with expert_choice's position scope
    run = resolve(compose_cfg(f"+experiment={preset}", f"+claims={name}", "device=cpu"))
    assert run.task.name == "convergence"


# the claims preset in the default run; the GPU and training presets (the same expansion) in the
# slow run, which also resolves every claims option of each
@pytest.mark.parametrize(
    ("preset", "jobs"),
    some_slow(CLAIMS_PRESETS.items(), [c for c in CLAIMS_PRESETS.items() if c[0] != "claims"]),
)
def test_claims_presets_expand_to_their_jobs(compose_cfg, preset: str, jobs: int) -> None:
    """The jobs' count, the report's own expansion, every claims file there; one claims option
    resolved (the slow run resolves every one: a compose each)."""
    cfg = compose_cfg(f"+experiment={preset}", hydra=True)
    batches = expand(cfg)
    assert len(batches) == jobs
    given = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    assert load.expand(given) == batches  # the report's own expansion counts the same jobs
    names = claim_options(batches)
    assert all((SWEEPS / "claims" / f"{name}.yaml").is_file() for name in names), names
    check_claim_option(compose_cfg, preset, names[0])


@pytest.mark.slow  # a compose per claims option, seconds in all: the slow run
@pytest.mark.parametrize("preset", CLAIMS_PRESETS)
def test_every_claims_option_of_a_preset_resolves(compose_cfg, preset: str) -> None:
    names = claim_options(expand(compose_cfg(f"+experiment={preset}", hydra=True)))
    for name in names:
        check_claim_option(compose_cfg, preset, name)


def test_training_claims_pair_by_seed_and_never_across_claims() -> None:
    """Claims 7 and 9 pair mixtral topk with default_moe and with sparsemixer from scratch;
    claim 8 the upcycled mixtral with the dense run continued from the same parent; an upcycled
    mixtral is never claim 7's or 9's control."""
    parent = {"task.init_from": "multirun/claims_training_parent/0", "task.steps": 200}
    rows = []
    for s in range(3):
        rows.append(job("mixtral", s, 3.40 + 0.01 * s, **{"variant.router_grad": "default_moe"}))
        rows.append(job("mixtral", s, 3.50 + 0.01 * s, **{"variant.router_grad": "topk"}))
        rows.append(job("mixtral", s, 3.60 + 0.01 * s, **{"variant.router_grad": "sparsemixer"}))
        rows.append(job("mixtral", s, 3.00 + 0.01 * s, **{"variant.router_grad": "topk"}, **parent))
        rows.append(job("dense", s, 3.20 + 0.01 * s, **parent))
    results = {r.claim.id: r for r in claims.evaluate(frame(*rows))}
    assert sorted(results) == ["7", "8", "9"]
    for r in (results["7"], results["8"]):
        assert r.verdict == claims.REPRODUCED and r.checks[0].n == 3
    assert results["9"].verdict == claims.CONTRADICTED  # sparsemixer's loss above top-K's
    assert results["9"].numbers[0][2] == pytest.approx([3.50, 3.51, 3.52])  # not the upcycled
    _, upcycled, dense = results["8"].numbers[0]
    assert upcycled == pytest.approx([3.00, 3.01, 3.02]) and dense == pytest.approx(
        [3.2, 3.21, 3.22]
    )
    assert results["7"].numbers[0][2] == pytest.approx([3.50, 3.51, 3.52])  # not the upcycled


def test_hash_claim_is_judged_not_worse_against_dropless_switch_only() -> None:
    """Claim 10 compares hash with switch without capacity, never switch at cf 1.0; a hash
    loss within the noise of switch's (a tie) reproduces a "not worse" claim, one beyond it
    contradicts."""
    rows = []
    for s in range(3):
        rows.append(job("hash", s, 3.30 + (0.02, -0.01, 0.0)[s]))
        rows.append(job("switch", s, 3.30 + 0.001 * s, **{"variant.capacity_factor": None}))
        rows.append(job("switch", s, 2.00, **SWITCH))  # far better, but not claim 10's control
    (tie,) = [r for r in claims.evaluate(frame(*rows)) if r.claim.id == "10"]
    assert tie.verdict == claims.REPRODUCED and tie.checks[0].n == 3
    assert tie.numbers[0][2] == pytest.approx([3.30, 3.301, 3.302])
    worse = [job("hash", s, 3.60 + 0.01 * s) for s in range(3)] + [
        job("switch", s, 3.30 + 0.01 * s, **{"variant.capacity_factor": None}) for s in range(3)
    ]
    (lost,) = [r for r in claims.evaluate(frame(*worse)) if r.claim.id == "10"]
    assert lost.verdict == claims.CONTRADICTED


def test_jobs_from_before_a_field_existed_pair_with_jobs_at_its_default() -> None:
    """Rows written before `task.fused_optimizer` existed (no column) are the same setting as
    later rows at its added default (False), not at another value; 0 and 0.0 are one value."""
    later = {"task.fused_optimizer": False, "task.trace_every": 0.0}
    rows = [job("hash", s, 3.30 - 0.01 * s, **later) for s in range(3)]
    rows += [job("switch", s, 3.40, **{"variant.capacity_factor": None, "task.trace_every": 0})
             for s in range(3)]  # fmt: skip
    (paired,) = [r for r in claims.evaluate(frame(*rows)) if r.claim.id == "10"]
    assert paired.checks[0].n == 3
    fused = [job("hash", s, 3.30, **{"task.fused_optimizer": True}) for s in range(3)]
    fused += [job("switch", s, 3.40, **{"variant.capacity_factor": None}) for s in range(3)]
    assert not [r for r in claims.evaluate(frame(*fused)) if r.claim.id == "10"]


def test_upcycling_options_start_from_the_parent_presets_folder(compose_cfg) -> None:
    """The parent preset saves its model where claim 8's options read it."""
    parent = compose_cfg("+experiment=claims_training_parent", hydra=True)
    assert parent.task.save and parent.variant.name == "dense"
    folder = f"{parent.hydra.sweep.dir}/0"  # its one job (seed 100)
    assert str(parent.hydra.sweeper.params.seed) == "100"
    for option in ("dense_continued", "mixtral_upcycled"):
        cfg = compose_cfg("+experiment=claims_training", f"+claims={option}")
        assert cfg.task.init_from == folder and cfg.task.steps == 200
        assert all(cfg.model[k] == parent.model[k] for k in parent.model)


def test_every_claims_job_option_is_a_claim_side() -> None:
    """Each option of sweeps/claims/ sets a variant some claim compares."""
    sides = {side.variant for c in claims.CLAIMS for side in (c.treatment, c.control)}
    for path in (SWEEPS / "claims").glob("*.yaml"):
        (override,) = OmegaConf.load(path).defaults
        assert override["override /variant"] in sides


def test_markdown_table_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`python -m moe_bench.report.claims SWEEP` prints the covered claims (for the README) and the
    rule; a sweep that covers none says so."""
    rows = [job("dense", s, 4.0) for s in range(3)]
    rows += [job("switch", s, 3.5 + 0.01 * s, **SWITCH) for s in range(3)]
    text = claims.markdown(frame(*rows))
    assert text.count("\n| 1a.") == 1 and "**reproduced**" in text and "Rule: For each seed" in text
    assert claims.markdown(frame(*rows[:3])) == ""
    sweep = fx.write_sweep(tmp_path / "s", [fx.convergence_job("switch")])
    assert claims_main([str(sweep)]) == 0
    assert "no claim" in capsys.readouterr().out
    assert claims_main([str(tmp_path / "absent")]) == 2


def test_gaps_state_the_measured_drop_fraction() -> None:
    """The "what the papers do" list carries the drop rate this sweep measured, per setting."""
    rows = []
    for seed, drop in enumerate((0.1, 0.3)):
        rows.append(job("switch", seed, 3.5, **SWITCH))
        rows[-1].append(fx.row(rows[-1][0], "drop_fraction", drop, step=0, layer="mean"))
    lines = claims.claim_gaps(frame(*rows))
    assert any(
        line.startswith("Measured: switch at capacity factor 1 dropped 20.0%") and "2 seeds" in line
        for line in lines
    ), lines


def test_a_killed_job_is_not_a_claims_job() -> None:
    """Rows without the closing `job` row (a killed job) are not read as a finished job's."""
    done = fx.closed([fx.row(fx.base("dense", "convergence", 0), "val_loss", 2.0, step=10)])
    killed = [fx.row(fx.base("switch", "convergence", 0), "val_loss", 9.0, step=5)]
    table = claims.jobs_table(fx.frame([done, killed]))
    assert list(table["variant"]) == ["dense"]
