"""switch: Switch Transformer top-1 routing (Fedus et al. 2021, arXiv:2101.03961).

Shape legend: T tokens, D model width, E experts, A kept assignments.

- Router: p = softmax(x W^T) over E (Eq. 1); each token goes to argmax p; its combine weight is
  that probability p_i(x), not renormalised (Eq. 2).
- Capacity: `ceil(capacity_factor * T / E)` per expert (Eq. 3, default 1.25). Overflow is
  dropped in token order: earlier tokens keep their place. Applied in eval too (the paper
  evaluates with a capacity factor as well); set capacity_factor=None for dropless.
- Balance loss (Eq. 4-6): `balance_coef * E * sum_i f_i P_i`, f_i = fraction of tokens whose
  top-1 is i (before drops), P_i = mean router probability of i. `balance_scope` (micro_batch,
  sequence, global_batch; `variants.contract.config.BalanceScopeConfig`) sets which tokens f counts.
- Router z-loss (ST-MoE, Zoph et al. 2022, arXiv:2202.08906, Eq. 5), training only, off by
  default: `z_loss_coef * mean_t logsumexp(u_t)^2`.
- Input jitter (Switch Sec. 2.4, "multiplicative jitter noise"), training only, off by
  default: the router sees `x * U(1 - jitter_eps, 1 + jitter_eps)`. `Routing.logits` stays the
  un-jittered `x W^T`; `scores` are the probabilities actually routed on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .compute.assignments import Routing, make_routing
from .contract.config import BalanceScopeConfig, RouterGradConfig, check_number
from .contract.routing import (
    Router,
    drop_over_capacity,
    f_dot_p,
    flatten_topk,
    scoped_balance_inputs,
)
from .contract.routing import z_loss as router_z_loss


@dataclass
class SwitchConfig(BalanceScopeConfig, RouterGradConfig):
    note: ClassVar[str] = (
        "0.01 · E · Σ_i f_i P_i, f_i = fraction of tokens whose top-1 is i (Fedus et al. 2021); "
        "optional z-loss (default 0)."
    )
    top_k: int = 1
    capacity_factor: float | None = 1.25
    balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    # input jitter here (RouterGradConfig's SparseMixer band needs top_k=2, never switch's)
    jitter_eps: float = 0.0
    fixed_top_k: ClassVar[tuple[int, str] | None] = (1, "for switch (top-1 routing)")

    def validate(self) -> None:
        super().validate()
        check_number(self, "balance_coef", minimum=0)
        check_number(self, "z_loss_coef", minimum=0)
        check_number(self, "jitter_eps", minimum=0)
        if self.jitter_eps >= 1:
            raise ValueError(f"jitter_eps={self.jitter_eps} must be < 1")


def jittered_logits(router: Router, x_TD: torch.Tensor, eps: float) -> torch.Tensor:
    """Logits of `x * U(1-eps, 1+eps)` in training (Switch Sec. 2.4); plain logits otherwise."""
    if not router.training or eps == 0:
        return router.logits(x_TD)
    noise_TD = torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
    return router.logits(x_TD * noise_TD)


def softmax_losses(
    router: Router, logits_TE: torch.Tensor, f_E: torch.Tensor, p_E: torch.Tensor
) -> dict[str, torch.Tensor]:
    """`balance_coef * E * sum_i f_i P_i`, plus the z-loss when its coefficient is set.

    Shared by switch and gshard: only how f is counted differs between them.
    """
    cfg = router.cfg
    losses = {"balance": cfg.balance_coef * cfg.num_experts * f_dot_p(f_E, p_E).mean()}
    if cfg.z_loss_coef > 0:
        losses["z"] = cfg.z_loss_coef * router_z_loss(logits_TE)
    return losses


class SwitchRouter(Router):
    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg, T, E = self.cfg, x_TD.shape[0], self.cfg.num_experts
        logits_TE = self.logits(x_TD)
        routed_TE = jittered_logits(self, x_TD, cfg.jitter_eps)
        probs_TE = F.softmax(routed_TE, dim=-1)
        weight_T1, expert_T1 = probs_TE.max(dim=-1, keepdim=True)
        token_A, expert_A, weight_A = flatten_topk(expert_T1, weight_T1)
        demand_E = torch.bincount(expert_A, minlength=E)
        capacity = cfg.capacity(T)
        token_A, expert_A, weight_A = drop_over_capacity(
            token_A,
            expert_A,
            weight_A,
            token_A,
            capacity,
            E,  # priority: token order
        )
        routing = make_routing(token_A, expert_A, weight_A, probs_TE, logits_TE, demand_E, capacity)
        losses = {}
        if self.training:
            first_T = expert_T1.flatten()
            f, p = scoped_balance_inputs(
                self, first_T, torch.arange(T, device=x_TD.device), probs_TE, num_seqs
            )
            losses = softmax_losses(self, routed_TE, f, p)
        return routing, losses
