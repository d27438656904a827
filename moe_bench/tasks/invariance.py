"""invariance: the invariance suite (`moe_bench.invariance`) for the job's variant, as rows.

For each config of the variant the suite covers (one per `balance_scope` it takes) and each
split (micro-batches, checkpointing, bf16 router; with `task.distributed`, expert-parallel at 2
and 4 gloo ranks and data-parallel at 2), one `invariance_diff` row per quantity: the relative
max difference from one forward, with columns `case`, `split`, `quantity`, `tolerance`,
`expect` (`equal`, `differs` or `stated`) and `passed`. The layer runs at the suite's own small
size (it must split into 4 micro-batches and over 4 ranks), whatever the model group says.
A variant with no loss and no step state (dense, sinkhorn, expert choice) has nothing to check:
its job writes only its closing row. Failed checks are rows with `passed` false, not a failed
job: the report shows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe_bench import invariance, schema
from moe_bench.config import Job, TaskConfig
from moe_bench.launch import spawn_ranks
from moe_bench.progress import Rows
from moe_bench.recorder import Recorder
from moe_bench.task import Asks, Task
from variants.contract.config import check_number


@dataclass
class InvarianceConfig(TaskConfig):
    name: str = "invariance"
    distributed: bool = True  # also the expert- and data-parallel splits (spawns gloo ranks)
    timeout_s: float = 150.0  # the whole spawn of one rank count
    collective_timeout_s: float = 30.0  # every collective of a rank

    def __post_init__(self) -> None:
        if not isinstance(self.distributed, bool):
            raise ValueError(f"distributed={self.distributed!r} must be true or false")
        check_number(self, "timeout_s", positive=True)
        check_number(self, "collective_timeout_s", positive=True)


def distributed_rows(
    chosen: tuple[invariance.Case, ...] | list[invariance.Case] | None = None,
    timeout_s: float = 150.0,
    collective_timeout_s: float = 30.0,
) -> list[dict[str, Any]]:
    """Every expert- and data-parallel split of every case, one spawn per rank count (every
    collective times out after `collective_timeout_s`, the whole spawn after `timeout_s`)."""
    chosen = chosen or invariance.cases()
    refs = {case: invariance.measure_local(case, None) for case in chosen}
    rows = []
    for world in sorted({s.ranks for s in invariance.DISTRIBUTED}):
        jobs = [
            (case, split)
            for split in invariance.DISTRIBUTED
            if split.ranks == world
            for case in chosen
            if invariance.runs_on(case, split) is None
        ]
        if not jobs:
            continue
        per_rank = spawn_ranks(
            invariance.rank_jobs, world, args=(jobs,), timeout_s=timeout_s,
            collective_timeout_s=collective_timeout_s,
        )  # fmt: skip
        for i, (case, split) in enumerate(jobs):
            got = dict(per_rank[0][i])
            got["routing"] = torch.cat([r[i]["routing"] for r in per_rank]).sort().values
            rows.extend(invariance.compare(case, split, refs[case], invariance.Measured(got)))
    return rows


def run(job: Job, recorder: Recorder) -> None:
    task: InvarianceConfig = job.task
    if job.component.origin != "variants":
        raise ValueError(
            f"variant={job.variant!r} is a {job.component.origin} component; task=invariance "
            "checks the suite's own variants"
        )
    chosen = [c for c in invariance.cases() if c.variant == job.variant]
    rows = invariance.local_rows(chosen) if chosen else []
    if chosen and task.distributed:
        rows += distributed_rows(chosen, task.timeout_s, task.collective_timeout_s)
    for r in rows:
        recorder.log(
            schema.INVARIANCE_DIFF, r["max_diff"], case=r["case"], split=r["split"],
            quantity=r["quantity"], tolerance=r["tolerance"], expect=r["expect"],
            passed=r["passed"],
        )  # fmt: skip
    recorder.flush()


def cost_tflop(job: Job) -> float:
    """A few hundred forwards of a 16-wide layer: nothing next to the CPU budget."""
    return 0.0


def summary(rows: Rows) -> str | None:
    """'41/41 checks pass' (or which failed first)."""
    checks = [r for r in rows if r.get("metric") == schema.INVARIANCE_DIFF.name]
    if not checks:
        return "no loss or step state: nothing to check"
    bad = [r for r in checks if not r.get("passed")]
    first = f"; first: {bad[0]['case']} {bad[0]['split']} {bad[0]['quantity']}" if bad else ""
    return f"{len(checks) - len(bad)}/{len(checks)} checks pass{first}"


TASK = Task(
    name="invariance",
    config=InvarianceConfig,
    run=run,
    metrics=(schema.INVARIANCE_DIFF,),
    cost_tflop=cost_tflop,
    summary=summary,
    report=Asks(
        order=9,
        ask="Do the layer's loss, gradient and step update survive splitting the batch?",
        measure=(
            "Measure: max |split - one forward| / max |one forward| of the auxiliary loss, its "
            "gradient, the step counts and the bias/coefficient update, per split; pass when "
            "within the tolerance where the split should change nothing, beyond it where the "
            "config says the loss is per forward."
        ),
    ),
)
