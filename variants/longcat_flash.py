"""longcat_flash: softmax routing over FFN and identity experts with a selection bias, scaled.

LongCat-Flash (Meituan LongCat Team 2025, "LongCat-Flash Technical Report"), as HF transformers
implements it (`LongcatFlashTopkRouter`, `LongcatFlashMoE`); where the two differ this follows
the HF code, which is what the released weights run.

Shape legend: T tokens, D model width, E FFN experts, Z identity (zero-computation) experts,
P = E + Z experts in the pool, K experts per token (from the pool), A assignments.

- Pool: E FFN experts plus `num_identity_experts` zero-computation experts E(x) = x (HF
  `zero_expert_num`): MoE++'s copy experts (`variants.moe_plus_plus`, Jin et al. 2024), whose
  pool, Routing split (FFN assignments only) and zero-computation output this layer reuses.
- Affinity: p = softmax(x W^T) over the whole pool (W [P, D], `router.weight` then
  `router.zc_weight`), in float32.
- Selection: top-K of `p + b`, b = `router.expert_bias` [P] (HF `e_score_correction_bias`);
  the bias only selects.
- Weight: p_i * `routed_scaling_factor` (6 in the released model), no renormalisation over
  the K. An identity expert adds p_i * scale * x.
- Bias update: the HF code has no training rule for b; here DeepSeek-V3's sign rule
  (arXiv:2408.15664 Algorithm 1) over the pool's training load, once per optimizer step:
  b_i += bias_update_rate * sign(mean_load - load_i). Departure: the model's own training-time
  balancing (not in the HF code) is not modelled; this layer returns no losses.
- Dropless; a token passes through 0..K FFN experts (`variable_k`).

Defaults (HF `LongcatFlashConfig`): 512 FFN experts, 256 identity experts, top-12, scale 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .compute.assignments import Routing, make_routing
from .contract.config import MoEConfig, check_int, check_number
from .contract.routing import flatten_topk
from .moe_plus_plus import MoEPlusPlusLayer, MoEPlusPlusRouter, ZeroComputeAssignments


@dataclass
class LongcatFlashConfig(MoEConfig):
    note: ClassVar[str] = (
        "No auxiliary loss: a per-expert bias over the whole pool (FFN and identity experts) "
        "steers top-K selection, updated by DeepSeek-V3's sign rule at rate 1e-3 per step."
    )
    dropless: ClassVar[str | None] = "longcat_flash balances with its bias, not with drops"
    uneven_top_k: ClassVar[str | None] = (
        "identity experts take some of a token's K slots, leaving it 0..K FFN experts"
    )
    variable_k: ClassVar[bool] = True
    num_experts: int = 512
    top_k: int = 12
    expert_hidden: int = 128
    num_identity_experts: int = 256
    routed_scaling_factor: float = 6.0
    bias_update_rate: float = 1e-3

    def validate(self) -> None:
        super().validate()
        check_int(self, "num_identity_experts", 0)
        check_number(self, "routed_scaling_factor", positive=True)
        check_number(self, "bias_update_rate", minimum=0)

    # the MoE++ pool this layer reuses: identity experts are its copy experts, and nothing else
    num_zero_experts: ClassVar[int] = 0
    num_constant_experts: ClassVar[int] = 0
    gating_residual: ClassVar[bool] = False

    @property
    def num_copy_experts(self) -> int:
        return self.num_identity_experts

    @property
    def num_zero_computation(self) -> int:
        return self.num_identity_experts

    @property
    def pool_size(self) -> int:
        return self.num_experts + self.num_identity_experts


class LongcatFlashRouter(MoEPlusPlusRouter):
    """MoE++'s pool router without its gating residual, plus the selection bias over the pool."""

    def __init__(self, cfg: LongcatFlashConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("expert_bias", torch.zeros(cfg.pool_size))
        self.register_buffer(
            "load_count", torch.zeros(cfg.pool_size, dtype=torch.long), persistent=False
        )

    def _apply(self, fn, recurse=True):
        """`expert_bias` stays float32 whatever the layer's dtype (as DeepSeek-V3's)."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        self._buffers["expert_bias"] = bias.to(device=self.expert_bias.device)
        return self

    @torch.no_grad()
    def update_bias(self) -> None:
        load_P = self.load_count.float()
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load_P.mean() - load_P)
        self.load_count.zero_()


class LongcatFlashLayer(MoEPlusPlusLayer):
    """MoE++'s layer with LongCat-Flash's selection and weights; `forward(x, token_ids=None)`."""

    def __init__(self, cfg: LongcatFlashConfig) -> None:
        super().__init__(cfg, LongcatFlashRouter(cfg))

    def route(
        self, x_TD: torch.Tensor, logits_TP: torch.Tensor, num_seqs: int = 1
    ) -> tuple[Routing, ZeroComputeAssignments, torch.Tensor, dict[str, torch.Tensor]]:
        """Top-K of softmax + bias over the pool; weights p * scale; FFN assignments into the
        Routing, identity ones kept apart (kind 0..Z-1 of MoE++'s copy experts)."""
        cfg, E = self.cfg, self.cfg.num_experts
        p_TP = F.softmax(logits_TP, dim=-1)
        biased_TP = p_TP.detach() + self.router.expert_bias.to(p_TP.dtype)
        expert_TK = biased_TP.topk(cfg.top_k, dim=-1).indices
        weight_TK = p_TP.gather(1, expert_TK) * cfg.routed_scaling_factor
        token_A, expert_A, weight_A = flatten_topk(expert_TK, weight_TK)
        ffn_A = expert_A < E
        routing = make_routing(
            token_A[ffn_A],
            expert_A[ffn_A],
            weight_A[ffn_A],
            p_TP[:, :E],
            logits_TP[:, :E],
            torch.bincount(expert_A[ffn_A], minlength=E),
        )
        if self.training:
            with torch.no_grad():
                self.router.load_count += torch.bincount(expert_A, minlength=cfg.pool_size)
        zc = (token_A[~ffn_A], expert_A[~ffn_A] - E, weight_A[~ffn_A])
        return routing, zc, expert_A, {}

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"E={c.num_experts}, identity={c.num_identity_experts}, K={c.top_k}, "
            f"D={c.d_model}, H={c.expert_hidden}, scale={c.routed_scaling_factor}, "
            f"backend={c.backend!r}"
        )
