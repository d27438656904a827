"""Tiny fakes for variants tests: hand-built routings and layers with known router weights."""

from __future__ import annotations

import torch

import variants
from variants.compute.assignments import Routing, make_routing


def hand_routing(
    token: list[int],
    expert: list[int],
    weight: list[float],
    num_tokens: int,
    num_experts: int,
    capacity: int | None = None,
) -> Routing:
    """A Routing record from plain lists (scores and logits are placeholders)."""
    expert_A = torch.tensor(expert, dtype=torch.long)
    return make_routing(
        token_A=torch.tensor(token, dtype=torch.long),
        expert_A=expert_A,
        weight_A=torch.tensor(weight, dtype=torch.float32).requires_grad_(),
        scores_TE=torch.full((num_tokens, num_experts), 1.0 / num_experts),
        logits_TE=torch.zeros(num_tokens, num_experts),
        demand_E=torch.bincount(expert_A, minlength=num_experts),
        capacity=capacity,
    )


def with_logits(
    name: str, logits_TE: torch.Tensor, **fields
) -> tuple[torch.nn.Module, torch.Tensor]:
    """A layer whose router produces exactly `logits_TE` on the returned input x_TD.

    x is the identity basis padded to d_model = T (so x @ W^T = W^T rows), and the router
    weight is set to logits^T; this pins hand-checkable logits without touching internals.
    """
    T, E = logits_TE.shape
    layer = variants.build(name, d_model=T, num_experts=E, expert_hidden=8, **fields)
    with torch.no_grad():
        layer.router.weight.copy_(logits_TE.T)
    return layer, torch.eye(T)
