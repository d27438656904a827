"""memory: peak tensor memory of one training step (forward + backward) against dense.

`peak_memory_bytes` is the median over repeats of the step's peak, parameters and inputs
included (`moe_bench.timing.peak_memory`: the CUDA allocator's peak on GPU, live tensor bytes
on CPU); columns `resident_bytes` (what the step starts with) and `spread` ((max - min) /
median over the repeats: repeatability). `ratio_to_dense` divides by the same measurement of a
dense FFN with the same active expert FLOPs per token (column `dense_bytes`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from torch import nn

from moe_bench import schema
from moe_bench.config import Job, TaskConfig
from moe_bench.isocompute import BACKWARD_FACTOR, ffn_flops_per_token
from moe_bench.progress import Rows, find_row
from moe_bench.recorder import Recorder
from moe_bench.task import Asks, Task
from moe_bench.tasks import TrainStep, build_dense, build_layer, random_input
from moe_bench.timing import peak_memory
from variants.contract.config import check_int


@dataclass
class MemoryConfig(TaskConfig):
    name: str = "memory"
    warmup: int = 1
    repeats: int = 3  # the median peak is reported; the spread shows repeatability

    def __post_init__(self) -> None:
        check_int(self, "warmup", 0)
        check_int(self, "repeats", 1)


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


def cost_tflop(job: Job) -> float:
    """Expert work of the layer's and the dense FFN's training steps, warm-up and repeats."""
    task: MemoryConfig = job.task
    tokens = 2 * (task.warmup + task.repeats) * job.model.tokens * (1 + BACKWARD_FACTOR)
    return ffn_flops_per_token(job.layer) * tokens / 1e12


def summary(rows: Rows) -> str | None:
    """'peak 1.23 MiB (x1.10 dense)'."""
    peak, ratio = find_row(rows, "peak_memory_bytes"), find_row(rows, "ratio_to_dense")
    if peak is None or ratio is None:
        return None
    return f"peak {peak['value'] / 2**20:.3g} MiB (x{ratio['value']:.2f} dense)"


TASK = Task(
    name="memory",
    config=MemoryConfig,
    run=run,
    metrics=(schema.PEAK_MEMORY_BYTES, schema.RATIO_TO_DENSE),
    cost_tflop=cost_tflop,
    summary=summary,
    report=Asks(
        order=1,
        ask="How much memory does one training step of the layer take?",
        measure=(
            "Measure: peak memory of one forward + backward step of the layer; ratio: that "
            "peak / the peak of a dense FFN with the same active FLOPs, measured in the same job."
        ),
    ),
)
