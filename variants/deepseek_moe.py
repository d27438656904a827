"""deepseek_moe: fine-grained experts plus shared experts (Dai et al. 2024, arXiv:2401.06066).

Shape legend: T tokens, E routed experts, K routed experts per token, Dv devices, A assignments.

- Router (Eq. 3-5): s = softmax(x W^T) over the routed experts; each token takes its top-K;
  the combine weight is s itself, not renormalised over the K.
- `num_shared_experts` experts are applied to every token (the layer adds them).
- Dropless by default; a `capacity_factor` drops overflow in token order.
- Expert-level balance (Eq. 12-14): `alpha1 * sum_i f_i P_i`, f_i = E/(K T) * #tokens choosing
  i (before drops), P_i = mean_t s_{i,t}.
- Device-level balance (Eq. 15-17): experts are split into `num_devices` contiguous groups;
  `alpha2 * sum_d f'_d P'_d`, f'_d = mean of f_i over group d, P'_d = sum of P_i over group d.
  Off unless alpha2 > 0.
- `balance_scope` (`variants.contract.config.BalanceScopeConfig`): micro_batch (default, the paper),
  sequence, or global_batch (Qiu et al. 2025) for the expert-level f_i; the device-level term
  stays per micro-batch.
- Router z-loss (ST-MoE, Zoph et al. 2022, arXiv:2202.08906, Eq. 5; 1e-3 there), training only,
  off by default (not in DeepSeekMoE): `z_loss_coef * mean_t logsumexp(u_t)^2`, as switch.
- Qwen2-MoE options (`variants.contract.config.SharedExpertConfig`, off by default): `shared_gate`
  (sigmoid gate on the shared output), `shared_hidden` (shared width), `norm_topk_prob`
  (renormalise the K weights; the paper does not).
- `router_grad` (`variants.contract.config.RouterGradConfig`): `sparsemixer` (top_k=2,
  norm_topk_prob off) selects the two experts and their weights by SparseMixer from the
  logits instead of Eq. 3-5; capacity applies to its choices, while the losses' f counts the
  plain top-2 (`Router.counted`), as HF's loss for Phi-3.5-MoE does.
- Defaults follow DeepSeekMoE 2B: 1 shared + 63 routed experts, 7 routed per token
  (granularity m=4 over N=16 with K=2: mN - Ks routed, mK - Ks active).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F

from .compute.assignments import Routing
from .contract.config import (
    BalanceScopeConfig,
    RouterGradConfig,
    SharedExpertConfig,
    check_divides,
    check_int,
    check_number,
)
from .contract.routing import (
    Router,
    f_dot_p,
    flatten_topk,
    norm_topk,
    scoped_balance_loss,
    token_order_routing,
    topk,
)
from .contract.routing import z_loss as router_z_loss


@dataclass
class DeepSeekMoEConfig(SharedExpertConfig, BalanceScopeConfig, RouterGradConfig):
    note: ClassVar[str] = (
        "α1 · Σ_i f_i P_i with f_i = E/(K·T) · count_i, α1 = 0.01; device balance α2 = 0 "
        "unless set (Dai et al. 2024)."
    )
    no_sparsemixer: ClassVar[str | None] = None
    num_experts: int = 63
    top_k: int = 7
    expert_hidden: int = 256
    num_shared_experts: int = 1
    alpha1: float = 0.01
    alpha2: float = 0.0
    num_devices: int = 1
    z_loss_coef: float = 0.0

    @property
    def loss_scope(self) -> str:
        """The device loss (alpha2 > 0) counts this forward's tokens whatever `balance_scope`."""
        return "micro_batch" if self.alpha2 > 0 else self.balance_scope

    def validate(self) -> None:
        super().validate()
        check_number(self, "alpha1", minimum=0)
        check_number(self, "alpha2", minimum=0)
        check_number(self, "z_loss_coef", minimum=0)
        check_int(self, "num_devices", 1)
        check_divides(self, "num_devices", "num_experts")


def expert_fraction(demand_E: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """f_i = E/(K T) * #assignments to i; 1 for every i under perfect balance (Eq. 13)."""
    E = demand_E.shape[-1]
    return demand_E.float() * E / (top_k * num_tokens)


def device_balance(f_E: torch.Tensor, p_E: torch.Tensor, num_devices: int) -> torch.Tensor:
    """sum_d f'_d P'_d with f'_d the mean of f over group d, P'_d the sum of P (Eq. 15-17)."""
    f_dG = f_E.unflatten(-1, (num_devices, -1))
    p_dG = p_E.unflatten(-1, (num_devices, -1))
    return f_dot_p(f_dG.mean(-1), p_dG.sum(-1))


def top_k_scores(
    scores_TE: torch.Tensor, k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_TK, expert_TK): the top-k scores as weights (Eq. 3-5), renormalised over the k
    where `norm_topk_prob`."""
    weight_TK, expert_TK = topk(scores_TE, k)
    return norm_topk(weight_TK, norm_topk_prob), expert_TK


class DeepSeekMoERouter(Router):
    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg, T, K = self.cfg, x_TD.shape[0], self.cfg.top_k
        logits_TE = self.logits(x_TD)
        scores_TE = F.softmax(logits_TE, dim=-1)
        rule = partial(top_k_scores, scores_TE, K, cfg.norm_topk_prob)
        weight_TK, expert_TK = self.select(logits_TE, rule)
        routing, _ = token_order_routing(
            expert_TK, weight_TK, scores_TE, logits_TE, cfg.capacity(T)
        )
        losses = {}
        if self.training:
            # f counts demand (before drops): the choices, or the plain top-K under SparseMixer
            counted_TK = self.counted(expert_TK, rule)
            token_A, expert_A, _ = flatten_topk(counted_TK, counted_TK)
            demand_E = torch.bincount(expert_A, minlength=cfg.num_experts)
            f_E, p_E = expert_fraction(demand_E, T, K), scores_TE.mean(0)
            # E/(K T) * count = E * share: the scoped share, times E (Eq. 13)
            balance = scoped_balance_loss(self, expert_A, token_A, scores_TE, num_seqs)
            losses["balance"] = cfg.alpha1 * balance
            if cfg.alpha2 > 0:
                losses["device_balance"] = cfg.alpha2 * device_balance(f_E, p_E, cfg.num_devices)
            if cfg.z_loss_coef > 0:
                losses["z"] = cfg.z_loss_coef * router_z_loss(logits_TE)
        return routing, losses
