"""Calibrate the timing noise rule (`moe_bench.timing.ratio_noise`) on identical layers.

    python scripts/calibrate_noise.py                  # quick (model=small) and tiny sizes
    python scripts/calibrate_noise.py --reps 4 --models small

A dense layer is timed against its own twin (the same dense FFN, built apart) exactly as the
throughput task times a layer (`moe_bench.tasks.throughput`: its config's warm-up, rounds,
`max_repeats` and `precision`, `backend=grouped` as in the quick preset), several times per
size and pass. The true ratio is 1, so every run shows two things:
- how wide the median ratio's 95% interval gets once the task has run its rounds (`ci`, the
  statistic the rule compares with `NOISY_RATIO_CI`): a threshold below what healthy runs reach
  would flag them all;
- how far the median ratio actually lands from 1 (`err`): a threshold below that error would
  trust intervals narrower than the real error of the method.
The rule is a precision demand: a median ratio is trusted when its 95% interval is within
NOISY_RATIO_CI of it. Two things make that demand sound, and this script checks both at the load
it runs under: the interval is honest (it holds 1 in about 95% of twin runs: `coverage`), and
the demand is not tighter than the accuracy the protocol delivers (the implied threshold: the
95th percentile of |ratio - 1| over the quick size's runs, rounded up to a whole percent; a
shared machine raises it, so calibrate where the timings will be taken, or under more load).
Beside them, the previous rule's verdicts (IQR over median of the layer's step times or of the
per-round ratios > 10%, or slowest over fastest > 2) show how often it flagged identical layers.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_bench import compose, config  # noqa: E402
from moe_bench.tasks import STEPS, build_dense, build_layer, random_input  # noqa: E402
from moe_bench.timing import NOISY_RATIO_CI, Timing, relative_ci, time_pair  # noqa: E402

OLD_IQR, OLD_MAX_MIN = 0.10, 2.0  # the previous rule, over the layer's whole-job step times


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's word for it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def old_noisy(timing: Timing) -> bool:
    return timing.relative_iqr > OLD_IQR or timing.max_ms > OLD_MAX_MIN * timing.min_ms


def run(model: str, pass_: str) -> dict[str, float]:
    """One twin run at `model`: the statistics of its per-round ratios."""
    job = config.resolve(compose("variant=dense", "task=throughput", f"model={model}",
                                 "backend=grouped", "device=cpu"))  # fmt: skip
    task = job.task
    layer, twin, x = build_layer(job), build_dense(job), random_input(job)
    load = os.getloadavg()[0]
    pair = time_pair(
        STEPS[pass_](layer, x), STEPS[pass_](twin, x), job.device, task.warmup, task.repeats,
        f"{model} {pass_}", max_repeats=task.max_repeats, precision=task.precision,
    )  # fmt: skip
    ratios, layer_ms = pair.ratio.samples_ms, pair.a
    median = statistics.median(ratios)
    return {
        "rounds": len(ratios),
        "ratio": median,
        "ci": relative_ci(ratios),
        "err": abs(median - 1),
        "old_noisy": old_noisy(layer_ms) or old_noisy(pair.ratio),
        "ms": layer_ms.median_ms,
        "load": load,
    }  # fmt: skip


def describe(name: str, values: list[float]) -> str:
    return (
        f"  {name:<6} min {min(values):.4f}  median {statistics.median(values):.4f}  "
        f"q90 {quantile(values, 0.9):.4f}  q95 {quantile(values, 0.95):.4f}  max {max(values):.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=8, help="runs per size and pass")
    parser.add_argument("--models", nargs="+", default=["small", "tiny"])
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_model()}, "
          f"torch {torch.__version__}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"load average at start {os.getloadavg()[0]:.2f}")  # fmt: skip
    quick: list[dict[str, float]] = []
    for model in args.models:
        for pass_ in ("fwd", "fwd_bwd"):
            runs = [run(model, pass_) for _ in range(args.reps)]
            print(f"\nmodel={model} pass={pass_}: {len(runs)} runs")
            for r in runs:
                print(f"  rounds {r['rounds']:>3}  ratio {r['ratio']:.4f}  ci ±{r['ci']:.2%}  "
                      f"layer {r['ms']:.2f} ms  load {r['load']:.2f}  "
                      f"old rule: {'noisy' if r['old_noisy'] else 'quiet'}")  # fmt: skip
            for stat in ("ci", "err", "rounds"):
                print(describe(stat, [r[stat] for r in runs]))
            covered = sum(r["err"] <= r["ci"] for r in runs)
            flagged = sum(r["ci"] > NOISY_RATIO_CI for r in runs)
            old = sum(r["old_noisy"] for r in runs)
            print(f"  coverage: 1 inside the interval in {covered}/{len(runs)} runs; noisy: "
                  f"{flagged}/{len(runs)} by ci > {NOISY_RATIO_CI:.0%}, {old}/{len(runs)} by "
                  "the previous rule")  # fmt: skip
            if model == "small":
                quick += runs
    if quick:
        err95 = quantile([r["err"] for r in quick], 0.95)
        covered = sum(r["err"] <= r["ci"] for r in quick)
        implied = math.ceil(err95 * 100) / 100
        print(f"\nquick size (model=small), both passes, {len(quick)} runs: coverage "
              f"{covered}/{len(quick)}, q95 |ratio - 1| {err95:.2%}: implied NOISY_RATIO_CI = "
              f"{implied:.2f} (in use: {NOISY_RATIO_CI})")  # fmt: skip
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
