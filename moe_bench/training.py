"""One training step of the tiny LM and what is logged of it: forwards over micro-batches
merged into one output, the per-layer routing statistics, the windowed training log, and the
evaluation over the fixed validation set (the convergence task's loop, `moe_bench.tasks
.convergence`, calls these; its docstring lists the rows).

Shape legend: B sequences, S sequence length, E routed experts, A kept assignments, N validation
windows, M corpus domains.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moe_bench import data, schema
from moe_bench.lm import LayerOutput, LMOutput, TinyLM
from moe_bench.metrics import drop_fraction, load_entropy, max_vio
from variants.compute.assignments import Routing, experts_per_token_stats, make_routing

Log = Callable[..., None]  # the task's row logger: log(metric, value, **columns)


def layer_stats(
    layers: list[LayerOutput], variable_k: bool = False
) -> dict[int | str, dict[str, float]]:
    """Per MoE layer (and "mean" over them): the per-batch routing statistics logged each step;
    `experts_per_token` (the mean) too for a variable-k variant."""
    per_layer = {}
    for rec in layers:
        load_E, demand_E = rec.routing.load.cpu(), rec.routing.demand.cpu()
        per_layer[rec.layer] = {
            "load_entropy": load_entropy(load_E),
            "max_vio_batch": max_vio(load_E),
            "drop_fraction": drop_fraction(demand_E, load_E),
        }
        if variable_k:
            per_layer[rec.layer]["experts_per_token"] = experts_per_token_stats(rec.routing)["mean"]
    names = per_layer[layers[0].layer]
    per_layer["mean"] = {
        name: sum(stats[name] for stats in per_layer.values()) / len(layers) for name in names
    }
    return per_layer


def aux_by_name(out: LMOutput) -> dict[str, float]:
    """Weighted aux losses summed over layers by name, and their `total`."""
    by_name: dict[str, float] = defaultdict(float)
    for rec in out.layers:
        for name, value in rec.losses.items():
            by_name[name] += float(value.detach())
    return {**by_name, "total": float(out.aux_loss.detach())}


@dataclass
class TrainLog:
    """Per-step values averaged over `log_every` steps before they become rows."""

    log: Log
    log_every: int
    tokens_per_step: int
    variable_k: bool = False

    def __post_init__(self) -> None:
        self.wall_s = 0.0  # training seconds so far: the x axis of loss vs wall time
        self.reset()

    def reset(self) -> None:
        self.sums: dict[tuple[str, tuple[tuple[str, Any], ...]], float] = defaultdict(float)
        self.count, self.seconds = 0, 0.0

    def add(self, out: LMOutput, seconds: float) -> dict[int | str, dict[str, float]]:
        """Account one step; returns its per-layer statistics."""
        self.count += 1
        self.seconds += seconds
        self.wall_s += seconds
        self.sums[(schema.TRAIN_LOSS.name, ())] += float(out.loss.detach())
        for name, value in aux_by_name(out).items():
            self.sums[(schema.AUX_LOSS.name, (("loss", name),))] += value
        stats = layer_stats(out.layers, self.variable_k)
        for layer, values in stats.items():
            for metric, value in values.items():
                self.sums[(metric, (("layer", layer),))] += value
        return stats

    def emit(self, step: int, force: bool = False) -> None:
        """Log the window's means at `step` when it is full (or `force`), then start anew."""
        if self.count == 0 or (self.count < self.log_every and not force):
            return
        at = {"step": step, "wall_s": self.wall_s}
        for (metric, columns), total in self.sums.items():
            self.log(metric, total / self.count, **at, **dict(columns))
        tokens_per_s = self.count * self.tokens_per_step / self.seconds
        self.log(schema.TOKENS_PER_S, tokens_per_s, **at, **{"pass": "fwd_bwd"})
        self.reset()


