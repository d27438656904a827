"""Routing statistics of docs/contract.md §4, over a load vector, scores or whole Routing records.

Shape legend: T tokens, E routed experts, A kept assignments.

For a window with kept load `c_i`, `A = sum c_i` and `p_i = c_i / A`:
load_entropy `-sum p log p / log E` (1 = perfect balance), max_vio `E max p - 1` (Wang et al.
2024, arXiv:2408.15664, Eq. 4), load_cv `std/mean` (population), drop_fraction (dropped over
demanded assignments), unrouted_fraction (tokens with no kept assignment over T), dead_experts
(`c_i < 0.01 mean(c)`), router_entropy (mean over tokens of the entropy, in nats, of the token's
scores normalised to sum 1: confidence, not balance).

A window of several forwards (batches) is summarised by `window_stats`, which pools the loads
and weighs router entropy by tokens, so a window's statistics do not depend on how it was cut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from variants import Routing

DEAD_SHARE = 0.01  # an expert is dead below 1% of the mean load


def _shares(load_E: torch.Tensor) -> torch.Tensor:
    return load_E.double() / load_E.sum().double()


def load_entropy(load_E: torch.Tensor) -> float:
    """Normalised entropy of the load shares in [0, 1]; nan when nothing was kept.

    With a single expert the load cannot be unbalanced: 1.
    """
    E, total = load_E.numel(), int(load_E.sum())
    if total == 0:
        return math.nan
    if E == 1:
        return 1.0
    p_E = _shares(load_E)
    return float(-torch.special.xlogy(p_E, p_E).sum() / math.log(E))


def max_vio(load_E: torch.Tensor) -> float:
    """`E * max_i p_i - 1`: 0 for perfect balance, E - 1 when one expert takes everything."""
    if int(load_E.sum()) == 0:
        return math.nan
    return float(load_E.numel() * _shares(load_E).max() - 1)


def load_cv(load_E: torch.Tensor) -> float:
    """Coefficient of variation of the load: population std / mean."""
    c_E = load_E.double()
    mean = c_E.mean()
    return math.nan if mean == 0 else float(c_E.std(correction=0) / mean)


def drop_fraction(demand_E: torch.Tensor, load_E: torch.Tensor) -> float:
    """Dropped assignments / demanded assignments."""
    demanded = int(demand_E.sum())
    return math.nan if demanded == 0 else (demanded - int(load_E.sum())) / demanded


def unrouted_count(routing: Routing) -> int:
    """Tokens with no kept assignment."""
    return routing.num_tokens - int(torch.unique(routing.token).numel())


def unrouted_fraction(routing: Routing) -> float:
    """Tokens with no kept assignment / T."""
    return unrouted_count(routing) / routing.num_tokens


def dead_experts(load_E: torch.Tensor) -> int:
    """Experts whose load is below 1% of the mean load."""
    c_E = load_E.double()
    return int((c_E < DEAD_SHARE * c_E.mean()).sum())


def token_entropy(scores_TE: torch.Tensor) -> torch.Tensor:
    """[T] entropy (nats) of each token's scores normalised to sum 1 (sigmoid scores too)."""
    q_TE = scores_TE.double()
    q_TE = q_TE / q_TE.sum(-1, keepdim=True)
    return -torch.special.xlogy(q_TE, q_TE).sum(-1)


def router_entropy(scores_TE: torch.Tensor) -> float:
    """Mean over tokens of the entropy of their score distribution (nats)."""
    return float(token_entropy(scores_TE).mean())


def window_stats(routings: Sequence[Routing]) -> dict[str, float]:
    """Every docs/contract.md §4 statistic over a window of forwards (loads pooled)."""
    if not routings:
        raise ValueError("routings=[] must hold at least one Routing")
    load_E = sum(r.load.detach().cpu() for r in routings)
    demand_E = sum(r.demand.detach().cpu() for r in routings)
    tokens = sum(r.num_tokens for r in routings)
    entropy_sum = sum(float(token_entropy(r.scores.detach()).sum()) for r in routings)
    return {
        "load_entropy": load_entropy(load_E),
        "max_vio": max_vio(load_E),
        "load_cv": load_cv(load_E),
        "drop_fraction": drop_fraction(demand_E, load_E),
        "unrouted_fraction": sum(unrouted_count(r) for r in routings) / tokens,
        "dead_experts": float(dead_experts(load_E)),
        "router_entropy": entropy_sum / tokens,
    }


def routing_stats(routing: Routing) -> dict[str, float]:
    """Every docs/contract.md §4 statistic of one forward's Routing."""
    return window_stats([routing])
