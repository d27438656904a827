"""memory: peak tensor memory of one training step (forward + backward) against dense.

`peak_memory_bytes` is the median over repeats of the step's peak, parameters and inputs
included (`moe_bench.timing.peak_memory`: the CUDA allocator's peak on GPU, live tensor bytes
on CPU); columns `resident_bytes` (what the step starts with) and `spread` ((max - min) /
median over the repeats: repeatability). `ratio_to_dense` divides by the same measurement of a
dense FFN with the same active expert FLOPs per token (column `dense_bytes`).
"""

from __future__ import annotations

import statistics

from torch import nn

from moe_bench import schema
from moe_bench.config import Job, MemoryConfig
from moe_bench.recorder import Recorder
from moe_bench.tasks import TrainStep, build_dense, build_layer, random_input
from moe_bench.timing import peak_memory


def measure(layer: nn.Module, job: Job) -> tuple[list[int], int]:
    """(peak bytes of each repeat, resident bytes) of a training step of `layer`."""
    task: MemoryConfig = job.task
    step = TrainStep(layer, random_input(job))
    for _ in range(task.warmup):
        step()
    peaks = []
    for _ in range(task.repeats):
        layer.zero_grad(set_to_none=True)
        step.x.grad = None
        peaks.append(peak_memory(step, job.device, step.resident()))
    resident = sum(t.untyped_storage().nbytes() for t in step.resident())
    return peaks, resident


def run(job: Job, recorder: Recorder) -> None:
    peaks, resident = measure(build_layer(job), job)
    dense_peaks, _ = measure(build_dense(job), job)
    peak, dense_peak = statistics.median(peaks), statistics.median(dense_peaks)
    keys = {"pass": "fwd_bwd"}
    recorder.log(
        schema.PEAK_MEMORY_BYTES, peak, resident_bytes=resident,
        spread=(max(peaks) - min(peaks)) / peak, repeats=len(peaks), **keys,
    )  # fmt: skip
    recorder.log(schema.RATIO_TO_DENSE, peak / dense_peak, dense_bytes=dense_peak, **keys)
    recorder.flush()
