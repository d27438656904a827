"""deepseek_v3: sigmoid routing with auxiliary-loss-free balancing.

DeepSeek-V3 (DeepSeek-AI 2024, arXiv:2412.19437, Sec. 2.1.2) and the loss-free balancing paper
(Wang et al. 2024, arXiv:2408.15664, Algorithm 1).

Shape legend: T tokens, E routed experts, K routed per token, G groups, B sequences,
S sequence length, A assignments.

- Affinity (Eq. 15): s = sigmoid(x W^T). `score` picks another affinity of the released
  models that route the V3 way (`variants.contract.routing.SCORES`): `softmax` over the E
  experts (LongCat-Flash, ERNIE-4.5: HF `LongcatFlashTopkRouter`, `Ernie4_5_MoeTopKRouter`) or
  `sqrtsoftplus`, sqrt(softplus(u)) (DeepSeek-V4: HF `DeepseekV4TopKRouter`).
- Selection (Eq. 16): top-K of `s + b`, b = `router.expert_bias`. The bias only selects:
  it never enters the combine weight nor the losses.
- Node-limited routing (Sec. 2.1.2 "node-limited routing"): with `num_groups > 1` the experts
  form contiguous groups; a group's score is the sum of its K/topk_groups highest biased
  scores; only the `topk_groups` best groups are eligible. (HF's DeepSeek-V3 and GLM-4.5
  code sums a group's 2 best, which is K/topk_groups at V3's 8/4; they differ elsewhere.)
- Weight (Eq. 13, 17): s_i / sum of the selected s, times `routed_scaling_factor`.
- Dropless.
- Bias update (loss-free paper Alg. 1; V3 Sec. 2.1.2): once per optimizer step,
  b_i += bias_update_rate * sign(mean_load - load_i), from the load of the training forwards
  since the last `update_bias()`. Eval forwards count nothing. In data-parallel training,
  all-reduce `router.load_count` (a buffer) before `update_bias()`.
- Complementary sequence-wise balance loss (Eq. 17-20), per sequence then averaged:
  `alpha * sum_i f_i P_i`, f_i = E/(K S) * #tokens of the sequence choosing i,
  P_i = mean over the sequence of s'_{i,t} = s_{i,t} / sum_j s_{j,t}. Default alpha = 1e-4.
  `balance_scope` (default `sequence`, the paper) may count f over the micro-batch or the
  global batch instead (Qiu et al. 2025).
- Qwen2-MoE options (`variants.contract.config.SharedExpertConfig`): `shared_gate`, `shared_hidden`
  (off by default) and `norm_topk_prob` (on by default: Eq. 13; False gives s_i * scale).
- Defaults follow V3: 256 routed experts, 8 per token, 1 shared, 8 groups, 4 groups per token.
  Departure: `routed_scaling_factor` defaults to 1.0 (the paper's model uses 2.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .compute.assignments import Routing, make_routing
from .contract.config import (
    BalanceScopeConfig,
    RouterGradConfig,
    SharedExpertConfig,
    check_choice,
    check_divides,
    check_int,
    check_le,
    check_number,
)
from .contract.routing import (
    SCORES,
    Router,
    flatten_topk,
    group_limited_mask,
    norm_topk,
    scoped_balance_loss,
    topk,
)


@dataclass
class DeepSeekV3Config(SharedExpertConfig, BalanceScopeConfig, RouterGradConfig):
    note: ClassVar[str] = (
        "Auxiliary-loss-free: a per-expert bias steers top-K selection (update rate 1e-3 per "
        "step), plus a sequence-wise balance loss α · Σ_i f_i P_i with α = 1e-4."
    )
    dropless: ClassVar[str | None] = "deepseek_v3 balances with its bias, not with drops"
    no_sparsemixer: ClassVar[str | None] = (
        "it selects by score + balancing bias (sigmoid by default), not by softmax logits"
    )
    num_experts: int = 256
    top_k: int = 8
    expert_hidden: int = 128
    num_shared_experts: int = 1
    num_groups: int = 8
    topk_groups: int = 4
    routed_scaling_factor: float = 1.0
    alpha: float = 1e-4
    bias_update_rate: float = 1e-3
    balance_scope: str = "sequence"  # Eq. 17-20: the complementary loss is sequence-wise
    norm_topk_prob: bool = True  # Eq. 13: V3 normalises the selected sigmoid scores
    score: str = "sigmoid"  # Eq. 15; softmax or sqrtsoftplus for the models routing V3's way

    def validate(self) -> None:
        super().validate()
        check_choice(self, "score", tuple(SCORES))
        check_int(self, "num_groups", 1)
        check_divides(self, "num_groups", "num_experts")
        check_int(self, "topk_groups", 1)
        check_le(self, "topk_groups", "num_groups")
        if self.num_groups > 1:
            check_divides(self, "topk_groups", "top_k")
            per_group = self.top_k // self.topk_groups
            group_size = self.num_experts // self.num_groups
            if per_group > group_size:
                raise ValueError(
                    f"top_k/topk_groups={per_group} must be <= num_experts/num_groups={group_size}"
                )
        check_number(self, "routed_scaling_factor", positive=True)
        check_number(self, "alpha", minimum=0)
        check_number(self, "bias_update_rate", minimum=0)


class DeepSeekV3Router(Router):
    def __init__(self, cfg: DeepSeekV3Config) -> None:
        super().__init__(cfg)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        # training load since the last update_bias(); not part of a checkpoint's meaning
        self.register_buffer(
            "load_count", torch.zeros(cfg.num_experts, dtype=torch.long), persistent=False
        )

    def _apply(self, fn, recurse=True):
        """Keep `expert_bias` in float32 whatever dtype the layer is cast to: in bf16 an update
        of 1e-3 rounds to nothing once |b| nears 0.5, and balancing would silently stop."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        self._buffers["expert_bias"] = bias.to(device=self.expert_bias.device)
        return self

    def score(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return SCORES[self.cfg.score](logits_TE)

    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg, E, K = self.cfg, self.cfg.num_experts, self.cfg.top_k
        logits_TE = self.logits(x_TD)
        s_TE = self.score(logits_TE)
        biased_TE = s_TE.detach() + self.expert_bias.to(s_TE.dtype)
        if cfg.num_groups > 1:
            allowed_TE = group_limited_mask(
                biased_TE, cfg.num_groups, cfg.topk_groups, K // cfg.topk_groups
            )
            biased_TE = biased_TE.masked_fill(~allowed_TE, float("-inf"))
        expert_TK = topk(biased_TE, K)[1]
        s_TK = s_TE.gather(1, expert_TK)
        weight_TK = norm_topk(s_TK, cfg.norm_topk_prob) * cfg.routed_scaling_factor
        token_A, expert_A, weight_A = flatten_topk(expert_TK, weight_TK)
        demand_E = torch.bincount(expert_A, minlength=E)
        routing = make_routing(token_A, expert_A, weight_A, s_TE, logits_TE, demand_E)
        losses = {}
        if self.training:
            with torch.no_grad():
                self.load_count += routing.load
            losses["balance"] = cfg.alpha * self.sequence_balance(routing, s_TE, num_seqs)
        return routing, losses

    def sequence_balance(self, routing: Routing, s_TE: torch.Tensor, num_seqs: int) -> torch.Tensor:
        """mean over sequences of sum_i f_i P_i (V3 Eq. 17-20), f_i = E/(K S) * count = E * share;
        another `balance_scope` counts f over the micro-batch or the global batch instead."""
        s_norm_TE = s_TE / s_TE.sum(-1, keepdim=True)
        return scoped_balance_loss(self, routing.expert, routing.token, s_norm_TE, num_seqs)

    @torch.no_grad()
    def update_bias(self) -> None:
        load_E = self.load_count.float()
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.load_count.zero_()
