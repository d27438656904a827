"""The benchmark gate on synthetic pytest-benchmark JSON: ratios within one run decide.

The key check: a planted 2x slowdown of `grouped` (its times doubled in the JSON, the code
untouched) must fail the gate, while the same run without it passes. Time rules read the
interleaved entries (`test_gated_ratio`), built here from the same per-case seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_bench.bench import benchgate
from moe_bench.bench.benchgate import RULES, Rule, failures, load_run, main, ratio
from moe_bench.bench.cases import CASES

# A healthy run, in seconds (min of rounds) and peak bytes: every rule holds with a margin.
HEALTHY_S = {
    ("fine", "dense", "dense"): 0.100,
    ("fine", "deepseek_moe", "grouped"): 0.130,
    ("fine", "deepseek_moe", "loop"): 0.250,
    ("fine", "deepseek_moe", "hf_style"): 2.000,
    ("fine", "hf_deepseek_v2", "grouped_mm"): 0.260,
    ("coarse", "dense", "dense"): 0.200,
    ("coarse", "mixtral", "grouped"): 0.220,
    ("quick", "dense", "dense"): 0.010,
    ("quick", "deepseek_moe", "grouped"): 0.016,
    ("quick", "deepseek_moe", "hf_style"): 0.100,
    ("quick", "hf_deepseek_v2", "grouped_mm"): 0.040,
}
HEALTHY_BYTES = {
    ("fine", "dense", "dense"): 100e6,
    ("fine", "deepseek_moe", "grouped"): 120e6,
    ("coarse", "dense", "dense"): 150e6,
    ("coarse", "mixtral", "grouped"): 170e6,
    ("quick", "dense", "dense"): 16e6,
    ("quick", "deepseek_moe", "grouped"): 16e6,
}


def interleaved_entry(rule: Rule, fastest: float, median: float) -> dict:
    """A `test_gated_ratio` entry of a `--benchmark-json` file (the fields the gate reads)."""
    return {
        "group": "gated ratios",
        "name": f"test_gated_ratio[{rule.name}]",
        "params": {"rule": rule.name},
        "stats": {"min": 1.0, "median": 1.0, "mean": 1.0},
        "extra_info": {
            "fastest_ratio": fastest,
            "interleaved_ratio": median,
            "ratio_ci_halfwidth": 0.01,
            "rounds": 7,
        },
    }


def fake_bench_json(
    seconds: dict,
    peak_bytes: dict,
    noise: float = 1.0,
    interleaved: dict | None = None,
    lucky: float = 1.0,
) -> dict:
    """The fields of a `--benchmark-json` file the gate reads (median = min * noise). Each time
    rule's interleaved median ratio is its cases' seconds ratio unless `interleaved` (rule
    name -> ratio) says otherwise, and its fastest-rounds ratio that times `lucky`; a rule
    whose case is missing has none."""
    benchmarks = []
    for rule in RULES:
        num, den = (
            seconds.get((rule.size, *rule.numerator)),
            seconds.get((rule.size, *rule.denominator)),
        )
        if rule.metric != "time" or num is None or den is None:
            continue
        value = (interleaved or {}).get(rule.name, num / den)
        benchmarks.append(interleaved_entry(rule, value * lucky, value))
    for (size, variant, backend), s in seconds.items():
        extra = {}
        if (size, variant, backend) in peak_bytes:
            extra["peak_memory_bytes"] = peak_bytes[(size, variant, backend)]
        benchmarks.append(
            {
                "group": size,
                "name": f"test_fwd_bwd[{size}-{variant}-{backend}]",
                "params": {"size": size, "variant": variant, "backend": backend},
                "stats": {"min": s, "median": s * noise, "mean": s * noise},
                "extra_info": extra,
            }
        )
    machine = {"node": "ci", "cpu": {"brand_raw": "Fake CPU", "count": 2}}
    return {"machine_info": machine, "benchmarks": benchmarks}


def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def slowed(seconds: dict, backend: str, factor: float) -> dict:
    return {k: v * factor if k[2] == backend else v for k, v in seconds.items()}


def test_healthy_run_passes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, "run.json", fake_bench_json(HEALTHY_S, HEALTHY_BYTES))
    assert failures(load_run(path)) == []
    assert main([str(path), "--baseline", str(tmp_path / "none.json")]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count(" ok") == len(RULES)


def test_planted_2x_slowdown_of_grouped_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = write(tmp_path, "base.json", fake_bench_json(HEALTHY_S, HEALTHY_BYTES))
    run = write(
        tmp_path, "run.json", fake_bench_json(slowed(HEALTHY_S, "grouped", 2.0), HEALTHY_BYTES)
    )
    assert main([str(run), "--baseline", str(base)]) == 1
    failed = failures(load_run(run))
    # both grouped-vs-dense time rules catch it, memory rules do not move
    assert any(f.startswith("fine time: deepseek_moe/grouped vs dense/dense") for f in failed)
    assert any(f.startswith("coarse time: mixtral/grouped vs dense/dense") for f in failed)
    assert not any(" memory: " in f for f in failed)
    out = capsys.readouterr()
    assert "+100%" in out.out  # the comparison with the baseline shows the doubling
    assert "FAIL" in out.err


def test_equal_slowdown_of_everything_passes(tmp_path: Path) -> None:
    """A slower machine slows every case alike; ratios, hence the gate, do not move."""
    everything = {k: v * 3.0 for k, v in HEALTHY_S.items()}
    path = write(tmp_path, "run.json", fake_bench_json(everything, HEALTHY_BYTES))
    assert failures(load_run(path)) == []


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
@pytest.mark.parametrize(("side", "should_hold"), [(0.99, True), (1.01, False)])
def test_each_rule_flips_at_its_limit(
    tmp_path: Path, rule: Rule, side: float, should_hold: bool
) -> None:
    """Set the rule's ratio to just inside / just outside its limit by moving the side no other
    rule of its metric reads; only that rule moves."""
    seconds, peaks = dict(HEALTHY_S), dict(HEALTHY_BYTES)
    table = seconds if rule.metric == "time" else peaks
    num_key, den_key = (rule.size, *rule.numerator), (rule.size, *rule.denominator)
    inside = side if rule.op == "<=" else 2 - side  # ">=": 1.01 is inside, 0.99 outside
    readers = [
        {(r.size, *r.numerator), (r.size, *r.denominator)} for r in RULES if r.metric == rule.metric
    ]
    if sum(num_key in keys for keys in readers) == 1:
        table[num_key] = table[den_key] * rule.limit * inside
    else:
        table[den_key] = table[num_key] / (rule.limit * inside)
    run = load_run(write(tmp_path, "run.json", fake_bench_json(seconds, peaks)))
    assert ratio(run, rule) == pytest.approx(rule.limit * inside)
    assert rule.holds(ratio(run, rule)) is should_hold
    assert (failures(run) == []) is should_hold


def test_missing_case_fails(tmp_path: Path) -> None:
    seconds = {k: v for k, v in HEALTHY_S.items() if k != ("fine", "deepseek_moe", "hf_style")}
    run = load_run(write(tmp_path, "run.json", fake_bench_json(seconds, HEALTHY_BYTES)))
    assert failures(run) == [
        "fine time: deepseek_moe/hf_style vs deepseek_moe/grouped: interleaved timing missing "
        "from the run"
    ]


def test_time_rules_read_the_interleaved_ratio_not_separate_cases(tmp_path: Path) -> None:
    """Separate-case times 2x slow for grouped (a load spike while it ran alone) with a healthy
    interleaved ratio pass; a slow interleaved ratio with healthy separate times fails."""
    healthy = {
        r.name: ratio(load_run(write(tmp_path, "h.json", fake_bench_json(HEALTHY_S, {}))), r)
        for r in RULES
        if r.metric == "time"
    }
    spiked = fake_bench_json(slowed(HEALTHY_S, "grouped", 2.0), HEALTHY_BYTES, interleaved=healthy)
    assert failures(load_run(write(tmp_path, "spiked.json", spiked))) == []
    fine = next(r for r in RULES if r.name == "fine time: deepseek_moe/grouped vs dense/dense")
    slow = fake_bench_json(HEALTHY_S, HEALTHY_BYTES, interleaved={fine.name: fine.limit + 0.1})
    assert failures(load_run(write(tmp_path, "slow.json", slow))) == [
        f"{fine.name}: {fine.limit + 0.1:.2f}, must be <= {fine.limit:g}"
    ]


def test_goal_is_reported_apart_from_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A ratio between a rule's goal and its limit passes the gate and reads 'not met'."""
    fine = next(r for r in RULES if r.name == "fine time: deepseek_moe/grouped vs dense/dense")
    assert fine.goal is not None and fine.goal < fine.limit
    between = (fine.goal + fine.limit) / 2
    path = write(
        tmp_path,
        "run.json",
        fake_bench_json(HEALTHY_S, HEALTHY_BYTES, interleaved={fine.name: between}),
    )
    assert main([str(path), "--baseline", str(tmp_path / "none.json")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(fine.name))
    assert line.endswith(f"ok       <= {fine.goal:g}: not met")
    assert fine.meets_goal(fine.goal) and not fine.meets_goal(between)


def test_gate_reads_the_median_and_shows_the_fastest_rounds(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Median per-round ratio inside the limit, fastest-rounds ratio outside (one lucky dense
    round): passes, and the table prints both."""
    path = write(tmp_path, "run.json", fake_bench_json(HEALTHY_S, HEALTHY_BYTES, lucky=1.5))
    run = load_run(path)
    fine = next(r for r in RULES if r.name == "fine time: deepseek_moe/grouped vs dense/dense")
    assert run.interleaved[fine.name].fastest == pytest.approx(1.3 * 1.5)
    assert ratio(run, fine) == pytest.approx(1.3)
    assert failures(run) == []
    assert main([str(path), "--baseline", str(tmp_path / "none.json")]) == 0
    assert "+-0.01 (7), fastest 1.95" in capsys.readouterr().out


def test_baseline_without_interleaved_entries_shows_sequential_ratios(tmp_path: Path) -> None:
    """A baseline recorded before interleaving: its time ratios come from the separate cases,
    shown beside the run (never gated)."""
    data = fake_bench_json(HEALTHY_S, HEALTHY_BYTES)
    old = {**data, "benchmarks": [b for b in data["benchmarks"] if "rule" not in b["params"]]}
    base = load_run(write(tmp_path, "old.json", old))
    fine = next(r for r in RULES if r.metric == "time")
    assert ratio(base, fine) is None
    assert ratio(base, fine, sequential=True) == pytest.approx(1.3)


def test_foreign_benchmarks_are_ignored(tmp_path: Path) -> None:
    data = fake_bench_json(HEALTHY_S, HEALTHY_BYTES)
    data["benchmarks"].append({"params": None, "stats": {"min": 9.0}, "extra_info": {}})
    assert failures(load_run(write(tmp_path, "run.json", data))) == []


def test_every_rule_names_cases_the_suite_runs() -> None:
    suite = {(c.size, c.variant, c.backend) for c in CASES}
    for rule in RULES:
        assert (rule.size, *rule.numerator) in suite, rule.name
        assert (rule.size, *rule.denominator) in suite, rule.name


def test_committed_baseline_passes_the_gate() -> None:
    """The reference figures the README points at satisfy the gate they are shown beside."""
    baseline = Path(__file__).parents[2] / benchgate.DEFAULT_BASELINE
    if not baseline.is_file():
        pytest.skip(f"{benchgate.DEFAULT_BASELINE} not recorded yet (reports/benchmarks/README.md)")
    run = load_run(baseline)
    assert failures(run) == []  # every rule present, interleaved time ratios included


@pytest.mark.parametrize(("package", "fails"), [("json", True), ("no_such_package_here", False)])
def test_a_rule_whose_peer_is_not_installed_is_skipped_not_passed(
    tmp_path: Path, package: str, fails: bool
) -> None:
    """A missing measurement fails unless the rule's `requires` is not installed here; then the
    table says it was skipped and why."""
    rule = Rule("quick", ("deepseek_moe", "grouped"), ("peer", "x"), "<=", 1.0, requires=package)
    run = load_run(write(tmp_path, "run.json", fake_bench_json(HEALTHY_S, HEALTHY_BYTES)))
    assert bool(failures(run, [rule])) is fails
    expected = "missing" if fails else f"skipped: {package} is not installed"
    assert expected in benchgate.table(run, None, [rule])