def domain_loads(layers: list[LayerOutput], domain_B: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per MoE layer, load_ME: kept assignments per (domain of the window, expert)."""
    M = len(data.DOMAINS)
    S = layers[0].routing.num_tokens // len(domain_B)
    loads = {}
    for rec in layers:
        r, E = rec.routing, rec.routing.num_experts
        domain_A = domain_B.to(r.token.device)[r.token // S]  # tokens are [B, S] flattened
        loads[rec.layer] = torch.bincount(domain_A * E + r.expert, minlength=M * E).view(M, E)
    return loads


@torch.no_grad()
def evaluate(
    lm: TinyLM, val: tuple[torch.Tensor, ...], batch_size: int, ctx: Callable, device: torch.device
) -> tuple[float, dict[int, torch.Tensor]]:
    """(mean validation loss, per layer load_ME over the whole set), in eval mode."""
    lm.eval()
    loss_sum, loads = 0.0, {}
    idx_NS, targets_NS, domain_N = val
    for first in range(0, len(idx_NS), batch_size):
        chunk = slice(first, first + batch_size)
        with ctx():
            out = lm(idx_NS[chunk].to(device), targets_NS[chunk].to(device))
        loss_sum += float(out.loss) * len(idx_NS[chunk])  # windows of equal length
        for layer, load_ME in domain_loads(out.layers, domain_N[chunk]).items():
            loads[layer] = loads.get(layer, 0) + load_ME.cpu()
    lm.train()
    return loss_sum / len(idx_NS), loads


def log_eval(
    log: Log,
    step: int,
    wall_s: float,
    val_loss: float,
    loads: dict[int, torch.Tensor],
    unigram: float,
) -> None:
    log(schema.VAL_LOSS, val_loss, step=step, wall_s=wall_s, unigram_entropy=unigram)
    log(schema.VAL_PPL, math.exp(val_loss), step=step)
    vio = {layer: max_vio(load_ME.sum(0)) for layer, load_ME in loads.items()}
    for layer, value in vio.items():
        log(schema.MAX_VIO_GLOBAL, value, step=step, layer=layer)
    log(schema.MAX_VIO_GLOBAL, sum(vio.values()) / len(vio), step=step, layer="mean")
    for layer, load_ME in loads.items():
        for domain, load_E in zip(data.DOMAINS, load_ME.double()):
            if load_E.sum() == 0:  # a domain the corpus does not have
                continue
            where = {"step": step, "layer": layer, "domain": domain}
            for expert, share in enumerate((load_E / load_E.sum()).tolist()):
                log(schema.EXPERT_LOAD, share, expert=expert, **where)


def merge_routings(routings: list[Routing]) -> Routing:
    """The routings of a step's micro-batches as one record over all their tokens (token
    indices offset), so a step's statistics are those of its whole batch."""
    if len(routings) == 1:
        return routings[0]
    offsets = [0]
    for r in routings[:-1]:
        offsets.append(offsets[-1] + r.num_tokens)
    return make_routing(
        token_A=torch.cat([r.token + off for r, off in zip(routings, offsets)]),
        expert_A=torch.cat([r.expert for r in routings]),
        weight_A=torch.cat([r.weight for r in routings]),
        scores_TE=torch.cat([r.scores for r in routings]),
        logits_TE=torch.cat([r.logits for r in routings]),
        demand_E=sum(r.demand for r in routings),
    )


def train_forward(
    lm: TinyLM, idx_BS: torch.Tensor, targets_BS: torch.Tensor, micro: int, ctx: Callable
) -> tuple[LMOutput, bool]:
    """Forward and backward of one step's batch in micro-batches of `micro` windows, gradients
    accumulated (each micro objective divided by their number); returns the step's output
    (losses averaged, routings merged) and whether every objective was finite. Stops at the
    first non-finite objective, before its backward."""
    outs = []
    chunks = idx_BS.split(micro), targets_BS.split(micro)
    for idx_bS, targets_bS in zip(*chunks):
        with ctx():
            out = lm(idx_bS, targets_bS)
        outs.append(out)
        objective = (out.loss + out.aux_loss) / len(chunks[0])
        if not math.isfinite(float(objective.detach())):
            return merge_outputs(outs), False
        objective.backward()
    return merge_outputs(outs), True


def merge_outputs(outs: list[LMOutput]) -> LMOutput:
    if len(outs) == 1:
        return outs[0]
    n = len(outs)
    layers = [
        LayerOutput(
            recs[0].layer,
            {name: sum(r.losses[name] for r in recs) / n for name in recs[0].losses},
            merge_routings([r.routing for r in recs]),
        )
        for recs in zip(*(o.layers for o in outs))
    ]
    return LMOutput(
        logits=torch.cat([o.logits for o in outs]),
        loss=sum(o.loss for o in outs) / n,
        aux_loss=sum(o.aux_loss for o in outs) / n,
        layers=layers,
    )


def divergence(step: int, out: LMOutput, stats: dict[int | str, dict[str, float]]) -> str:
    """The error text of a non-finite loss: the step, the losses and every layer's statistics."""
    layers = "; ".join(
        f"layer {layer}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        for layer, values in stats.items()
    )
    return (
        f"non-finite loss at step {step}: train_loss={float(out.loss.detach()):.4g}, "
        f"aux_loss={float(out.aux_loss.detach()):.4g}; {layers}"
    )
