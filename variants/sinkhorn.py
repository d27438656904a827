"""sinkhorn: balanced assignment by Sinkhorn normalisation in training (S-BASE, Clark et al.
2022, "Unified Scaling Laws for Routed Language Models", arXiv:2202.01169, Sec. 2.2 and App. A;
the balanced-assignment idea of BASE layers, Lewis et al. 2021, arXiv:2103.16716).

Shape legend: T tokens, E experts, K experts per token, A = T*K assignments.

This is the form of Megatron-Core's `--moe-router-load-balancing-type sinkhorn`
(`TopKRouter.sinkhorn_load_balancing` with `moe_utils.sinkhorn`), matched here:

- Training selection: Sinkhorn-normalise exp(u) (u = x W^T, in float32, no gradient) into an
  approximately doubly-stochastic plan,
      C = exp(u);  repeat { d0_t = 1/T / (sum_e d1_e C_te + eps);
                            d1_e = 1/E / (sum_t d0_t C_te + eps) }
      until mean_e |d1_e - d1_e(previous)| <= tol (1e-4), eps = 1e-8;  Pi = d1 * C * d0,
  and each token takes the top-K experts of its row of Pi. Clark et al. iterate the same
  row/column rescaling (their App. A) so that every expert is asked for by T K / E tokens.
- Eval selection: plain top-K of the activation below (no Sinkhorn).
- Combine weight (Megatron's `_sinkhorn_activation`): sigmoid(u_e) when K = 1, softmax(u)_e
  over all E when K > 1 (not renormalised over the K). The plan Pi only selects; it carries no
  gradient, the weight does.
- No auxiliary loss (Megatron asserts `moe_aux_loss_coeff == 0` with sinkhorn).
- Dropless by default; a `capacity_factor` drops overflow in token order.

Departure: Megatron loops until the tolerance is met with no bound; `sinkhorn_max_iters`
(default 1000) bounds the loop so a degenerate input can not hang a benchmark.
Defaults: top-1 (S-BASE routes each token to one expert), 8 experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .compute.assignments import Routing
from .contract.config import RouterGradConfig, check_int, check_number
from .contract.routing import Router, token_order_routing, topk


@dataclass
class SinkhornConfig(RouterGradConfig):
    note: ClassVar[str] = (
        "No auxiliary loss: training routes on the Sinkhorn-balanced plan of exp(u), so balance "
        "comes from the assignment itself (Clark et al. 2022)."
    )
    no_sparsemixer: ClassVar[str | None] = (
        "sinkhorn selects by its balanced transport plan, not by the logits"
    )
    top_k: int = 1
    sinkhorn_tol: float = 1e-4
    sinkhorn_max_iters: int = 1000

    def validate(self) -> None:
        super().validate()
        check_number(self, "sinkhorn_tol", positive=True)
        check_int(self, "sinkhorn_max_iters", 1)


def sinkhorn(logits_TE: torch.Tensor, tol: float = 1e-4, max_iters: int = 1000) -> torch.Tensor:
    """Megatron-Core's `moe_utils.sinkhorn`: the plan d1 * exp(u) * d0 (rows ~1/T, cols ~1/E)."""
    cost_TE = torch.exp(logits_TE)
    T, E = cost_TE.shape
    d0_T = cost_TE.new_ones(T)
    d1_E = cost_TE.new_ones(E)
    eps = 1e-8
    for _ in range(max_iters):
        d0_T = (1.0 / T) / ((d1_E * cost_TE).sum(1) + eps)
        d1_new_E = (1.0 / E) / ((d0_T[:, None] * cost_TE).sum(0) + eps)
        error = (d1_new_E - d1_E).abs().mean()
        d1_E = d1_new_E
        if error <= tol:
            break
    return d1_E * cost_TE * d0_T[:, None]


class SinkhornRouter(Router):
    def score(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """Megatron's `_sinkhorn_activation`: sigmoid for top-1, softmax over E for top-K."""
        if self.cfg.top_k == 1:
            return torch.sigmoid(logits_TE)
        return F.softmax(logits_TE, dim=-1)

    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg, T, K = self.cfg, x_TD.shape[0], self.cfg.top_k
        logits_TE = self.logits(x_TD)
        scores_TE = self.score(logits_TE)
        if self.training:
            with torch.no_grad():
                plan_TE = sinkhorn(logits_TE.float(), cfg.sinkhorn_tol, cfg.sinkhorn_max_iters)
            expert_TK = topk(plan_TE, K)[1]
        else:
            expert_TK = topk(scores_TE.detach(), K)[1]
        weight_TK = scores_TE.gather(1, expert_TK)
        routing, _ = token_order_routing(
            expert_TK, weight_TK, scores_TE, logits_TE, cfg.capacity(T)
        )
        return routing, {}
