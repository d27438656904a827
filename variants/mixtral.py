"""mixtral: sparse top-2 routing of Mixtral 8x7B (Jiang et al. 2024, arXiv:2401.04088).

Shape legend: T tokens, E experts, K = top_k experts per token, A assignments.

- Router (Sec. 2.1, Eq. 1-2): G(x) = Softmax(TopK(x W^T)): the top-K logits are softmaxed
  among themselves, i.e. softmax over E then renormalised over the K selected.
- Dropless: every choice is computed (`capacity_factor` must stay None).
- Balance loss: the paper states none; we use the Switch form every Mixtral trainer uses,
  `balance_coef * E * sum_i f_i P_i` with f_i = assignments to i / (T K) (demand) and
  P_i = mean_t softmax_i. The contract's normalisation: 1 under perfect balance (times the
  coefficient). `balance_scope` (micro_batch, sequence, global_batch) sets which tokens f counts.
  HF transformers' Mixtral `load_balancing_loss_func` sums the one-hot choices over the K slots
  without dividing by K, so its value is K times this one (2x for top-2) at the same
  coefficient, so an HF `router_aux_loss_coef` c corresponds to balance_coef = K * c here.
- `router_grad` (`variants.contract.config.RouterGradConfig`): `sparsemixer` selects the two
  experts and their weights by SparseMixer instead of Eq. 1-2 (as Phi-3.5-MoE, whose loss
  also counts the plain top-2, not SparseMixer's samples).
- Defaults: 8 experts, top-2 (Mixtral 8x7B). Departure: the activation stays the suite's
  default gelu (Mixtral's experts are SwiGLU: pass activation="swiglu").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F

from .compute.assignments import Routing, make_routing
from .contract.config import BalanceScopeConfig, RouterGradConfig, check_number
from .contract.routing import Router, flatten_topk, scoped_balance_loss, topk


@dataclass
class MixtralConfig(BalanceScopeConfig, RouterGradConfig):
    note: ClassVar[str] = (
        "0.01 · E · Σ_i f_i P_i with f_i = count_i / (T·K); HF transformers' Mixtral loss is K "
        "times this."
    )
    dropless: ClassVar[str | None] = "mixtral is dropless: every selected expert computes"
    no_sparsemixer: ClassVar[str | None] = None
    num_experts: int = 8
    top_k: int = 2
    balance_coef: float = 0.01

    def validate(self) -> None:
        super().validate()
        check_number(self, "balance_coef", minimum=0)


def top_k_softmax(logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_TK, expert_TK): the top-k logits, softmaxed among themselves (Eq. 1-2)."""
    top_logits_TK, expert_TK = topk(logits_TE, k)
    return F.softmax(top_logits_TK, dim=-1), expert_TK


class MixtralRouter(Router):
    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg, E, K = self.cfg, self.cfg.num_experts, self.cfg.top_k
        logits_TE = self.logits(x_TD)
        probs_TE = F.softmax(logits_TE, dim=-1)
        rule = partial(top_k_softmax, logits_TE, K)
        weight_TK, expert_TK = self.select(logits_TE, rule)
        token_A, expert_A, weight_A = flatten_topk(expert_TK, weight_TK)
        demand_E = torch.bincount(expert_A, minlength=E)
        routing = make_routing(token_A, expert_A, weight_A, probs_TE, logits_TE, demand_E)
        losses = {}
        if self.training:
            counted_TK = self.counted(expert_TK, rule)
            token_A, expert_A, _ = flatten_topk(counted_TK, counted_TK)
            balance = scoped_balance_loss(self, expert_A, token_A, probs_TE, num_seqs)
            losses["balance"] = cfg.balance_coef * balance
        return routing, losses
