"""throughput: time one layer's forward, and forward+backward, against its dense twin.

Rows per pass (`pass` column `fwd` or `fwd_bwd`): `fwd_ms` / `fwd_bwd_ms` (median over the
timed repeats; columns `iqr_ms` and `repeats`), `tokens_per_s`, `tflops` (analytic FLOPs of
`moe_bench.isocompute` over the median time) and `ratio_to_dense`: the layer's median time over
that of a dense FFN with the same active expert FLOPs per token, timed in the same job on the
same input (column `dense_ms`). A ratio above 1 is what routing, dispatch and imbalance cost.
"""

from __future__ import annotations

from moe_bench import schema
from moe_bench.config import Job, ThroughputConfig
from moe_bench.isocompute import BACKWARD_FACTOR, ffn_flops_per_token
from moe_bench.results import Recorder
from moe_bench.tasks import STEPS, build_dense, build_layer, random_input
from moe_bench.timing import time_steps

TIME_METRICS = {"fwd": schema.FWD_MS, "fwd_bwd": schema.FWD_BWD_MS}


def run(job: Job, recorder: Recorder) -> None:
    task: ThroughputConfig = job.task
    layer, dense, x = build_layer(job), build_dense(job), random_input(job)
    tokens = job.model.tokens
    for pass_ in task.passes:
        factor = 1 if pass_ == "fwd" else 1 + BACKWARD_FACTOR
        moe = time_steps(STEPS[pass_](layer, x), job.device, task.warmup, task.repeats, pass_)
        ref = time_steps(STEPS[pass_](dense, x), job.device, task.warmup, task.repeats, "dense")
        seconds = moe.median_ms / 1e3
        keys = {"pass": pass_}
        recorder.log(
            TIME_METRICS[pass_], moe.median_ms, iqr_ms=moe.iqr_ms, repeats=task.repeats, **keys
        )
        recorder.log(schema.TOKENS_PER_S, tokens / seconds, **keys)
        flops = factor * ffn_flops_per_token(job.layer) * tokens
        recorder.log(schema.TFLOPS, flops / seconds / 1e12, **keys)
        recorder.log(
            schema.RATIO_TO_DENSE, moe.median_ms / ref.median_ms, dense_ms=ref.median_ms, **keys
        )
    recorder.flush()
