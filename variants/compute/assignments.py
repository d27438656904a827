"""The Routing record: the kept assignments and router statistics of one forward.

Shape legend: T tokens, E routed experts, A kept (token, expert) assignments.

Every router turns `x_TD` into one `Routing` record (`variants.contract.routing` holds the
routers' shared math); it is the only thing that crosses from routing to expert compute, so it
lives in the compute room, below the routers that make it and beside the backends that read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Kept assignments and router statistics of one forward (docs/contract.md §2).

    `capacity` is the per-expert buffer size the routing respected (None when dropless);
    the `padded` backend sizes its buffers from it. Which expert-compute path ran is not part
    of the record: a backend returns it (`Computed.path`), the layer reports it as
    `MoEOutput.dispatch_path`.
    """

    token: torch.Tensor  # [A] long
    expert: torch.Tensor  # [A] long
    weight: torch.Tensor  # [A] combine weight
    scores: torch.Tensor  # [T, E] affinities, without any balancing bias
    logits: torch.Tensor  # [T, E] x @ router.weight.T, before noise or jitter
    demand: torch.Tensor  # [E] long, asked of each expert before capacity drops
    load: torch.Tensor  # [E] long, kept per expert
    num_tokens: int
    capacity: int | None = None

    @property
    def num_experts(self) -> int:
        return self.scores.shape[-1]


def make_routing(
    token_A: torch.Tensor,
    expert_A: torch.Tensor,
    weight_A: torch.Tensor,
    scores_TE: torch.Tensor,
    logits_TE: torch.Tensor,
    demand_E: torch.Tensor,
    capacity: int | None = None,
) -> Routing:
    """Assemble a Routing record; `load` is always recomputed from the kept assignments."""
    E = scores_TE.shape[-1]
    return Routing(
        token=token_A,
        expert=expert_A,
        weight=weight_A,
        scores=scores_TE,
        logits=logits_TE,
        demand=demand_E,
        load=torch.bincount(expert_A, minlength=E),
        num_tokens=scores_TE.shape[0],
        capacity=capacity,
    )


def experts_per_token(routing: Routing) -> torch.Tensor:
    """[T] long: kept routed (FFN) experts of each token, 0 for an unrouted token."""
    return torch.bincount(routing.token, minlength=routing.num_tokens)


def experts_per_token_stats(routing: Routing) -> dict[str, float]:
    """Mean, min and max kept routed experts per token (the `experts_per_token` metric).

    The mean times one expert's FLOPs is the measured active routed compute of a variable-k
    variant; for `moe_plus_plus` the record holds FFN experts only, so zero-computation experts
    count as free.
    """
    k_T = experts_per_token(routing).float()
    return {"mean": float(k_T.mean()), "min": float(k_T.min()), "max": float(k_T.max())}
