"""llama4: Llama 4's MoE block (HF transformers `Llama4TextMoe`, transformers 5.25,
models/llama4/modeling_llama4.py).

Shape legend: T tokens, E routed experts, K routed per token, A assignments.

- Router (`Llama4Router`): logits u = x W^T; top-K of the logits; the kept experts' scores are
  sigmoid(u) (the others are -inf before the sigmoid, so 0): no softmax, no renormalisation.
- The score multiplies the expert's INPUT: `routed_in = x * router_scores`, so
  y = shared(x) + sum_{kept e} FFN_e(sigmoid(u_e) x). The FFN is not linear, so this differs
  from weighting the output (`weight_on_input`: the layer runs its backend through
  `variants.compute.input_weighted`).
- One shared SwiGLU expert of the routed width, always on, not gated (`shared_expert`).
- Dropless. HF's block computes every expert on every token with zero scores for the others
  (its `Llama4TextExperts` is a dense bmm); with bias-free SwiGLU experts FFN(0) = 0, so only
  the kept experts contribute and this layer computes only those.
- Balance: HF's Llama 4 computes no auxiliary loss (no `load_balancing_loss_func` call), so
  `balance_coef` defaults to 0; set it for the suite's `coef E sum_i f_i P_i` with P from the
  softmax of the logits (variants/mixtral.py's form).
- Defaults: HF's `Llama4TextConfig` (Llama 4 Scout): E = 16, K = 1, one shared expert, expert
  width 8192 at d_model 5120 (1.6 d_model: 819 at the suite's d_model 512, rounded to 816).
Parity with HF's block: tests/variants/test_shipped_parity.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .compute.assignments import Routing, make_routing
from .contract.config import BalanceScopeConfig, check_number
from .contract.routing import Router, flatten_topk, scoped_balance_loss


@dataclass
class Llama4Config(BalanceScopeConfig):
    note: ClassVar[str] = (
        "None by default (HF's Llama 4 computes no balance loss); balance_coef · E · Σ_i f_i P_i "
        "when set."
    )
    dropless: ClassVar[str | None] = "llama4 is dropless: every selected expert computes"
    weight_on_input: ClassVar[bool] = True
    num_experts: int = 16
    top_k: int = 1
    expert_hidden: int = 816
    num_shared_experts: int = 1
    activation: str = "swiglu"
    balance_coef: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_number(self, "balance_coef", minimum=0)


class Llama4Router(Router):
    def score(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits_TE)

    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg, E, K = self.cfg, self.cfg.num_experts, self.cfg.top_k
        logits_TE = self.logits(x_TD)
        top_logits_TK, expert_TK = logits_TE.topk(K, dim=-1)
        weight_TK = torch.sigmoid(top_logits_TK)  # of the kept logits only
        token_A, expert_A, weight_A = flatten_topk(expert_TK, weight_TK)
        demand_E = torch.bincount(expert_A, minlength=E)
        routing = make_routing(
            token_A, expert_A, weight_A, self.score(logits_TE), logits_TE, demand_E
        )
        losses = {}
        if self.training and cfg.balance_coef > 0:
            probs_TE = F.softmax(logits_TE, dim=-1)
            balance = scoped_balance_loss(self, expert_A, token_A, probs_TE, num_seqs)
            losses["balance"] = cfg.balance_coef * balance
        return routing, losses
