"""Replay a routing trace over P ranks: each recorded step and layer, under each routing rule
and placement, as `traffic.Step`s.

Shape legend: T recorded tokens of a step, D router input width, E routed experts, K experts
per token, n = P x tokens_per_rank simulated tokens.

The trace must carry its routers' inputs and weights (`moe_bench.trace`, router replay
arrays): the logits `x W^T` are recomputed, turned into the recorded variant's selection
scores (DeepSeek-V3: sigmoid plus its bias, arXiv:2412.19437 Eq. 15-16; others: softmax), and
each rule picks the K experts from them (`rules.select`).

Tokens: rank r holds simulated tokens r * tokens_per_rank .. (r + 1) * tokens_per_rank - 1,
drawn from the step's T recorded tokens (without replacement while n <= T, with replacement
beyond: a bootstrap of the recorded routing); the same draw for every rule and placement of
one (P, step, layer), so they are compared on the same tokens.

EPLB placement: the first recorded step only calibrates (its load under the rule gives the
replicas); every placement is simulated on the later steps alone, so all see the same steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from moe_bench.trace import Trace

from . import placement as placements
from .rules import Rule, applicable, select
from .traffic import Machine, Sizes, Step, simulate


@dataclass(frozen=True)
class Layout:
    ranks: int
    ranks_per_node: int
    tokens_per_rank: int
    redundant_per_rank: int = 1


@dataclass
class Result:
    ranks: int
    rule: str
    placement: str
    step: int
    layer: int
    sim: Step | None  # None: the rule does not apply at this layout (`skipped` says why)
    skipped: str | None = None


def selection_scores(trace: Trace, step: int, layer: int) -> np.ndarray:
    """sel_TE of one recorded step and layer from the trace's router replay arrays."""
    x_TD, w_ED, bias_E = (torch.from_numpy(a) for a in trace.router_of(step, layer))
    logits_TE = x_TD @ w_ED.T  # float32, as the router computes it (Router.logits)
    if trace.meta.get("variant") == "deepseek_v3":
        return (torch.sigmoid(logits_TE) + bias_E).numpy()
    return (torch.softmax(logits_TE, dim=-1) + bias_E).numpy()


def replay(
    trace: Trace,
    layout: Layout,
    rules: list[Rule],
    names: list[str],
    sizes: Sizes,
    machine: Machine,
    seed: int = 0,
) -> Iterator[Result]:
    """Every (rule, placement, layer, step) at `layout.ranks`, steps after the first."""
    E, K = int(trace.meta["num_experts"]), int(trace.meta["top_k"])
    P, rpn, per_rank = layout.ranks, layout.ranks_per_node, layout.tokens_per_rank
    if len(trace.steps) < 2:
        raise ValueError(
            f"the trace records steps {trace.steps}: the simulator needs two or more (the first "
            "calibrates the load-aware placement)"
        )
    calibrate, steps = trace.steps[0], trace.steps[1:]
    homes = {
        name: placements.build(name, E, P, rpn).home_E for name in ("contiguous", "round_robin")
    }
    sel = {(s, j): selection_scores(trace, s, j) for s in trace.steps for j in trace.layers}
    n = P * per_rank
    src_T = np.arange(n) // per_rank
    draws = {}
    for s in steps:
        for j in trace.layers:
            rng = np.random.default_rng([seed, P, s, j])
            T = sel[s, j].shape[0]
            draws[s, j] = rng.choice(T, n, replace=n > T)
    picked: dict[tuple[str, str, int, int], np.ndarray] = {}  # (rule, home, step, layer) -> TK

    def pick(rule: Rule, home: str, s: int, j: int) -> np.ndarray:
        key = (rule.name, home, s, j)
        if key not in picked:
            picked[key] = select(sel[s, j], rule, homes[home], K, rpn)
        return picked[key]

    for rule in rules:
        why = applicable(rule, E, K, P, rpn)
        for name in names:
            if why:
                yield Result(P, rule.name, name, -1, -1, None, why)
                continue
            home = "round_robin" if name == "round_robin" else "contiguous"
            for j in trace.layers:
                plan = placements.build(
                    name,
                    E,
                    P,
                    rpn,
                    np.bincount(pick(rule, home, calibrate, j).reshape(-1), minlength=E),
                    layout.redundant_per_rank,
                )
                for s in steps:
                    picked_nK = pick(rule, home, s, j)[draws[s, j]]
                    token_A = np.repeat(np.arange(n), K)
                    step = simulate(
                        token_A, picked_nK.reshape(-1), src_T, plan, rpn, sizes, machine
                    )
                    yield Result(P, rule.name, name, s, j, step)
