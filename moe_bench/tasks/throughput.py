"""throughput: time one layer's forward, and forward+backward, interleaved with its dense twin.

The twin is a dense FFN with the same active expert FLOPs per token, on the same input. Per
pass, after warm-up of both, each of `repeats` rounds times the layer then the twin
(`moe_bench.timing.time_pair`), so load, clock and cache changes hit both alike; more rounds,
up to `task.max_repeats`, run until the median ratio is known within +-`task.precision` (95%).

Rows per pass (`pass` column `fwd` or `fwd_bwd`), docs/contract.md section 5:
- `fwd_ms` / `fwd_bwd_ms`: the layer's median step time; columns `iqr_ms`, `min_ms`, `max_ms`,
  `repeats`.
- `tokens_per_s` and `tflops` (analytic FLOPs of `moe_bench.isocompute`) over that median.
- `ratio_to_dense`: the median over rounds of (layer time / twin time); columns `dense_ms`
  (the twin's median), `dense_iqr_ms`, the per-round ratios' `ratio_iqr`, `ratio_min`,
  `ratio_max`, `ratio_ci95` (half-width of the median's 95% confidence interval). Above 1 is
  what routing, dispatch and imbalance cost.
Every row of a pass carries the pass's `noisy` and `noisy_reason` (`moe_bench.timing.ratio_noise`
over its per-round ratios: "" when the ratio can be trusted), `load_avg` (the 1-minute load
average before the job's timing), `load_avg_after` (after that pass) and `threads` (torch's
intra-op threads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from moe_bench import schema
from moe_bench.config import Job, TaskConfig
from moe_bench.isocompute import BACKWARD_FACTOR, ffn_flops_per_token
from moe_bench.progress import Rows, find_row
from moe_bench.recorder import Recorder, load_average
from moe_bench.task import Answer, Asks, Task
from moe_bench.tasks import STEPS, build_dense, build_layer, random_input
from moe_bench.timing import PairTiming, Timing, median_ci_halfwidth, ratio_noise, time_pair
from variants.contract.config import check_int, check_number

PASSES = ("fwd", "fwd_bwd")
TIME_METRICS = {"fwd": schema.FWD_MS, "fwd_bwd": schema.FWD_BWD_MS}
# the rows of a timed pass (the race task writes the same ones per arm)
METRICS = (*TIME_METRICS.values(), schema.TOKENS_PER_S, schema.TFLOPS, schema.RATIO_TO_DENSE)


@dataclass
class ThroughputConfig(TaskConfig):
    name: str = "throughput"
    warmup: int = 3  # untimed steps first: allocator, caches, lazy init
    repeats: int = 30  # timed rounds (layer and twin) at least; medians, IQR, ratios over them
    # more rounds, up to max_repeats, until the 95% confidence interval of the median ratio is
    # within +-precision of it (a loaded machine needs more rounds for the same certainty)
    max_repeats: int = 100
    precision: float = 0.02
    passes: list[str] = field(default_factory=lambda: list(PASSES))

    def __post_init__(self) -> None:
        check_int(self, "warmup", 0)
        check_int(self, "repeats", 1)
        check_int(self, "max_repeats", 1)
        check_number(self, "precision", minimum=0)
        if self.max_repeats < self.repeats:
            self.max_repeats = self.repeats  # repeats alone: a fixed number of rounds
        if not self.passes or any(p not in PASSES for p in self.passes):
            raise ValueError(
                f"passes={list(self.passes)} must be a non-empty list of {', '.join(PASSES)}"
            )


def log_speed(recorder: Recorder, job: Job, pass_: str, time: Timing, **keys: Any) -> None:
    """The time, tokens/s and TFLOP/s rows of one pass of `job`'s layer."""
    seconds = time.median_ms / 1e3
    keys = {"pass": pass_, **keys}
    recorder.log(TIME_METRICS[pass_], time.median_ms, **time.spread(), **keys)
    recorder.log(schema.TOKENS_PER_S, job.model.tokens / seconds, **keys)
    flops = pass_factor(pass_) * ffn_flops_per_token(job.layer) * job.model.tokens
    recorder.log(schema.TFLOPS, flops / seconds / 1e12, **keys)


