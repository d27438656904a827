"""gshard: GShard top-2 gating (Lepikhin et al. 2020, arXiv:2006.16668, Algorithm 1).

Shape legend: T tokens, E experts, K = 2 choices, A assignments.

- Router: softmax over E; first choice e1 = argmax, second e2 = argmax of the rest.
  Combine weights g1/(g1+g2) and g2/(g1+g2).
- Random routing (training only): the second choice is kept with probability
  min(1, 2 * g2/(g1+g2)); eval keeps every second choice, so eval routing is deterministic.
  `demand` counts what is asked after this draw and before capacity.
- Capacity `ceil(capacity_factor * 2T / E)` (default factor 1.0, so 2T/E): all first choices
  fill the experts before any second choice, each group in token order (the paper's
  "group-level" dispatch). Applied in eval too; capacity_factor=None is dropless.
- Balance loss: `balance_coef * E * sum_i f_i P_i`, f_i = fraction of tokens whose FIRST choice
  is i (the paper's c_e/S counts first choices only), P_i = mean softmax probability.
  Optional ST-MoE z-loss as in switch.
- `router_grad` (`variants.contract.config.RouterGradConfig`): `sparsemixer` selects both
  choices and their weights by SparseMixer instead of the top-2 and g1/(g1+g2); random routing
  is then off (SparseMixer samples the second choice itself); capacity stays, and the loss's
  f counts the argmax (`Router.counted`), not the sampled first choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F

from .compute.assignments import Routing, make_routing
from .contract.config import BalanceScopeConfig, RouterGradConfig, check_number
from .contract.routing import Router, drop_over_capacity, flatten_topk, scoped_balance_inputs, topk
from .switch import softmax_losses


@dataclass
class GShardConfig(BalanceScopeConfig, RouterGradConfig):
    note: ClassVar[str] = (
        "0.01 · E · Σ_i f_i P_i with f_i from first choices only (Lepikhin et al. 2020)."
    )
    top_k: int = 2
    capacity_factor: float | None = 1.0
    balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    fixed_top_k: ClassVar[tuple[int, str] | None] = (2, "for gshard (top-2 gating)")
    no_sparsemixer: ClassVar[str | None] = None
    uneven_top_k: ClassVar[str | None] = (
        "gshard keeps a token's second choice at random in training (1 or 2 experts per token)"
    )

    def validate(self) -> None:
        super().validate()
        check_number(self, "balance_coef", minimum=0)
        check_number(self, "z_loss_coef", minimum=0)


def top2_normalised(probs_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_T2, expert_T2): the top-2 probabilities g1, g2 as g / (g1 + g2) (Algorithm 1)."""
    g_T2, expert_T2 = topk(probs_TE, 2)
    return g_T2 / g_T2.sum(-1, keepdim=True), expert_T2


class GShardRouter(Router):
    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg, T, E = self.cfg, x_TD.shape[0], self.cfg.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = F.softmax(logits_TE, dim=-1)
        rule = partial(top2_normalised, probs_TE)
        weight_T2, expert_T2 = self.select(logits_TE, rule)
        token_A, expert_A, weight_A = flatten_topk(expert_T2, weight_T2)
        choice_A = torch.arange(2, device=x_TD.device).repeat(T)  # 0 first, 1 second
        keep_A = torch.ones_like(choice_A, dtype=torch.bool)
        if self.training and cfg.router_grad != "sparsemixer":  # SparseMixer sampled it already
            keep_second_T = torch.rand(T, device=x_TD.device) < 2 * weight_T2[:, 1].detach()
            keep_A[1::2] = keep_second_T
        token_A, expert_A, weight_A = token_A[keep_A], expert_A[keep_A], weight_A[keep_A]
        choice_A = choice_A[keep_A]
        demand_E = torch.bincount(expert_A, minlength=E)
        capacity = cfg.capacity(T)
        priority_A = choice_A * T + token_A  # every first choice before any second choice
        token_A, expert_A, weight_A = drop_over_capacity(
            token_A, expert_A, weight_A, priority_A, capacity, E
        )
        routing = make_routing(token_A, expert_A, weight_A, probs_TE, logits_TE, demand_E, capacity)
        losses = {}
        if self.training:
            first_T = self.counted(expert_T2, rule)[:, 0]
            tokens_T = torch.arange(T, device=x_TD.device)
            f, p = scoped_balance_inputs(self, first_T, tokens_T, probs_TE, num_seqs)
            losses = softmax_losses(self, logits_TE, f, p)
        return routing, losses
