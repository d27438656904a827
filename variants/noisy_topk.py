"""noisy_topk: noisy top-k gating (Shazeer et al. 2017, arXiv:1701.06538, Sec. 2.1, App. A).

Shape legend: T tokens, D model width, E experts, K experts per token, A assignments.

- Gating (Eq. 3-5): H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i) in
  training; H = x W_g in eval (noise off, deterministic). G(x) = Softmax(KeepTopK(H(x), K)):
  the K largest H are kept and softmaxed among themselves. W_g is `router.weight`, W_noise is
  `router.noise_weight` [E, D]. `Routing.logits` is the clean x W_g; `Routing.scores` is
  softmax(H) over all E (the noisy affinities actually routed on, in training).
- Dropless (the paper balances with the losses below, it drops nothing).
- Importance loss (Eq. 6-7): `importance_coef * CV(Importance)^2`, Importance_i = sum_t G(x_t)_i.
- Load loss (App. A, Eq. 8-11): `load_coef * CV(Load)^2`, Load_i = sum_t P(x_t, i), the smooth
  estimate of how many tokens choose i:
      P(x, i) = Phi( ((x W_g)_i - kth_excluding(H(x), K, i)) / Softplus((x W_noise)_i) ),
  kth_excluding(v, K, i) = the K-th largest component of v leaving out v_i. For i inside the
  top K of H that is the (K+1)-th largest of H, otherwise the K-th (as in the authors'
  tensor2tensor code), so one top-(K+1) gives every threshold; hence top_k < num_experts.
  CV = std / mean with the population std (divide by E), as the authors' tensor2tensor
  `cv_squared` and the contract's `load_cv` do; torch's default sample std would differ by E/(E-1).
- Init: W_noise starts at zero as in the paper (App. A, "Initial Load Imbalance"), so the noise
  std starts at softplus(0) = log 2 for every expert. Departure: W_g keeps the suite's router
  init (the paper zeroes it too) so every variant starts from the same router.
- Defaults: k = 4 of 32 experts, w_importance = w_load = 0.1 (the paper's flat MoE-32 language
  model, Sec. 5.1 and App. B-C); the expert sizes (D 512, H 1024) are the paper's too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .compute.assignments import Routing, make_routing
from .contract.config import RouterGradConfig, check_number
from .contract.routing import Router, flatten_topk, topk


@dataclass
class NoisyTopKConfig(RouterGradConfig):
    note: ClassVar[str] = (
        "Importance 0.1 · CV(Σ_t G_t)² and load 0.1 · CV(L)² with the smooth normal-CDF load "
        "estimator (Shazeer et al. 2017)."
    )
    dropless: ClassVar[str | None] = "noisy_topk balances with its importance and load losses"
    no_sparsemixer: ClassVar[str | None] = (
        "noisy_topk selects on noisy logits, which its load loss models"
    )
    num_experts: int = 32
    top_k: int = 4
    importance_coef: float = 0.1
    load_coef: float = 0.1

    def validate(self) -> None:
        super().validate()
        if self.top_k >= self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} must be < num_experts={self.num_experts} for noisy_topk "
                "(the load estimator compares each expert with the (k+1)-th gate value)"
            )
        check_number(self, "importance_coef", minimum=0)
        check_number(self, "load_coef", minimum=0)


def cv_squared(v_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, population variance over mean^2 (Eq. 7)."""
    return v_E.var(correction=0) / v_E.mean().square()


def prob_in_topk(
    clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor, k: int
) -> torch.Tensor:
    """P(x, i) of App. A Eq. 9: probability that expert i stays in the top k when only its
    own noise is redrawn, Phi((clean_i - kth_excluding(noisy, k, i)) / std_i)."""
    top_TK1 = noisy_TE.topk(k + 1, dim=-1).values
    kth_T1, k1th_T1 = top_TK1[:, k - 1 : k], top_TK1[:, k : k + 1]
    is_in_TE = noisy_TE > k1th_T1  # in the top k: excluding it promotes the (k+1)-th
    threshold_TE = torch.where(is_in_TE, k1th_T1, kth_T1)
    # validate_args=False: a non-finite input gives that token NaN probabilities (and NaN
    # losses) instead of torch's support check raising (docs/contract.md §2, non-finite inputs)
    normal = torch.distributions.Normal(0.0, 1.0, validate_args=False)
    return normal.cdf((clean_TE - threshold_TE) / noise_std_TE)


class NoisyTopKRouter(Router):
    def __init__(self, cfg: NoisyTopKConfig) -> None:
        super().__init__(cfg)
        self.noise_weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.d_model))

    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg, E, K = self.cfg, self.cfg.num_experts, self.cfg.top_k
        logits_TE = self.logits(x_TD)
        gate_TE, noise_std_TE = logits_TE, None
        if self.training:
            noise_std_TE = F.softplus(x_TD.to(self.dtype) @ self.noise_weight.to(self.dtype).T)
            gate_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        top_TK, expert_TK = topk(gate_TE, K)
        weight_TK = F.softmax(top_TK, dim=-1)
        token_A, expert_A, weight_A = flatten_topk(expert_TK, weight_TK)
        demand_E = torch.bincount(expert_A, minlength=E)
        scores_TE = F.softmax(gate_TE, dim=-1)
        routing = make_routing(token_A, expert_A, weight_A, scores_TE, logits_TE, demand_E)
        losses = {}
        if self.training:
            importance_E = weight_A.new_zeros(E).index_add(0, expert_A, weight_A)
            load_E = prob_in_topk(logits_TE, gate_TE, noise_std_TE, K).sum(0)
            losses = {
                "importance": cfg.importance_coef * cv_squared(importance_E),
                "load": cfg.load_coef * cv_squared(load_E),
            }
        return routing, losses