def log_ratio(recorder: Recorder, pass_: str, pair: PairTiming, **keys: Any) -> None:
    """The ratio_to_dense row of one pass: layer (A) over dense (B), round by round."""
    ratio = pair.ratio
    recorder.log(
        schema.RATIO_TO_DENSE, ratio.median_ms, dense_ms=pair.b.median_ms,
        dense_iqr_ms=pair.b.iqr_ms, ratio_iqr=ratio.iqr_ms, ratio_min=ratio.min_ms,
        ratio_max=ratio.max_ms, ratio_ci95=median_ci_halfwidth(ratio.samples_ms),
        repeats=len(ratio.samples_ms), **{"pass": pass_, **keys},
    )  # fmt: skip


def noise(pair: PairTiming) -> dict[str, Any]:
    """`noisy` and `noisy_reason` of a pass: whether its median ratio can be trusted."""
    reason = ratio_noise(pair.ratio.samples_ms)
    return {"noisy": bool(reason), "noisy_reason": reason}


def log_pass(recorder: Recorder, job: Job, pass_: str, pair: PairTiming, **machine: Any) -> None:
    """The four rows of one pass from its interleaved timing."""
    keys = {**noise(pair), **machine}
    log_speed(recorder, job, pass_, pair.a, **keys)
    log_ratio(recorder, pass_, pair, **keys)


def run(job: Job, recorder: Recorder) -> None:
    task: ThroughputConfig = job.task
    load_before = load_average()
    layer, dense, x = build_layer(job), build_dense(job), random_input(job)
    for pass_ in task.passes:
        step, twin = STEPS[pass_](layer, x), STEPS[pass_](dense, x)
        pair = time_pair(
            step, twin, job.device, task.warmup, task.repeats, pass_,
            max_repeats=task.max_repeats, precision=task.precision,
        )  # fmt: skip
        machine = {
            "load_avg": load_before,
            "load_avg_after": load_average(),
            "threads": torch.get_num_threads(),
        }
        log_pass(recorder, job, pass_, pair, **machine)
    recorder.flush()


def pass_factor(pass_: str) -> int:
    """Forward FLOPs of one step of `pass_` in forwards: 1, or 1 + the backward's."""
    return 1 if pass_ == "fwd" else 1 + BACKWARD_FACTOR


def cost_tflop(job: Job) -> float:
    """Expert work of the layer and its twin over warm-up and repeats, every pass."""
    task: ThroughputConfig = job.task
    forwards = sum(pass_factor(p) for p in task.passes)
    tokens = 2 * (task.warmup + task.repeats) * job.model.tokens * forwards
    return ffn_flops_per_token(job.layer) * tokens / 1e12


def summary(rows: Rows) -> str | None:
    """'fwd_bwd 12.3 ms (x1.42 dense, iqr 3%), load 0.4' (fwd when fwd_bwd did not run)."""
    for pass_, metric in (("fwd_bwd", "fwd_bwd_ms"), ("fwd", "fwd_ms")):
        time_row = find_row(rows, metric, **{"pass": pass_})
        ratio_row = find_row(rows, "ratio_to_dense", **{"pass": pass_})
        if time_row is None or ratio_row is None:
            continue
        ms, iqr = time_row["value"], time_row.get("iqr_ms") or 0.0
        shown = f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"
        text = f"{pass_} {shown} ms (x{ratio_row['value']:.2f} dense, iqr {iqr / ms:.0%})"
        if ratio_row.get("noisy"):
            text += f" NOISY ({ratio_row.get('noisy_reason') or 'ratio spread'})"
        if time_row.get("load_avg") is not None:
            text += f", load {time_row['load_avg']:.1f}"
        return text
    return None


TASK = Task(
    name="throughput",
    config=ThroughputConfig,
    run=run,
    metrics=METRICS,
    cost_tflop=cost_tflop,
    summary=summary,
    timed=True,
    report=Asks(
        order=0,
        ask="How fast is one layer?",
        measure=(
            "Measure: tokens/s of one layer (tokens / median time of the timed repeats), "
            "forward + backward and forward only; rows are ranked by forward + backward "
            "tokens/s. Beside it, ratio to dense: layer time / time of a dense FFN with the "
            "same active FLOPs per token, timed interleaved in the same job on the same input "
            "(below 1: faster than that FFN). The ratio's baseline differs per variant, so the "
            "two can rank rows differently; the ranks column says where they do. Spread: IQR "
            "of the timed repeats."
        ),
        answers=(Answer("fastest", schema.TOKENS_PER_S, "forward + backward tokens/s", "fwd_bwd"),),
    ),
)
