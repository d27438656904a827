"""xmoe: the X-MoE router (Chi et al. 2022, "On the Representation Collapse of Sparse Mixture of
Experts", NeurIPS 2022, arXiv:2204.09179, Sec. 3).

Shape legend: T tokens, D model width, R routing dim (d_e), E experts, K experts per token,
A kept assignments.

- Dimension reduction (Sec. 3.1): h' = W h with W [R, D] (`router.proj`), R = 16 << D, so
  routing runs in a low-dimensional space and does not pull the hidden states towards the
  expert centroids (the representation collapse of the linear router).
- L2 normalisation and cosine scores (Sec. 3.1, Eq. 6):
      s_e = cos(W h, e_e) / tau = <W h / |W h|, e_e / |e_e|> / tau,
  e_e the expert embeddings [E, R] (`router.weight`), tau a learnable temperature
  (`router.temperature`). `Routing.logits` holds s (the scores routed on). Its initial value
  is not stated in the paper; 0.07 here (`init_temperature`) is torchscale's fixed
  temperature constant.
- Gate (Sec. 3.1, Eq. 7): softmax(s) over E, top-K; the combine weight is the softmax
  probability, not renormalised (Switch-style top-1 by default).
- Balance loss (Sec. 3.2, Eq. 8): `balance_coef * E * sum_i f_i P_i`, f_i = share of
  assignments to i (demand), P_i = mean_t softmax(cos(W h, e) / tau0)_i with a FIXED
  temperature tau0 (`balance_temperature`; Sec. 4.1: 0.3 for the softmax gate, 0.07 for the
  sigmoid gate), so the loss does not pull the learnable tau. Coefficient 0.01 (the paper's
  pre-training value is not in its main text; Table 5 sweeps 0 to 0.1 in fine-tuning);
  `balance_scope` sets which tokens f counts.

Departures: the contract (docs/contract.md §2) describes `router.weight` as [E, D] centroids
with u = x @ weight.T; X-MoE's centroids live in the routing space, so here `router.weight` is
[E, R] and `Routing.logits` is s. The expert embeddings start orthogonal (gain 0.32, as in the
authors' torchscale code); torchscale also rescales e to norm 1.5 each step and leaves W h
unnormalised, whereas this file follows the paper's formula (both sides normalised), where the
scale of e does not matter. The temperature is clamped to >= 1e-4 (torchscale's
`_get_gating_temperature`) so it cannot change sign. R = 16 (Sec. 4.1: d_e = 16) and top-1
(`Top1Gate(use_xmoe=True)`) match the paper and the authors' code; torchscale computes the
balance loss as E^2 * mean_i(me_i ce_i) = E * sum_i f_i P_i, the form used here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .compute.assignments import Routing
from .contract.config import BalanceScopeConfig, RouterGradConfig, check_int, check_number
from .contract.routing import Router, scoped_balance_loss, token_order_routing, topk


@dataclass
class XMoEConfig(BalanceScopeConfig, RouterGradConfig):
    note: ClassVar[str] = (
        "0.01 · E · Σ_i f_i P_i with f_i = the share of assignments to i and P_i from "
        "softmax(cos / τ0) at a fixed τ0 = 0.3, not the gate's learnable τ (Chi et al. 2022, "
        "Eq. 8)."
    )
    no_sparsemixer: ClassVar[str | None] = (
        "xmoe selects on cosine scores over a learned temperature"
    )
    num_experts: int = 8
    top_k: int = 1
    routing_dim: int = 16
    init_temperature: float = 0.07
    balance_temperature: float = 0.3  # tau0 of Eq. 8, fixed (Sec. 4.1, softmax gate)
    balance_coef: float = 0.01

    def validate(self) -> None:
        super().validate()
        check_int(self, "routing_dim", 1)
        check_number(self, "init_temperature", positive=True)
        check_number(self, "balance_temperature", positive=True)
        check_number(self, "balance_coef", minimum=0)


def cosines(h_TR: torch.Tensor, emb_ER: torch.Tensor) -> torch.Tensor:
    """cos(h, e) (Eq. 6), both sides L2-normalised."""
    return F.normalize(h_TR, dim=-1, eps=1e-6) @ F.normalize(emb_ER, dim=-1, eps=1e-6).T


class XMoERouter(Router):
    def __init__(self, cfg: XMoEConfig) -> None:
        super().__init__(cfg)
        self.proj = nn.Parameter(torch.empty(cfg.routing_dim, cfg.d_model))
        nn.init.kaiming_uniform_(self.proj, a=5**0.5)
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.routing_dim))
        nn.init.orthogonal_(self.weight, gain=0.32)
        self.temperature = nn.Parameter(torch.tensor(float(cfg.init_temperature)))

    def centroid(self, expert: int) -> torch.Tensor:
        """[D]: scores are cosines in the projected space, so the input direction that raises
        `expert`'s most is its embedding brought back through the projection, proj^T e."""
        return self.proj.T @ self.weight[expert]

    def cosines(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, E] cos(W h, e_e) in the router's dtype."""
        with torch.autocast(x_TD.device.type, enabled=False):
            h_TR = x_TD.to(self.dtype) @ self.proj.to(self.dtype).T
            return cosines(h_TR, self.weight.to(self.dtype))

    def scale(self, cos_TE: torch.Tensor) -> torch.Tensor:
        """s = cos / tau (Eq. 6) with the learnable tau, kept > 0."""
        return cos_TE / self.temperature.to(cos_TE.dtype).clamp_min(1e-4)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.scale(self.cosines(x_TD))

    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg, T, K = self.cfg, x_TD.shape[0], self.cfg.top_k
        cos_TE = self.cosines(x_TD)
        logits_TE = self.scale(cos_TE)
        probs_TE = F.softmax(logits_TE, dim=-1)
        weight_TK, expert_TK = topk(probs_TE, K)
        routing, demand_A = token_order_routing(
            expert_TK, weight_TK, probs_TE, logits_TE, cfg.capacity(T)
        )
        losses = {}
        if self.training:
            # Eq. 8: P from the fixed tau0, not the learnable tau the gate uses
            balance_probs_TE = F.softmax(cos_TE / cfg.balance_temperature, dim=-1)
            balance = scoped_balance_loss(
                self, demand_A[1], demand_A[0], balance_probs_TE, num_seqs
            )
            losses["balance"] = cfg.balance_coef * balance
        return routing, losses
