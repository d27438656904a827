"""One time rule of the benchmark gate, measured interleaved in a process of its own.

    python -m tests.benchmarks.gated RULE_NAME    # prints the measurement as one JSON line

`test_gated_ratio` runs each rule this way in the benchmark run. A fresh process, because the
process's history moves the ratio: on the idle 2-core dev box (2026-11-29) the quick rule
measured 3.03x alone and 4.23x right after the fine and coarse cases in the same process (the
grouped step 27 -> 37 ms, dense unchanged), whatever the order of rounds within the rule.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from moe_bench.bench.benchgate import RULES
from moe_bench.bench.cases import (
    NUM_THREADS,
    WARMUP_ROUNDS,
    Case,
    build_layer,
    make_inputs,
    training_step,
)
from moe_bench.timing import median_ci_halfwidth, time_pair

TIME_RULES = {rule.name: rule for rule in RULES if rule.metric == "time"}
RATIO_PRECISION = 0.03  # `<=` rules: rounds until the median ratio is known within +-3%
ROOT = Path(__file__).resolve().parents[2]


def measure(rule: str, smoke: bool = False) -> dict[str, Any]:
    """The rule's two layers timed interleaved (A B, B A, ...): the fields of its benchmark
    entry. `smoke`: one round without warm-up on SMOKE_TOKENS tokens (the default test run's
    smoke test)."""
    gate_rule = TIME_RULES[rule]
    steps = []
    for variant, backend in (gate_rule.numerator, gate_rule.denominator):
        x_TD, grad_TD = make_inputs(gate_rule.size, smoke)
        steps.append(
            training_step(build_layer(Case(gate_rule.size, variant, backend)), x_TD, grad_TD)
        )
    rounds, most = (1, 1) if smoke else gate_rule.rounds
    pair = time_pair(
        *steps,
        torch.device("cpu"),
        warmup=0 if smoke else WARMUP_ROUNDS,
        repeats=rounds,
        max_repeats=most,
        precision=RATIO_PRECISION,
        desc=rule,
    )
    ratios = pair.ratio.samples_ms
    halfwidth = median_ci_halfwidth(ratios)
    return {
        "rule": rule,
        "num_threads": torch.get_num_threads(),
        "fastest_ratio": pair.a.min_ms / pair.b.min_ms,
        "interleaved_ratio": pair.ratio.median_ms,  # what the gate reads
        # infinite below 6 rounds: JSON has no infinity, so null
        "ratio_ci_halfwidth": halfwidth if math.isfinite(halfwidth) else None,
        "rounds": len(ratios),
        "ratios": ratios,
        "numerator_ms": pair.a.median_ms,
        "denominator_ms": pair.b.median_ms,
    }


def in_fresh_process(rule: str, timeout_s: float = 600) -> dict[str, Any]:
    """`measure(rule)` in a new Python process (see the module docstring)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.gated", rule],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measuring {rule!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    (rule,) = argv
    if rule not in TIME_RULES:
        print(f"rule={rule!r} is not one of {sorted(TIME_RULES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(NUM_THREADS)
    print(json.dumps(measure(rule)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
