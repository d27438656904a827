"""topp: dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic
Routing in MoE Models", ACL 2024, arXiv:2403.07652, Sec. 3).

Shape legend: T tokens, E experts, A kept assignments (between T and T*E).

- Router (Eq. 1): P = softmax(x W^T) over the E experts.
- Selection (Eq. 2-3): sort P descending; a token keeps the fewest experts whose probabilities
  sum to at least p (`top_p`, paper default 0.4):
      t = argmin_{k} { k : sum_{j<=k} P_{I_j} >= p },  S = {I_1, ..., I_t}.
  At least one expert per token; a confident token takes one, an uncertain one takes several.
- Output (Eq. 4): y = sum_{e in S} P_e * FFN_e(x): the probability itself, not renormalised.
- Dynamic loss (Eq. 5): `dynamic_coef * mean_t( -sum_e P_e log P_e )`, the entropy of each
  token's distribution (minimising it stops the router from spreading P thin to activate many
  experts). Paper coefficient beta = 1e-4.
- Balance loss (Eq. 6-7): `balance_coef * E * sum_i f_i Q_i`, Q_i = mean_t P_i, f_i = share of
  the demanded assignments that go to expert i (sum_i f_i = 1, so perfect balance gives 1 for
  any number of experts per token). Paper coefficient alpha = 1e-2. `balance_scope` sets
  which tokens f counts (micro_batch by default).
- Dropless: every selected expert computes. `top_k` is not used by the routing; it is the
  nominal K the iso-compute helper sizes against (the paper compares with top-2).

Loss names: the contract (docs/contract.md §2) fixes the names of `losses`; the balance term
is `balance` and the dynamic (entropy) loss is reported as `z` (a router-confidence
regulariser like the ST-MoE z-loss: both push the router towards sharper distributions).

Reference code: the authors' released inference code (github.com/ZhenweiAn/Dynamic_MoE,
`top_p_sampling_batched_all_sequence`, `top_p_threshold=0.4`) keeps the experts up to the first
whose cumulative sum is strictly > p, with the unrenormalised probabilities as weights: the same
as here except at an exact tie (sum == p), where it keeps one expert more than Eq. 3's ">=".

Notes: no cap on experts per token (the paper has none): with a near-uniform router early in
training a token may take many experts. Defaults: p = 0.4 (checked against the authors'
config); the loss coefficients (alpha = 1e-2, beta = 1e-4) are those of the paper's Sec. 4.1,
not checked against code (the authors released inference code only); E = 16 keeps the layer
CPU-small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .compute.assignments import Routing, make_routing
from .contract.config import BalanceScopeConfig, check_number
from .contract.routing import Router, mask_to_assignments, scoped_balance_loss


@dataclass
class TopPConfig(BalanceScopeConfig):
    note: ClassVar[str] = (
        "Balance 0.01 · E · Σ_i f_i P_i with f_i = the share of assignments to i, so 1 under "
        "perfect balance for any number of experts per token; dynamic (entropy) loss 1e-4 · "
        "mean_t(−Σ_e P_e log P_e), reported as z (Huang et al. 2024)."
    )
    dropless: ClassVar[str | None] = "topp computes every selected expert"
    uneven_top_k: ClassVar[str | None] = "top-p routing gives a token 1..E experts"
    variable_k: ClassVar[bool] = True
    num_experts: int = 16
    top_p: float = 0.4
    balance_coef: float = 1e-2
    dynamic_coef: float = 1e-4

    def validate(self) -> None:
        super().validate()
        check_number(self, "top_p", positive=True)
        if self.top_p > 1:
            raise ValueError(f"top_p={self.top_p} must be <= 1 (a cumulative probability)")
        check_number(self, "balance_coef", minimum=0)
        check_number(self, "dynamic_coef", minimum=0)


def top_p_mask(probs_TE: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool [T, E]: the fewest highest-probability experts whose sum reaches top_p (Eq. 2-3).

    An expert is kept when the mass strictly before it (in descending order) is still < p.
    """
    sorted_TE, order_TE = probs_TE.sort(dim=-1, descending=True, stable=True)
    before_TE = sorted_TE.cumsum(-1) - sorted_TE
    keep_sorted_TE = before_TE < top_p
    keep_sorted_TE[:, 0] = True  # float rounding must never leave a token without an expert
    return torch.zeros_like(keep_sorted_TE).scatter(1, order_TE, keep_sorted_TE)


def entropy_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """Dynamic loss (Eq. 5): mean over tokens of -sum_e P_e log P_e."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1).mean()


class TopPRouter(Router):
    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg, E = self.cfg, self.cfg.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = F.softmax(logits_TE, dim=-1)
        keep_TE = top_p_mask(probs_TE.detach(), cfg.top_p)
        token_A, expert_A, weight_A = mask_to_assignments(keep_TE, probs_TE)
        demand_E = torch.bincount(expert_A, minlength=E)
        routing = make_routing(token_A, expert_A, weight_A, probs_TE, logits_TE, demand_E)
        losses = {}
        if self.training:
            balance = scoped_balance_loss(self, expert_A, token_A, probs_TE, num_seqs)
            losses["balance"] = cfg.balance_coef * balance
            losses["z"] = cfg.dynamic_coef * entropy_loss(probs_TE)
        return routing, losses
