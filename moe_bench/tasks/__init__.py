"""Task registry and the pieces several tasks share: the layer, its dense twin, inputs, steps.

Shape legend: B sequences, S sequence length, D model width.

Each task module exposes `run(job: Job, recorder: Recorder) -> None`: the runner resolves the
config once (`moe_bench.config.resolve`) and the task reads the typed, immutable Job. `TASKS`
maps a task name to its module, imported on first use so a task's dependencies load only when
it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from moe_bench import components
from moe_bench.config import Job
from moe_bench.isocompute import dense_reference
from moe_bench.results import Recorder

TASKS: dict[str, str] = {
    "throughput": "moe_bench.tasks.throughput",
    "race": "moe_bench.tasks.race",
    "memory": "moe_bench.tasks.memory",
    "balance": "moe_bench.tasks.balance",
    "convergence": "moe_bench.tasks.convergence",
    "expert_parallel": "moe_bench.tasks.expert_parallel",
}

TaskFn = Callable[[Job, Recorder], None]


def get_task(name: str) -> TaskFn:
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not one of {', '.join(map(repr, TASKS))}")
    try:
        module = importlib.import_module(TASKS[name])
    except ModuleNotFoundError as e:
        if e.name != TASKS[name]:
            raise
        raise ValueError(f"task={name!r} is registered but {TASKS[name]} is not installed") from e
    return module.run


def build_layer(job: Job) -> nn.Module:
    """The job's layer (variant or peer), seeded, on its device and dtype."""
    torch.manual_seed(job.seed)
    return job.component.build(job.layer, job.device, job.dtype)


def build_dense(job: Job) -> nn.Module:
    """The dense FFN with the active expert FLOPs of the job's layer (the ratio_to_dense base)."""
    torch.manual_seed(job.seed)
    dense = components.lookup(components.BASELINE)
    return dense.build(dense.make_config(**dense_reference(job.layer)), job.device, job.dtype)


def random_input(job: Job) -> torch.Tensor:
    """x_BSD ~ N(0, 1): model.tokens tokens as [tokens / seq_len, seq_len, d_model]."""
    m = job.model
    generator = torch.Generator().manual_seed(job.seed)
    x_BSD = torch.randn(m.tokens // m.seq_len, m.seq_len, m.d_model, generator=generator)
    return x_BSD.to(job.device, job.dtype)


class ForwardStep:
    """Inference: eval mode (no losses, deterministic routing), no autograd graph."""

    def __init__(self, layer: nn.Module, x: torch.Tensor) -> None:
        self.layer, self.x = layer.eval(), x

    def __call__(self) -> None:
        with torch.no_grad():
            self.layer(self.x)

    def resident(self) -> list[torch.Tensor]:
        return [*self.layer.parameters(), *self.layer.buffers(), self.x]


class TrainStep(ForwardStep):
    """Training forward and backward: gradients of the weights and of the input.

    The upstream gradient is a fixed random tensor and the aux loss is backpropagated with
    weight 1, as in a training loop. Gradients are freed before each step, so every step
    allocates them afresh.
    """

    def __init__(self, layer: nn.Module, x: torch.Tensor) -> None:
        self.layer, self.x = layer.train(), x.detach().requires_grad_(True)
        self.grad_y = torch.randn_like(x)

    def __call__(self) -> None:
        self.layer.zero_grad(set_to_none=True)
        self.x.grad = None
        out = self.layer(self.x)
        outputs, grads = [out.y], [self.grad_y]
        if out.aux_loss.requires_grad:  # dense, and variants without losses, return a constant
            outputs.append(out.aux_loss)
            grads.append(torch.ones_like(out.aux_loss))
        torch.autograd.backward(outputs, grads)

    def resident(self) -> list[torch.Tensor]:
        return [*super().resident(), self.grad_y]


STEPS: dict[str, type[ForwardStep]] = {"fwd": ForwardStep, "fwd_bwd": TrainStep}
