"""throughput: time one layer's forward, and forward+backward, against its dense twin.

Rows per pass (`pass` column `fwd` or `fwd_bwd`): `fwd_ms` / `fwd_bwd_ms` (median over the
timed repeats; columns `iqr_ms` and `repeats`), `tokens_per_s`, `tflops` (analytic FLOPs of
`moe_bench.isocompute` over the median time) and `ratio_to_dense`: the layer's median time over
that of a dense FFN with the same active expert FLOPs per token, timed in the same job on the
same input (column `dense_ms`). A ratio above 1 is what routing, dispatch and imbalance cost.
"""

from __future__ import annotations

from omegaconf import DictConfig

from moe_bench.config import ThroughputConfig, resolve
from moe_bench.isocompute import BACKWARD_FACTOR, ffn_flops_per_token
from moe_bench.results import Recorder
from moe_bench.tasks import STEPS, build_dense, build_layer, random_input
from moe_bench.timing import time_steps


def run(cfg: DictConfig, recorder: Recorder) -> None:
    run = resolve(cfg)
    task: ThroughputConfig = run.task
    layer, dense, x = build_layer(run), build_dense(run), random_input(run)
    tokens = run.model.tokens
    for pass_ in task.passes:
        factor = 1 if pass_ == "fwd" else 1 + BACKWARD_FACTOR
        moe = time_steps(STEPS[pass_](layer, x), run.device, task.warmup, task.repeats, pass_)
        ref = time_steps(STEPS[pass_](dense, x), run.device, task.warmup, task.repeats, "dense")
        seconds = moe.median_ms / 1e3
        recorder.log(
            f"{pass_}_ms", moe.median_ms, unit="ms", iqr_ms=moe.iqr_ms, repeats=task.repeats,
            **{"pass": pass_},
        )  # fmt: skip
        recorder.log("tokens_per_s", tokens / seconds, unit="tok/s", **{"pass": pass_})
        flops = factor * ffn_flops_per_token(run.layer) * tokens
        recorder.log("tflops", flops / seconds / 1e12, unit="TFLOP/s", **{"pass": pass_})
        recorder.log(
            "ratio_to_dense", moe.median_ms / ref.median_ms, unit="x", dense_ms=ref.median_ms,
            **{"pass": pass_},
        )  # fmt: skip
    recorder.flush()
