"""What a task is: one object, defined in one file (`moe_bench/tasks/<name>.py`, as `TASK`).

A `Task` holds everything the rest of the suite asks of a task, so the runner, the progress
line and the report hold no per-task table:
- `name` (the `task=` option; its YAML is `sweeps/task/<name>.yaml`) and `config`, the dataclass
  of its `task.*` fields (a `moe_bench.config.TaskConfig`; Hydra's schema for the YAML);
- `run(job, recorder)`: the work, reading the resolved Job and writing rows;
- `metrics`: the schema metrics its rows may carry (the runner's Recorder refuses others);
- `cost_tflop(job)`: its estimated expert FFN work, for the refusal of a GPU-sized job on a CPU
  (None: the task is not estimated and never refused);
- `summary(rows)`: its key numbers on the job's closing terminal line (None: none);
- `timed`: its numbers are wall-clock times (a parallel launcher gets a warning);
- `report`: what the report asks of it (`Asks`), written into every job's run card.

The registry of tasks is `moe_bench.registry`. This module is torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moe_bench.progress import Rows
from moe_bench.schema import JOB, Metric

if TYPE_CHECKING:
    from moe_bench.config import Job, TaskConfig
    from moe_bench.recorder import Recorder


@dataclass(frozen=True)
class Answer:
    """One summary sentence a task's rows can answer ("fastest: switch, ...").

    `metric` (with `pass` and the displayed `unit` where the measure has several) picks the
    leaderboard column; `words` names the measure in the sentence.
    """

    question: str
    metric: Metric
    words: str
    pass_: str | None = None
    unit: str | None = None

    def record(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "metric": self.metric.name,
            "pass": self.pass_,
            "unit": self.unit,
            "words": self.words,
        }


@dataclass(frozen=True)
class Asks:
    """What the report asks of a task: where its section goes (`order`, ascending), the
    question its leaderboard answers, its measure in words, and its summary sentences."""

    order: int
    ask: str = ""
    measure: str = ""
    answers: tuple[Answer, ...] = ()

    def card(self) -> dict[str, Any]:
        """The `card.task_*` columns of the job's closing row (docs/contract.md §5)."""
        return {
            "card.task_order": self.order,
            "card.task_ask": self.ask,
            "card.task_measure": self.measure,
            "card.task_answers": json.dumps([a.record() for a in self.answers]),
        }


@dataclass(frozen=True)
class Task:
    name: str
    config: type[TaskConfig]
    run: Callable[[Job, Recorder], None]
    metrics: tuple[Metric, ...]
    report: Asks
    cost_tflop: Callable[[Job], float] | None = None
    summary: Callable[[Rows], str | None] | None = None
    timed: bool = False

    def __post_init__(self) -> None:
        default = getattr(self.config, "name", None)
        if default != self.name:
            raise ValueError(
                f"task {self.name!r}: its config {self.config.__name__}.name defaults to "
                f"{default!r}; it must default to {self.name!r}"
            )

    @property
    def metric_names(self) -> frozenset[str]:
        """The metric names its rows may carry: its own and the closing `job` row."""
        return frozenset(m.name for m in (*self.metrics, JOB))
