"""phimoe: Phi-3.5-MoE's block (HF transformers `PhimoeSparseMoeBlock`, transformers 5.25,
models/phimoe/modeling_phimoe.py), routed by SparseMixer (GRIN, Liu et al. 2024,
arXiv:2409.12136).

Shape legend: T tokens, E experts, A assignments.

- Router: logits u = x W^T; SparseMixer's two choices and weights
  (`variants.contract.sparsemixer`): each choice among the experts within a relative
  `jitter_eps` band of the best remaining one (the jitter threshold, HF `router_jitter_noise`
  = 0.01), argmax in eval, sampled in training; its weight is its probability under the softmax
  of that band (the two weights need not sum to 1). In training the weights' gradient is the
  Heun's-method estimator of the paper as HF codes it, not the softmax's own: a training run
  differs from plain top-2 in its gradients (and, by the sampling, in its choices).
- SwiGLU experts, no shared expert, dropless.
- Balance: HF's `load_balancing_loss_func` (softmax over E, the deterministic top-2 of it,
  not SparseMixer's samples) with `router_aux_loss_coef` c = 0.001 is K times the suite's
  form, so balance_coef = 2c = 0.002; f counts the top-2 of the softmax, as HF does.
- Departure: HF's `input_jitter_noise` (default 0: multiplicative input noise in training)
  is not implemented.
- Defaults: HF's `PhimoeConfig`: E = 16, top-2, expert width 6400 at d_model 4096 (1.5625
  d_model: 800 at the suite's d_model 512).
Parity with HF's block, eval and training (same seed): tests/variants/test_shipped_parity.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .compute.assignments import Routing, make_routing
from .contract.config import BalanceScopeConfig, check_number
from .contract.routing import Router, flatten_topk, scoped_balance_loss
from .contract.sparsemixer import sparsemixer


@dataclass
class PhimoeConfig(BalanceScopeConfig):
    note: ClassVar[str] = (
        "0.002 · E · Σ_i f_i P_i, f_i from the top-2 of the softmax (HF's router_aux_loss_coef "
        "0.001 on its K-times-larger form)."
    )
    dropless: ClassVar[str | None] = "phimoe is dropless: every selected expert computes"
    fixed_top_k: ClassVar[tuple[int, str] | None] = (2, "for phimoe (SparseMixer picks two)")
    num_experts: int = 16
    top_k: int = 2
    expert_hidden: int = 800
    activation: str = "swiglu"
    jitter_eps: float = 0.01
    balance_coef: float = 0.002

    @property
    def draws_over_the_batch(self) -> bool:
        # SparseMixer samples the first choice of every token, then every second choice (HF's
        # order): micro-batches or ranks consume the stream in another order
        return True

    def validate(self) -> None:
        super().validate()
        check_number(self, "jitter_eps", minimum=0)
        check_number(self, "balance_coef", minimum=0)


class PhimoeRouter(Router):
    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg, E = self.cfg, self.cfg.num_experts
        logits_TE = self.logits(x_TD)
        weight_TK, expert_TK = sparsemixer(logits_TE, cfg.jitter_eps, self.training)
        token_A, expert_A, weight_A = flatten_topk(expert_TK, weight_TK)
        demand_E = torch.bincount(expert_A, minlength=E)
        probs_TE = F.softmax(logits_TE, dim=-1)
        routing = make_routing(token_A, expert_A, weight_A, probs_TE, logits_TE, demand_E)
        losses = {}
        if self.training:
            top_TK = probs_TE.topk(cfg.top_k, dim=-1).indices  # HF's loss: softmax top-2
            top_token_A, top_expert_A, _ = flatten_topk(top_TK, top_TK)
            balance = scoped_balance_loss(self, top_expert_A, top_token_A, probs_TE, num_seqs)
            losses["balance"] = cfg.balance_coef * balance
        return routing, losses
