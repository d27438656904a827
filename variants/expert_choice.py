"""expert_choice: experts choose their tokens (Zhou et al. 2022, arXiv:2202.09368, Sec. 3.2).

Shape legend: T tokens, D model width, E experts, C tokens per expert (capacity),
A = E * C assignments.

- Scores (Eq. 1): S = softmax(x W^T) over E, per token.
- Selection (Eq. 1): each expert takes the C tokens with its highest scores, G, I = TopK(S^T, C),
  with C = ceil(capacity_factor * T / E) (the paper's k = n c / e; default c = 2). A token may
  be taken by 0..E experts; one taken by none gets only the shared part (zero if none).
- Combine weight (Eq. 2): the score S[t, e] of the chosen (expert, token) pair.
- No balance loss: every expert takes exactly C tokens, so `demand == load == C` per expert.
- Causality: an expert ranks each token against every other token of the batch, including
  later tokens of the same sequence, so a token's routing depends on the future. In a causal
  language model this leaks future tokens (the paper evaluates on encoder-decoder and
  classification settings); `leaks_future_tokens` flags it for reports.
- `top_k` plays no part in routing (experts choose). The average number of experts per token
  is E*C/T ~ capacity_factor, so top_k must equal capacity_factor: iso-compute accounting that
  reads top_k then counts the right expert FLOPs. This also keeps C <= T (capacity_factor <= E).
- Selection runs over all T tokens of the forward (the paper's batch); capacity applies in
  eval too (it is the routing rule, not a training-only drop). Departure: the paper's
  "capped" variant that limits experts per token with a linear program is not implemented.
- force_uniform_routing: expert e takes tokens (e*C + j) mod T, j < C (round robin), so timing
  runs see the same E*C assignments as real routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .config import MoEConfig
from .routing import Router, Routing, make_routing


@dataclass
class ExpertChoiceConfig(MoEConfig):
    leaks_future_tokens: ClassVar[bool] = True
    variable_k: ClassVar[bool] = True
    uneven_top_k: ClassVar[str | None] = "expert choice gives a token 0..E experts"

    top_k: int = 2
    capacity_factor: float | None = 2.0

    def validate(self) -> None:
        super().validate()
        if self.capacity_factor is None:
            raise ValueError(
                "capacity_factor=None is not allowed for expert_choice: each expert takes "
                "ceil(capacity_factor * T / E) tokens, so it needs a number (paper default 2)"
            )
        if self.top_k != self.capacity_factor:
            raise ValueError(
                f"top_k={self.top_k} must equal capacity_factor={self.capacity_factor} for "
                "expert_choice: experts choose tokens, so the average experts per token is "
                "capacity_factor and top_k only records it"
            )

    def capacity(self, num_tokens: int) -> int:
        """Tokens per expert `ceil(capacity_factor * T / E)` (<= T since capacity_factor <= E)."""
        return math.ceil(self.capacity_factor * num_tokens / self.num_experts)


class ExpertChoiceRouter(Router):
    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        logits_TE = self.logits(x_TD)
        scores_TE = F.softmax(logits_TE, dim=-1)
        C = self.cfg.capacity(x_TD.shape[0])
        weight_EC, token_EC = scores_TE.T.topk(C, dim=-1)
        return self.expert_major(token_EC, weight_EC, scores_TE, logits_TE), {}

    def uniform(self, x_TD: torch.Tensor) -> Routing:
        """Round robin: expert e takes tokens (e*C + j) mod T, weight 1/capacity_factor."""
        logits_TE = self.logits(x_TD)
        scores_TE = F.softmax(logits_TE, dim=-1)
        T, E = scores_TE.shape
        C = self.cfg.capacity(T)
        slots_EC = torch.arange(E * C, device=x_TD.device).view(E, C)
        weight_EC = scores_TE.new_full((E, C), 1.0 / self.cfg.capacity_factor)
        return self.expert_major(slots_EC % T, weight_EC, scores_TE, logits_TE)

    def expert_major(
        self,
        token_EC: torch.Tensor,
        weight_EC: torch.Tensor,
        scores_TE: torch.Tensor,
        logits_TE: torch.Tensor,
    ) -> Routing:
        """Routing from per-expert token choices; assignments listed expert by expert."""
        E, C = token_EC.shape
        expert_A = torch.arange(E, device=token_EC.device).repeat_interleave(C)
        demand_E = torch.full((E,), C, dtype=torch.long, device=token_EC.device)
        return make_routing(
            token_EC.reshape(-1), expert_A, weight_EC.reshape(-1), scores_TE, logits_TE, demand_E, C
        )
