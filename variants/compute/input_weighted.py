"""Combine weights on the expert's input (Llama 4): `y[t] = sum_a FFN_e(a)(weight[a] * x[t])`.

Shape legend: T tokens, D model width, A kept assignments.

Every backend computes `weight[a] * FFN(x[t])`. Llama 4 (HF transformers `Llama4TextMoe`)
scales the input instead: `routed_in = x * router_scores` before the experts, and the FFN is
not linear in its input, so the two differ. `input_weighted(backend)` runs any backend on one
row per assignment, `x[token[a]] * weight[a]` with weight 1, and adds the rows back to their
tokens: outputs and gradients (to x, to the weights through the scaled rows, to the experts)
are those of the formula, on whatever backend computes the rows. Cost: one [A, D] copy.
"""

from __future__ import annotations

import torch

from .assignments import Routing
from .backends import Backend, Computed
from .experts import ExpertBank


def per_assignment(routing: Routing) -> Routing:
    """The routing of the scaled rows: row a goes to expert[a] with weight 1 (A rows)."""
    A = routing.token.numel()
    dev = routing.token.device
    placeholder_AE = routing.scores.new_zeros(()).expand(A, routing.num_experts)
    return Routing(
        token=torch.arange(A, device=dev),
        expert=routing.expert,
        weight=torch.ones(A, dtype=routing.weight.dtype, device=dev),
        scores=placeholder_AE,
        logits=placeholder_AE,
        demand=routing.load,
        load=routing.load,
        num_tokens=A,
        capacity=routing.capacity,
    )


def input_weighted(backend: Backend) -> Backend:
    """`backend` with each combine weight applied to the expert's input, not its output."""

    def compute(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> Computed:
        x_AD = x_TD[routing.token] * routing.weight.to(x_TD.dtype)[:, None]
        y_AD, path = backend(x_AD, per_assignment(routing), bank)
        return Computed(x_TD.new_zeros(x_TD.shape).index_add(0, routing.token, y_AD), path)

    return compute
