"""deepseek_v2: device-limited routing with three balance losses and device-level dropping.

DeepSeek-V2 (DeepSeek-AI 2024, arXiv:2405.04434, Sec. 2.2).

Shape legend: T tokens, E routed experts, K routed experts per token, V devices (the paper's
D expert groups, renamed here because D is the model width), B sequences, S sequence length,
A assignments.

- Affinity (Eq. 11): s = softmax(x W^T) over the routed experts; the combine weight of a chosen
  expert is s itself, not renormalised (Eq. 10), as in DeepSeekMoE.
- Device-limited routing (Sec. 2.2.2): experts form `num_devices` contiguous groups; each token
  first picks the `max_devices` (M) groups holding its highest-scoring experts (a group's score
  is its best expert's score), then its top-K among the experts of those M groups. A token
  therefore reaches at most M devices.
- Token dropping (Sec. 2.2.4), training only: each device may receive at most
  `ceil(capacity_factor * K * T / V)` assignments (factor 1.0: the average budget); on an
  over-full device the lowest-affinity assignments are dropped first. Eval never drops.
  Departure: the paper also exempts ~10% of training sequences from dropping; not done here.
- Balance losses (Eq. 12-20), training only, each computed per sequence (T = S in the
  formulas) and averaged over sequences, with demand counted before drops:
  expert   `alpha1 * sum_i f_i P_i`,    f_i = E/(K S) * #tokens choosing i, P_i = mean_t s_{i,t};
  device   `alpha2 * sum_d f'_d P'_d`,  f'_d = mean of f_i over group d, P'_d = sum of P_i in d;
  comm     `alpha3 * sum_d f''_d P''_d`, f''_d = V/(M S) * #tokens sending to d,
           P''_d = sum of P_i in d.
  Named `balance`, `device_balance`, `comm_balance`. `balance_scope` (default `sequence`)
  may count the expert-level f over the micro-batch or the global batch (Qiu et al. 2025);
  the device and communication terms stay per sequence.
- `Routing.capacity` is None: the capacity is per device, not per expert, so the padded backend
  sizes its buffers from the largest kept load instead (and force_uniform_routing, already
  balanced, drops nothing).
- Qwen2-MoE options (`variants.contract.config.SharedExpertConfig`, off by default): `shared_gate`,
  `shared_hidden`, `norm_topk_prob` (over the K selected, before any drop).
- Defaults follow DeepSeek-V2: 2 shared + 160 routed experts, 6 per token, 8 devices, M = 3,
  alpha1 = 0.003, alpha2 = 0.05, alpha3 = 0.02 (sizes kept CPU-small: expert_hidden 128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .compute.assignments import Routing, make_routing
from .contract.config import (
    BalanceScopeConfig,
    RouterGradConfig,
    SharedExpertConfig,
    check_divides,
    check_int,
    check_le,
    check_number,
)
from .contract.routing import (
    Router,
    count_per_sequence,
    f_dot_p,
    flatten_topk,
    group_limited_mask,
    norm_topk,
    scoped_balance_loss,
    topk,
    within_capacity,
)
from .deepseek_moe import device_balance, expert_fraction


@dataclass
class DeepSeekV2Config(SharedExpertConfig, BalanceScopeConfig, RouterGradConfig):
    note: ClassVar[str] = (
        "Three losses, each per sequence then averaged: expert α1 = 0.003, device α2 = 0.05, "
        "communication α3 = 0.02 (DeepSeek-AI 2024, arXiv:2405.04434)."
    )
    no_sparsemixer: ClassVar[str | None] = "deepseek_v2 selects within its device-limited groups"
    num_experts: int = 160
    top_k: int = 6
    expert_hidden: int = 128
    num_shared_experts: int = 2
    capacity_factor: float | None = 1.0
    num_devices: int = 8
    max_devices: int = 3
    alpha1: float = 0.003
    alpha2: float = 0.05
    alpha3: float = 0.02
    balance_scope: str = "sequence"  # Eq. 12-20 are computed per sequence

    def validate(self) -> None:
        super().validate()
        check_int(self, "num_devices", 1)
        check_divides(self, "num_devices", "num_experts")
        check_int(self, "max_devices", 1)
        check_le(self, "max_devices", "num_devices")
        reachable = self.max_devices * (self.num_experts // self.num_devices)
        if self.top_k > reachable:
            raise ValueError(
                f"top_k={self.top_k} must be <= max_devices * num_experts/num_devices="
                f"{reachable} (the experts a token can reach on its max_devices devices)"
            )
        check_number(self, "alpha1", minimum=0)
        check_number(self, "alpha2", minimum=0)
        check_number(self, "alpha3", minimum=0)

    def capacity(self, num_tokens: int) -> int | None:
        """None: V2 has no per-expert capacity (its budget is per device, see device_capacity)."""
        return None

    def device_capacity(self, num_tokens: int) -> int | None:
        """Per-device budget `ceil(capacity_factor * K * T / V)` (Sec. 2.2.4), None = dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * self.top_k * num_tokens / self.num_devices)


