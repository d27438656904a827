"""expert_choice: experts choose their tokens (Zhou et al. 2022, arXiv:2202.09368, Sec. 3.2).

Shape legend: T tokens, D model width, E experts, C tokens per expert (capacity),
A = E * C assignments; B sequences of S positions (T = B * S, token t = b * S + s).

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
- `selection_scope` (departure, added for causal LMs): "batch" [default] is the paper's rule
  above, over all T tokens of the forward. "position" views the tokens as [B, S] and, at each
  position s, each expert takes its top C_pos = ceil(capacity_factor * B / E) of the B tokens
  at s, so a token's routing depends only on other sequences' tokens at its own position, never
  on its own sequence's future; `leaks_future_tokens` is then False. Each expert takes
  S * C_pos tokens (the Routing's capacity), E * S * C_pos assignments in all. This twin
  measures how much of expert choice's advantage in a causal LM comes from seeing the future.
  C_pos rounds up at every position, so where capacity_factor * B / E is not whole a token
  averages E * C_pos / B > capacity_factor experts (B = 1: all E); the runner measures it
  (variable_k: experts_per_token, active FLOPs from its mean).
- `top_k` plays no part in routing (experts choose). The average number of experts per token
  is E*C/T ~ capacity_factor, so top_k must equal capacity_factor: iso-compute accounting that
  reads top_k then counts the right expert FLOPs. This also keeps C <= T (capacity_factor <= E).
- Selection runs over all T tokens of the forward (the paper's batch) or per position;
  capacity applies in eval too (it is the routing rule, not a training-only drop). Departure:
  the paper's "capped" variant that limits experts per token with a linear program is not
  implemented.
- force_uniform_routing: expert e takes tokens (e*C + j) mod T, j < C (round robin), so timing
  runs see the same E*C assignments as real routing; with "position" the same round robin runs
  over the B sequences at every position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .compute.assignments import Routing, make_routing
from .contract.config import MoEConfig, check_choice
from .contract.routing import Router, topk

# over which tokens an expert picks its top C: the paper's whole forward, or one position
SELECTION_SCOPES = ("batch", "position")


@dataclass
class ExpertChoiceConfig(MoEConfig):
    note: ClassVar[str] = (
        "No balance loss: each expert picks its top tokens, so load is balanced by construction. "
        "With selection_scope=batch (the paper's rule) an expert's choice depends on later tokens "
        "of the sequence, which leaks the future in a causal LM; selection_scope=position picks "
        "among the tokens at one position and does not."
    )
    variable_k: ClassVar[bool] = True
    uneven_top_k: ClassVar[str | None] = "expert choice gives a token 0..E experts"
    token_choice: ClassVar[bool] = False  # experts choose tokens

    top_k: int = 2
    capacity_factor: float | None = 2.0
    selection_scope: str = "batch"

    @property
    def leaks_future_tokens(self) -> bool:
        """Only the paper's batch-wide choice ranks a token against its own sequence's future."""
        return self.selection_scope == "batch"

    def validate(self) -> None:
        super().validate()
        check_choice(self, "selection_scope", SELECTION_SCOPES)
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
        """Tokens per expert `ceil(capacity_factor * T / E)` (<= T since capacity_factor <= E).

        With selection_scope "position", pass B: the tokens per expert at each position."""
        return math.ceil(self.capacity_factor * num_tokens / self.num_experts)


def seq_len(num_tokens: int, num_seqs: int) -> int:
    """S of the [B, S] token grid; position scope needs every sequence the same length."""
    if num_tokens % num_seqs:
        raise ValueError(
            f"selection_scope='position' needs equal-length sequences: {num_tokens} tokens "
            f"is not divisible by num_seqs={num_seqs}"
        )
    return num_tokens // num_seqs


def position_tokens(seq_SEC: torch.Tensor) -> torch.Tensor:
    """Per-position sequence choices [S, E, C_pos] -> expert-major token ids [E, S * C_pos]."""
    S, E, C = seq_SEC.shape
    pos_S11 = torch.arange(S, device=seq_SEC.device).view(S, 1, 1)
    token_SEC = seq_SEC * S + pos_S11  # sequence-major: token t = b * S + s
    return token_SEC.permute(1, 0, 2).reshape(E, S * C)


class ExpertChoiceRouter(Router):
    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        logits_TE = self.logits(x_TD)
        scores_TE = F.softmax(logits_TE, dim=-1)
        if self.cfg.selection_scope == "position":
            token_EC, weight_EC = self.choose_per_position(scores_TE, num_seqs)
        else:
            weight_EC, token_EC = topk(scores_TE.T, self.cfg.capacity(x_TD.shape[0]))
        return self.expert_major(token_EC, weight_EC, scores_TE, logits_TE), {}

    def choose_per_position(
        self, scores_TE: torch.Tensor, num_seqs: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token_EC, weight_EC), C = S * C_pos: at each position each expert takes its top
        C_pos of the B tokens there, so no token is ranked against its own sequence."""
        T, E = scores_TE.shape
        S = seq_len(T, num_seqs)
        scores_SEB = scores_TE.view(num_seqs, S, E).permute(1, 2, 0)
        weight_SEC, seq_SEC = topk(scores_SEB, self.cfg.capacity(num_seqs))
        weight_EC = weight_SEC.permute(1, 0, 2).reshape(E, -1)
        return position_tokens(seq_SEC), weight_EC

    def uniform(self, x_TD: torch.Tensor, num_seqs: int = 1) -> Routing:
        """Round robin: expert e takes tokens (e*C + j) mod T, weight 1/capacity_factor; with
        position scope, sequences (e*C_pos + j) mod B at every position."""
        logits_TE = self.logits(x_TD)
        scores_TE = F.softmax(logits_TE, dim=-1)
        T, E = scores_TE.shape
        if self.cfg.selection_scope == "position":
            S, C_pos = seq_len(T, num_seqs), self.cfg.capacity(num_seqs)
            seq_EC = torch.arange(E * C_pos, device=x_TD.device).view(E, C_pos) % num_seqs
            token_EC = position_tokens(seq_EC.expand(S, E, C_pos))
        else:
            C = self.cfg.capacity(T)
            token_EC = torch.arange(E * C, device=x_TD.device).view(E, C) % T
        weight_EC = scores_TE.new_full(token_EC.shape, 1.0 / self.cfg.capacity_factor)
        return self.expert_major(token_EC, weight_EC, scores_TE, logits_TE)

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
