"""Record a training run's routing into a trace (`moe_bench.trace`): the convergence task's
`task.trace_every`, `task.trace_layers` and `task.trace_router`.

Shape legend: B sequences of a step's batch, S sequence length, T = B * S tokens of the step,
D model width, E routed experts, A kept assignments of one layer.

At every step divisible by `every` the recorder keeps, for each chosen MoE layer, the step's
kept (token, expert, weight) assignments (the layer's own `Routing`, micro-batches merged), the
tokens' data domains and ids, and with `router` also the router's input of every token
(float32), its weight and its selection bias (DeepSeek-V3's `expert_bias`; zeros for others),
so a replay can recompute the logits and apply another routing rule (`moe_bench.epsim`). The
router inputs come from a forward hook on each chosen layer's router, attached only during a
recorded step. `save` writes `<job dir>/trace.npz` once, at the end of the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_bench import data
from moe_bench.config import Job
from moe_bench.lm import LMOutput, TinyLM
from moe_bench.trace import TRACE_FILE, Trace, check_trace, save_trace


class TraceRecorder:
    """The routing of every `every`-th step of `layers` (None: every MoE layer)."""

    def __init__(
        self, lm: TinyLM, every: int, layers: list[int] | None, router: bool, meta: dict
    ) -> None:
        moe = lm.cfg.moe_layers()
        self.layers = list(moe if layers is None else layers)
        for layer in self.layers:
            if layer not in moe:
                raise ValueError(
                    f"task.trace_layers holds {layer}; allowed: the MoE layers {moe} "
                    "(block indices whose FFN is the variant)"
                )
        self.lm, self.every, self.router, self.meta = lm, every, router, meta
        self.parts: dict[str, list[np.ndarray]] = {}
        self.steps: list[int] = []
        self._inputs: dict[int, list[torch.Tensor]] = {}
        self._weights: tuple[np.ndarray, np.ndarray] = (np.empty(0), np.empty(0))

    @classmethod
    def for_job(cls, lm: TinyLM, job: Job) -> TraceRecorder:
        """The convergence job's recorder (its task.trace_* fields); meta: the layer's sizes."""
        task = job.task
        meta = {
            "variant": job.variant,
            "num_experts": job.layer.num_experts,
            "top_k": job.layer.top_k,
            "d_model": job.model.d_model,
            "tokens_per_step": task.batch_size * task.seq_len,
            "seq_len": task.seq_len,
            "layer_config": dataclasses.asdict(job.layer),
            "seed": job.seed,
        }
        return cls(lm, task.trace_every, task.trace_layers, task.trace_router, meta)

    def wants(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    @contextmanager
    def capture(self, step: int) -> Iterator[None]:
        """Around a recorded step's forward: hook the chosen routers for their inputs."""
        if not (self.router and self.wants(step)):
            yield
            return
        self._inputs = {layer: [] for layer in self.layers}
        # the weights that route this step: an optimizer step and a bias update follow
        routers = [self.lm.blocks[layer].ffn.router for layer in self.layers]
        self._weights = (
            np.stack([r.weight.detach().float().cpu().numpy() for r in routers]),
            np.stack([_bias(r) for r in routers]),
        )
        hooks = [
            self.lm.blocks[layer].ffn.router.register_forward_hook(self._hook(layer))
            for layer in self.layers
        ]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _hook(self, layer: int):
        def keep(module: torch.nn.Module, args: tuple, output: Any) -> None:
            self._inputs[layer].append(args[0].detach().to("cpu", torch.float32))

        return keep

    def record(
        self, step: int, out: LMOutput, idx_BS: torch.Tensor, domain_B: torch.Tensor
    ) -> None:
        """Keep one step's routing (call after the step's forward, for every step)."""
        if not self.wants(step):
            return
        self._add(**step_arrays(out, step, idx_BS, domain_B, self.layers))
        if self.router:
            x_LTD = np.stack([torch.cat(self._inputs[j]).numpy() for j in self.layers])
            w_LED, bias_LE = self._weights
            self._add(router_x_SLTD=x_LTD[None], router_w_SLED=w_LED[None])
            self._add(router_bias_SLE=bias_LE[None])
        self.steps.append(step)

    def _add(self, **arrays: np.ndarray) -> None:
        for name, value in arrays.items():
            self.parts.setdefault(name, []).append(np.asarray(value))

    def trace(self) -> Trace:
        """What was recorded so far, as a checked Trace (not written)."""
        if not self.steps:
            raise ValueError("no step was recorded (task.trace_every > 0 and a step divisible)")
        arrays = {name: np.concatenate(parts) for name, parts in self.parts.items()}
        meta = {**self.meta, "layers": self.layers, "steps": self.steps}
        meta["domains"] = list(data.DOMAINS)
        check_trace(arrays, meta)
        return Trace(arrays, meta)

    def save(self, job_dir: str | Path) -> Path | None:
        """Write `<job_dir>/trace.npz` (None when no step was recorded)."""
        if not self.steps:
            return None
        trace = self.trace()
        return save_trace(Path(job_dir) / TRACE_FILE, trace.arrays, trace.meta)


def step_arrays(
    out: LMOutput,
    step: int,
    idx_BS: torch.Tensor,
    domain_B: torch.Tensor | None = None,
    layers: list[int] | None = None,
) -> dict[str, np.ndarray]:
    """One training step's routing as trace arrays: the kept assignments (token index b * S + t
    in the step's batch) of `layers` (None: every MoE layer), and the step's tokens (domain -1
    where unknown). The one writer of a step's arrays: the recorder and router replay use it."""
    parts: dict[str, list[np.ndarray]] = {}
    for rec in out.layers:
        if layers is not None and rec.layer not in layers:
            continue
        r = rec.routing
        A = r.token.numel()
        for name, values in (
            ("step_N", np.full(A, step)),
            ("layer_N", np.full(A, rec.layer)),
            ("token_N", r.token.cpu().numpy()),
            ("expert_N", r.expert.cpu().numpy()),
            ("weight_N", r.weight.detach().float().cpu().numpy()),
        ):
            parts.setdefault(name, []).append(values)
    B, S = idx_BS.shape
    domain_T = np.full(B * S, -1) if domain_B is None else np.repeat(domain_B.cpu().numpy(), S)
    arrays = {name: np.concatenate(values) for name, values in parts.items()}
    arrays.update(
        tok_step_M=np.full(B * S, step),
        tok_index_M=np.arange(B * S),
        tok_domain_M=domain_T,
        tok_id_M=idx_BS.reshape(-1).cpu().numpy(),
    )
    return arrays


def _bias(router: torch.nn.Module) -> np.ndarray:
    bias = getattr(router, "expert_bias", None)
    if bias is None:
        return np.zeros(router.weight.shape[0], dtype=np.float32)
    return bias.detach().float().cpu().numpy()
