"""moe_plus_plus: FFN and zero-computation experts in one routing pool (Jin et al. 2024, "MoE++:
Accelerating Mixture-of-Experts Methods with Zero-Computation Experts", ICLR 2025,
arXiv:2410.07348, Sec. 3).

Shape legend: T tokens, D model width, E FFN experts, Z zero-computation experts, P = E + Z
experts in the pool, K experts per token (from the pool), A kept FFN assignments, B kept
zero-computation assignments.

- Pool (Sec. 3.1, Eq. 3-5): E FFN experts plus `num_zero_experts` zero experts E(x) = 0
  (discard), `num_copy_experts` copy experts E(x) = x (skip) and `num_constant_experts`
  constant experts E(x) = a1 x + a2 v with [a1, a2] = softmax(W_c x) (replace; W_c [2, D] and
  v [D] trained, `const_gate` and `const_vec`).
- Router (Eq. 2, 6): G(x^j) = x^j W^j + G(x^{j-1}) W_g^j, the gating residual: the pool logits
  of the previous MoE++ layer (`gate_residual`, [T, P]) enter through a trainable [P, P] matrix
  (`router.residual`). p = softmax(G) over the pool, top-K. Combine weights as in the authors'
  released code (github.com/SkyworkAI/MoE-plus-plus, `moe_plus_plus_layer.gating`): the zero
  experts' gates are set to 0 and the K gates renormalised to sum to 1 (`norm_topk_prob`,
  default true; false keeps the raw top-K probabilities).
  Pool logits are returned as `out.extras["gate_logits"]` for the next layer to pass on.
- Heterogeneous load balance (Sec. 3.3, Eq. 7; beta of Eq. 9 = `balance_coef`):
  `balance_coef * sum_i eta_i f_i P_i` over the pool, f_i = (1/T) * tokens that select i
  (= K * the share of assignments, so f sums to K), P_i = mean_t p_i, eta_i = 1 for FFN
  experts and `tau` for zero-computation experts (tau < 1 lets tokens favour the cheap
  experts). No factor of the pool size, unlike Switch's E * sum f P. `balance_scope` sets
  which tokens f counts.
- `Routing` holds the FFN assignments only (experts 0..E-1; `scores` and `logits` are the FFN
  columns of the pool), so `load`, the backends and `experts_per_token` see exactly the FFN
  work: zero-computation experts are free in FLOPs and active-parameter counts. The pool-wide
  load is `out.extras["pool_load"]` [P].
- Dropless (capacity_factor rejected).

Defaults: MoE++ 0.6B/(8+4)E: 8 FFN experts, 1 zero, 1 copy, 2 constant, top-2 (Table 2 and
the authors' code), tau 0.75 (Sec. 4.3) and beta 0.01 (App. B.2); the released code has no
training loss to check them against. Eq. 8's expert capacity (gamma = 1.1) is not
implemented: this layer is dropless.
Departures from the released code: its router is a 2-layer tanh MLP (`moe_2layer_gate`) and it
multiplies the expert inputs by K; here the router is linear (the paper's G = x W) and inputs
are not scaled. Without `gate_residual` (the first layer, or a runner that does not chain
layers) the residual term is absent. Inits as the code: v ~ N(0, 1), W_c and W_g like
nn.Linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .compute.assignments import Routing, make_routing
from .contract.config import BalanceScopeConfig, check_int, check_number
from .contract.layer import MoELayer, MoEOutput, assemble, check_input_dtype, flatten_tokens
from .contract.routing import Router, f_dot_p, flatten_topk, scoped_balance_inputs, topk

# (token_B, kind_B, weight_B): kept zero-computation assignments; kind 0..Z-1 counts zero,
# then copy, then constant experts
ZeroComputeAssignments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class MoEPlusPlusConfig(BalanceScopeConfig):
    note: ClassVar[str] = (
        "Heterogeneous balance 0.01 · Σ_i η_i f_i P_i over the whole pool, f_i = tokens choosing i "
        "/ T with no pool-size factor (Eq. 7). η_i = 1 for FFN experts and τ = 0.75 for zero- "
        "computation experts (Jin et al. 2024)."
    )
    dropless: ClassVar[str | None] = "moe_plus_plus computes every selected FFN expert"
    uneven_top_k: ClassVar[str | None] = (
        "zero-computation experts take some of a token's K slots, leaving it 0..K FFN experts"
    )
    variable_k: ClassVar[bool] = True
    takes_gate_residual: ClassVar[bool] = True
    num_experts: int = 8
    top_k: int = 2
    num_zero_experts: int = 1
    num_copy_experts: int = 1
    num_constant_experts: int = 2
    gating_residual: bool = True
    norm_topk_prob: bool = True
    balance_coef: float = 0.01
    tau: float = 0.75

    def validate(self) -> None:
        super().validate()
        check_int(self, "num_zero_experts", 0)
        check_int(self, "num_copy_experts", 0)
        check_int(self, "num_constant_experts", 0)
        for name in ("gating_residual", "norm_topk_prob"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        check_number(self, "balance_coef", minimum=0)
        check_number(self, "tau", positive=True)

    @property
    def num_zero_computation(self) -> int:
        """Z: zero, copy and constant experts together."""
        return self.num_zero_experts + self.num_copy_experts + self.num_constant_experts

    @property
    def pool_size(self) -> int:
        """P = E + Z, the experts the router chooses among."""
        return self.num_experts + self.num_zero_computation


class MoEPlusPlusRouter(Router):
    def __init__(self, cfg: MoEPlusPlusConfig) -> None:
        super().__init__(cfg)
        Z, P, D = cfg.num_zero_computation, cfg.pool_size, cfg.d_model
        self.zc_weight = nn.Parameter(torch.empty(Z, D))
        nn.init.kaiming_uniform_(self.zc_weight, a=5**0.5)
        self.residual = nn.Parameter(torch.empty(P, P)) if cfg.gating_residual else None
        if self.residual is not None:
            nn.init.kaiming_uniform_(self.residual, a=5**0.5)  # nn.Linear(P, P), as gate_map

    def pool_logits(self, x_TD: torch.Tensor, gate_residual: torch.Tensor | None) -> torch.Tensor:
        """G = x [W; W_zc]^T + G_prev W_g^T (Eq. 6), in the router dtype."""
        with torch.autocast(x_TD.device.type, enabled=False):
            w_PD = torch.cat([self.weight, self.zc_weight]).to(self.dtype)
            logits_TP = x_TD.to(self.dtype) @ w_PD.T
            if gate_residual is not None and self.residual is not None:
                prev_TP = gate_residual.reshape(logits_TP.shape).to(self.dtype)
                logits_TP = logits_TP + prev_TP @ self.residual.to(self.dtype).T
        return logits_TP


def heterogeneous_balance(
    router: Router,
    expert_A: torch.Tensor,
    token_A: torch.Tensor,
    probs_TP: torch.Tensor,
    num_seqs: int,
) -> torch.Tensor:
    """sum_i eta_i f_i P_i (Eq. 7), eta = 1 on FFN experts and tau on the others; f_i = tokens
    selecting i / T = K * the share of assignments, counted in `balance_scope`."""
    cfg, P = router.cfg, probs_TP.shape[-1]
    share, p = scoped_balance_inputs(router, expert_A, token_A, probs_TP, num_seqs)
    eta_P = probs_TP.new_full((P,), cfg.tau)
    eta_P[: cfg.num_experts] = 1.0
    return cfg.top_k * f_dot_p(eta_P * share, p).mean()


class MoEPlusPlusLayer(MoELayer):
    """MoELayer whose pool adds zero, copy and constant experts; `forward(x, gate_residual)`."""

    def __init__(self, cfg: MoEPlusPlusConfig, router: MoEPlusPlusRouter | None = None) -> None:
        # `router`: a subclass for pools routed another way (LongCat-Flash's biased selection)
        super().__init__(cfg, router if router is not None else MoEPlusPlusRouter(cfg))
        C, D = cfg.num_constant_experts, cfg.d_model
        self.const_gate = nn.Parameter(torch.empty(C, 2, D))
        for c in range(C):
            nn.init.kaiming_uniform_(self.const_gate[c], a=5**0.5)  # nn.Linear(D, 2)
        self.const_vec = nn.Parameter(torch.randn(C, D))

    def forward(
        self,
        x: torch.Tensor,
        gate_residual: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> MoEOutput:
        """`token_ids` is accepted and ignored (docs/contract.md §2)."""
        cfg = self.cfg
        x_TD, num_seqs = flatten_tokens(x, cfg.d_model)
        check_input_dtype(x_TD, self.experts.w1)
        if self.router.forced is not None:
            raise ValueError(
                "moe_plus_plus cannot replay a routing: its zero-computation assignments are "
                "not in the Routing record a trace is made from"
            )
        logits_TP = self.router.pool_logits(x_TD, gate_residual)
        if cfg.force_uniform_routing:
            routing, losses = self.router.uniform(x_TD, num_seqs), {}
            zc = (x_TD.new_zeros(0, dtype=torch.long),) * 2 + (x_TD.new_zeros(0),)
            expert_A = routing.expert
        else:
            routing, zc, expert_A, losses = self.route(x_TD, logits_TP, num_seqs)
        routed_TD, path = self.backend(x_TD, routing, self.experts)
        y_TD = routed_TD + self.zero_compute(x_TD, *zc)
        out = assemble(x, self.add_shared(x_TD, y_TD), losses, routing, path)
        out.extras = {
            "gate_logits": logits_TP,
            "pool_load": torch.bincount(expert_A, minlength=cfg.pool_size),
        }
        return out

    def route(
        self, x_TD: torch.Tensor, logits_TP: torch.Tensor, num_seqs: int = 1
    ) -> tuple[Routing, ZeroComputeAssignments, torch.Tensor, dict[str, torch.Tensor]]:
        """Top-K over the pool; FFN assignments into the Routing, the rest kept apart."""
        cfg, E = self.cfg, self.cfg.num_experts
        probs_TP = F.softmax(logits_TP, dim=-1)
        weight_TK, expert_TK = topk(probs_TP, cfg.top_k)
        weight_TK = self.combine_weights(weight_TK, expert_TK)
        token_A, expert_A, weight_A = flatten_topk(expert_TK, weight_TK)
        ffn_A = expert_A < E
        routing = make_routing(
            token_A[ffn_A],
            expert_A[ffn_A],
            weight_A[ffn_A],
            probs_TP[:, :E],
            logits_TP[:, :E],
            torch.bincount(expert_A[ffn_A], minlength=E),
        )
        zc = (token_A[~ffn_A], expert_A[~ffn_A] - E, weight_A[~ffn_A])
        losses = {}
        if self.training:
            balance = heterogeneous_balance(self.router, expert_A, token_A, probs_TP, num_seqs)
            losses["balance"] = cfg.balance_coef * balance
        return routing, zc, expert_A, losses

    def combine_weights(self, weight_TK: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
        """Zero experts' gates set to 0, then (norm_topk_prob) the K gates renormalised."""
        cfg = self.cfg
        if not cfg.norm_topk_prob:
            return weight_TK
        is_zero_TK = (expert_TK >= cfg.num_experts) & (
            expert_TK < cfg.num_experts + cfg.num_zero_experts
        )
        weight_TK = weight_TK.masked_fill(is_zero_TK, 0.0)
        return weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20)

    def zero_compute(
        self,
        x_TD: torch.Tensor,
        token_B: torch.Tensor,
        kind_B: torch.Tensor,
        weight_B: torch.Tensor,
    ) -> torch.Tensor:
        """sum over kept zero-computation assignments of weight * E(x) (Eq. 3-5)."""
        cfg = self.cfg
        x_BD = x_TD[token_B]
        copy_B = (kind_B >= cfg.num_zero_experts) & (
            kind_B < cfg.num_zero_experts + cfg.num_copy_experts
        )
        const_B = kind_B >= cfg.num_zero_experts + cfg.num_copy_experts
        c_B = (kind_B - cfg.num_zero_experts - cfg.num_copy_experts).clamp_min(0)
        if cfg.num_constant_experts:
            a_B2 = F.softmax(torch.einsum("bd,bkd->bk", x_BD, self.const_gate[c_B]), dim=-1)
            const_BD = a_B2[:, :1] * x_BD + a_B2[:, 1:] * self.const_vec[c_B]
        else:
            const_BD = torch.zeros_like(x_BD)
        out_BD = torch.where(copy_B[:, None], x_BD, torch.zeros_like(x_BD))
        out_BD = torch.where(const_B[:, None], const_BD, out_BD)
        out_BD = out_BD * weight_B[:, None].to(x_TD.dtype)
        return x_TD.new_zeros(x_TD.shape).index_add(0, token_B, out_BD.to(x_TD.dtype))

    def extra_repr(self) -> str:
        c = self.cfg
        return super().extra_repr() + (
            f", zero={c.num_zero_experts}, copy={c.num_copy_experts}, "
            f"constant={c.num_constant_experts}"
        )