class DeepSeekV2Router(Router):
    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg, T, E, K = self.cfg, x_TD.shape[0], self.cfg.num_experts, self.cfg.top_k
        logits_TE = self.logits(x_TD)
        scores_TE = F.softmax(logits_TE, dim=-1)
        allowed_TE = group_limited_mask(
            scores_TE.detach(), cfg.num_devices, cfg.max_devices, per_group=1
        )
        masked_TE = scores_TE.detach().masked_fill(~allowed_TE, float("-inf"))
        expert_TK = topk(masked_TE, K)[1]
        weight_TK = norm_topk(scores_TE.gather(1, expert_TK), cfg.norm_topk_prob)
        token_A, expert_A, weight_A = flatten_topk(expert_TK, weight_TK)
        demand_E = torch.bincount(expert_A, minlength=E)
        losses = {}
        if self.training:
            losses = self.sequence_losses(token_A, expert_A, expert_TK, scores_TE, num_seqs)
        capacity = cfg.device_capacity(T)
        if self.training and capacity is not None:
            device_A = torch.div(expert_A, E // cfg.num_devices, rounding_mode="floor")
            # lowest affinity dropped first: serve each device in descending score
            keep_A = within_capacity(device_A, -weight_A.detach(), capacity, cfg.num_devices)
            token_A, expert_A, weight_A = token_A[keep_A], expert_A[keep_A], weight_A[keep_A]
        routing = make_routing(token_A, expert_A, weight_A, scores_TE, logits_TE, demand_E)
        return routing, losses

    def sequence_losses(
        self,
        token_A: torch.Tensor,
        expert_A: torch.Tensor,
        expert_TK: torch.Tensor,
        scores_TE: torch.Tensor,
        num_seqs: int,
    ) -> dict[str, torch.Tensor]:
        """The three balance losses of Eq. 12-20 from the demanded (pre-drop) assignments,
        per sequence then averaged over sequences."""
        cfg = self.cfg
        (T, E), K, V, M = scores_TE.shape, cfg.top_k, cfg.num_devices, cfg.max_devices
        S = T // num_seqs
        f_BE = expert_fraction(count_per_sequence(expert_A, token_A, num_seqs, S, E), S, K)
        p_BE = scores_TE.view(num_seqs, S, E).mean(1)
        sends_TV = scores_TE.new_zeros(T, V)
        sends_TV.scatter_(1, torch.div(expert_TK, E // V, rounding_mode="floor"), 1.0)
        f2_BV = sends_TV.view(num_seqs, S, V).sum(1) * V / (M * S)
        p2_BV = p_BE.unflatten(-1, (V, -1)).sum(-1)
        balance = f_dot_p(f_BE, p_BE).mean()
        if cfg.balance_scope != "sequence":  # E/(K S) * count = E * share
            balance = scoped_balance_loss(self, expert_A, token_A, scores_TE, num_seqs)
        return {
            "balance": cfg.alpha1 * balance,
            "device_balance": cfg.alpha2 * device_balance(f_BE, p_BE, V).mean(),
            "comm_balance": cfg.alpha3 * f_dot_p(f2_BV, p2_BV).mean(),
        }
